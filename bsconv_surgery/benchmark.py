"""Side-by-side latency measurement of an original and a converted model.

Both models run in one process on the same input, with the same threads, under
``torch.inference_mode()``. After a warm-up, timed runs are interleaved (round ``i`` runs the
models in order, round ``i + 1`` in reverse order), so slow drift of the machine (other
processes, frequency changes) hits both models alike. Reported: median and p90 latency of one
forward pass, and throughput (samples per second at the median). The process CPU time of each
call is recorded as well: on a machine shared with other work, wall-clock latencies grow with
the load while CPU time (at one thread especially) stays close to the work done.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .inference.export import compile_aot
from .inference.prepare import channels_last_input, prepare_for_inference
from .models.inputs import InputFamily, input_family, tensors_in

__all__ = ["Timing", "time_interleaved", "paired_speedup", "prepare_with", "benchmark_pair", "PrepOptions", "environment",
           "cpu_model", "load_average", "busy_warning"]


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


@dataclass(frozen=True)
class PrepOptions:
    """How both models are prepared before timing (the same for both). ``compile``: torch.compile
    (just in time, at the first call); ``aot``: AOTInductor (``compile_aot``) instead."""

    fuse: bool = False
    channels_last: bool = False
    compile: bool = False
    lower: bool = False
    aot: bool = False

    @property
    def label(self) -> str:
        flags = (("fused", self.fuse), ("channels_last", self.channels_last), ("lowered", self.lower),
                 ("compiled", self.compile and not self.aot), ("aot-compiled", self.aot))
        parts = [p for p, on in flags if on]
        return "+".join(parts) if parts else "eager"


def prepare_with(model: nn.Module, prep: PrepOptions, example_input: Any,
                 report: Optional[Dict[str, Any]] = None) -> Callable:
    """Apply ``prep`` to ``model`` in place: ``prepare_for_inference``, then ``compile_aot`` on
    ``example_input`` (the input it will be timed on, channels_last if asked; a tensor or a tuple
    of arguments) for ``prep.aot``."""
    model = prepare_for_inference(model, fuse=prep.fuse, channels_last=prep.channels_last,
                                  compile=prep.compile and not prep.aot, lower=prep.lower, report=report)
    return compile_aot(model, example_input) if prep.aot else model


def benchmark_pair(
    original: nn.Module,
    converted: nn.Module,
    input_size: Sequence[int],
    *,
    batch_size: int = 1,
    device: str = "cpu",
    prep: PrepOptions = PrepOptions(),
    warmup: int = 3,
    runs: int = 20,
    max_seconds: Optional[float] = None,
    seed: int = 0,
    copy_models: bool = True,
    family: Optional[Any] = None,
) -> Dict[str, Any]:
    """Prepare both models the same way, time them interleaved, return a JSON-able dict.

    With ``copy_models`` the given modules are left untouched (preparation works on copies).
    ``family`` (``models/inputs.py``, default ``tensor``) says how the models are fed.
    """
    dev = torch.device(device)
    inputs = family if isinstance(family, InputFamily) else input_family(family)
    x = inputs.make(input_size, batch_size, torch.Generator().manual_seed(seed), device=dev)
    xin = tuple(channels_last_input(a) if isinstance(a, torch.Tensor) else a for a in x) if prep.channels_last else x
    prepared: Dict[str, Callable] = {}
    fold: Dict[str, Any] = {}
    lowered: Dict[str, int] = {}
    seconds_prepare: Dict[str, float] = {}
    for name, model in (("original", original), ("converted", converted)):
        t0 = time.perf_counter()
        m = copy.deepcopy(model) if copy_models else model
        m = m.to(dev)
        info: Dict[str, Any] = {}
        m = prepare_with(m, prep, xin, report=info)
        if "fold" in info:
            fold[name] = {"folded": len(info["fold"]["folded"]), "by_kind": info["fold"]["by_kind"],
                          "skipped": len(info["fold"]["skipped"])}
        if "lower" in info:
            lowered[name] = len(info["lower"]["lowered"])
        prepared[name] = m
        seconds_prepare[name] = time.perf_counter() - t0
    inputs = {n: xin for n in prepared}
    if prep.compile and not prep.aot:  # the first call compiles: keep it out of the warm-up budget
        t0 = time.perf_counter()
        with torch.inference_mode():
            for n, m in prepared.items():
                m(*xin)
        seconds_prepare["compile_first_call"] = time.perf_counter() - t0
    timings = time_interleaved(prepared, inputs, warmup=warmup, runs=runs, max_seconds=max_seconds)
    o, c = timings["original"], timings["converted"]
    return {
        "prep": prep.label,
        "batch_size": batch_size,
        "input_size": list(input_size),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "original": o.as_dict(),
        "converted": c.as_dict(),
        "speedup_median": round(o.median / c.median, 4),
        "speedup_p90": round(o.p90 / c.p90, 4),
        "speedup_paired": round(paired_speedup(o, c), 4),
        "speedup_cpu_time": round(statistics.median(o.cpu_times) / statistics.median(c.cpu_times), 4)
        if statistics.median(c.cpu_times) > 0 else None,
        "fold": fold,
        **({"lowered": lowered} if prep.lower else {}),
        "seconds_prepare": {k: round(v, 3) for k, v in seconds_prepare.items()},
    }


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


def load_average() -> Optional[Tuple[float, float, float]]:
    try:
        return tuple(round(v, 2) for v in os.getloadavg())
    except (OSError, AttributeError):  # not on every platform
        return None


def busy_warning() -> Optional[str]:
    """A warning when other processes keep the CPUs busy (1-minute load above the CPU count)."""
    load, cpus = load_average(), os.cpu_count() or 1
    if load is None or load[0] <= cpus:
        return None
    return (f"The machine is busy (load average {load[0]:.1f} on {cpus} CPUs): wall-clock timings are inflated "
            "and multi-threaded ones erratic; compare the CPU-time speed-up, or use --threads 1.")


def environment() -> Dict[str, Any]:
    """What a timing depends on: versions, threads, CPU, load."""
    return {
        "load_average": load_average(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }
