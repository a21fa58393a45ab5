"""Timing of models side by side: each model's calls interleaved with the others' in one loop
(round ``i`` runs the models in order, round ``i + 1`` in reverse order), so slow drift of the
machine (other processes, frequency changes) hits every model alike. Used by the benchmark and
by ``prepare_for_inference(prep="auto")`` to pick the fastest preparation."""

from __future__ import annotations

import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import torch

from ..models.inputs import tensors_in

__all__ = ["Timing", "time_interleaved", "paired_speedup", "cpu_model"]


@dataclass
class Timing:
    """Latencies (wall-clock seconds) and process CPU seconds of one model's timed runs."""

    name: str
    batch_size: int
    times: List[float] = field(default_factory=list)
    cpu_times: List[float] = field(default_factory=list)

    def quantile(self, q: float) -> float:
        """Nearest-rank quantile (``q`` in [0, 1]) of the timed runs, in seconds."""
        ordered = sorted(self.times)
        rank = max(1, math.ceil(q * len(ordered)))
        return ordered[rank - 1]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def p90(self) -> float:
        return self.quantile(0.9)

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch_size / self.median

    def as_dict(self) -> Dict[str, Any]:
        return {
            "runs": len(self.times),
            "median_ms": round(self.median * 1e3, 4),
            "p90_ms": round(self.p90 * 1e3, 4),
            "min_ms": round(min(self.times) * 1e3, 4),
            "throughput_per_s": round(self.throughput, 2),
            "cpu_median_ms": round(statistics.median(self.cpu_times) * 1e3, 4) if self.cpu_times else None,
        }


def paired_speedup(original: Timing, converted: Timing) -> float:
    """Median over timed rounds of ``original / converted`` latency. ``time_interleaved`` runs both
    models in every round, so each pair shares the moment's load: unlike the ratio of the two
    medians, this ratio does not move when the machine gets slower or faster between rounds."""
    pairs = [o / c for o, c in zip(original.times, converted.times) if c > 0]
    return statistics.median(pairs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _args(x: Any) -> tuple:
    return x if isinstance(x, tuple) else (x,)


def _batch_of(x: Any) -> int:
    """Samples in a model's arguments: the first tensor's batch, or the length of an image list."""
    first = _args(x)[0]
    return len(first) if isinstance(first, list) else int(first.shape[0])


def time_interleaved(
    models: Dict[str, Callable[..., Any]],
    inputs: Dict[str, Any],
    *,
    warmup: int = 3,
    runs: int = 20,
    min_runs: int = 5,
    max_seconds: Optional[float] = None,
) -> Dict[str, Timing]:
    """Time each model on its input, interleaved, after ``warmup`` untimed calls each.

    ``runs`` rounds at most; after ``min_runs`` rounds, stops early once ``max_seconds`` of
    timed rounds have passed (and the warm-up stops after a round that took ``max_seconds / 2``). ``inputs`` maps each model's name to its input (the same
    values; only the memory format may differ): a tensor, or a tuple of arguments (a list of
    images for a detection model, two images for optical flow).
    """
    names = list(models)
    batch = {n: _batch_of(inputs[n]) for n in names}
    timings = {n: Timing(n, batch[n]) for n in names}
    device = {n: tensors_in(inputs[n])[0].device for n in names}
    inputs = {n: _args(inputs[n]) for n in names}
    with torch.inference_mode():
        warm_start = time.perf_counter()
        for i in range(warmup):
            for n in names:
                models[n](*inputs[n])
                _sync(device[n])
            # slow models: one warm-up round is enough once it has taken half the time budget
            if max_seconds is not None and time.perf_counter() - warm_start > max_seconds / 2:
                break
        started = time.perf_counter()
        for i in range(runs):
            order = names if i % 2 == 0 else names[::-1]
            for n in order:
                _sync(device[n])
                c0, t0 = time.process_time(), time.perf_counter()
                models[n](*inputs[n])
                _sync(device[n])
                timings[n].times.append(time.perf_counter() - t0)
                timings[n].cpu_times.append(time.process_time() - c0)
            if max_seconds is not None and i + 1 >= min_runs and time.perf_counter() - started > max_seconds:
                break
    return timings


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
