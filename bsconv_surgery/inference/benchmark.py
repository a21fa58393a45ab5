"""Side-by-side latency measurement of an original and a converted model.

Both models run in one process on the same input, with the same threads, under
``torch.inference_mode()``. Each is prepared for inference (``inference/preps.py``): by default
each gets the fastest preparation measured for it on this machine (``prep="auto"``), or the one
named (``ort``, ONNX Runtime, among them). After a warm-up, timed runs are interleaved (``inference/timing.py``: round ``i`` runs
the models in order, round ``i + 1`` in reverse order), so slow drift of the machine (other
processes, frequency changes) hits both models alike. Reported: median and p90 latency of one
forward pass, and throughput (samples per second at the median). The process CPU time of each
call is recorded as well: on a machine shared with other work, wall-clock latencies grow with
the load while CPU time (at one thread especially) stays close to the work done.

``backend="ort"`` times both models exported to ONNX (``export_onnx``, BatchNorm folded) in
ONNX Runtime sessions with as many intra-op threads as torch uses; ``backend="both"`` times the
torch and ORT forms of both models in one interleaved loop and adds the cross-backend figure:
the best original time over the backends against the best converted time.
"""

from __future__ import annotations

import copy
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..core.errors import SurgeryError, arg
from .compiled import channels_last_input
from .export import export_onnx, relative_error
from .ort import ort_session
from .preps import AUTO, Preparation, apply_preparation, choose_preparation, preparation_from_flags, resolve_preparation
from .timing import Timing, cpu_model, paired_speedup, time_interleaved
from ..models.inputs import Inputs, as_example_inputs
from ..core.registry import BACKENDS

__all__ = ["Timing", "time_interleaved", "paired_speedup", "prepare_with", "benchmark", "PrepOptions", "environment",
           "cpu_model", "load_average", "busy_warning", "BACKENDS", "ort_session"]


@dataclass(frozen=True)
class PrepOptions:
    """A preparation given as flags (the benchmark's ``--fuse`` / ``--channels-last`` / ``--lower``
    / ``--compile`` / ``--aot``); ``preparation`` is the ``Preparation`` they ask for.
    ``compile``: torch.compile (just in time, at the first call); ``aot``: AOTInductor instead."""

    fuse: bool = False
    channels_last: bool = False
    compile: bool = False
    lower: bool = False
    aot: bool = False

    @property
    def preparation(self) -> Preparation:
        return preparation_from_flags(fuse=self.fuse, channels_last=self.channels_last,
                                      compile=self.compile and not self.aot, lower=self.lower, aot=self.aot)

    @property
    def label(self) -> str:
        return self.preparation.label


PrepLike = Union[str, Preparation, PrepOptions]


def _as_preparation(prep: PrepLike) -> Union[str, Preparation]:
    if isinstance(prep, PrepOptions):
        return prep.preparation
    if isinstance(prep, str) and prep != AUTO:
        return resolve_preparation(prep)
    return prep


def prepare_with(model: nn.Module, prep: PrepLike, example_input: Any,
                 report: Optional[Dict[str, Any]] = None) -> Callable:
    """Apply ``prep`` (a name, a ``Preparation`` or ``PrepOptions``) to ``model`` in place and
    return the module to run; ``example_input`` (a tensor or a tuple of arguments) is what
    ``aot`` compiles for."""
    chosen = _as_preparation(prep)
    if chosen == AUTO:
        raise SurgeryError("prepare_with needs one preparation, not 'auto'.")
    x = channels_last_input(example_input) if chosen.channels_last else example_input
    return apply_preparation(model, chosen, x, report=report)


class _OrtModel:
    """An ORT session called like a module on a CPU tensor (zero-copy to NumPy)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.input = session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> Any:
        return self.session.run(None, {self.input: x.contiguous().numpy()})[0]


def _prepare_torch(name: str, model: nn.Module, prep: Union[str, Preparation], x: tuple, dev: torch.device, *,
                   candidates: Optional[Sequence[str]], cache: bool, log: Optional[Callable[[str], None]],
                   result: Dict[str, Any]) -> Tuple[Callable, tuple]:
    info: Dict[str, Any] = {}
    t0 = time.perf_counter()
    if prep == AUTO:
        say = (lambda m: log(f"{name}: {m}")) if log else None
        module, chosen = choose_preparation(model, x, candidates=candidates, cache=cache, report=info, log=say)
    else:
        chosen = prep
        module = apply_preparation(model, chosen, channels_last_input(x) if chosen.channels_last else x, report=info)
        if chosen.compile == "jit":  # the first call compiles: keep it out of the warm-up
            with torch.inference_mode():
                module(*x)
    xin = channels_last_input(x) if chosen.channels_last else x
    result["preps"][name] = {"name": chosen.name, "label": chosen.label}
    if "prep" in info and info["prep"].get("auto"):
        result.setdefault("auto", {})[name] = {k: info["prep"][k] for k in ("candidates", "cached")}
    if "fold" in info:
        result["fold"][name] = {"folded": len(info["fold"]["folded"]), "by_kind": info["fold"]["by_kind"],
                                "skipped": len(info["fold"]["skipped"])}
    if "lower" in info:
        result.setdefault("lowered", {})[name] = len(info["lower"]["lowered"])
    if "ort" in info:  # the ort preparation: its export's facts (dynamic batch, parity, onnxruntime version)
        result.setdefault("ort_export", {})[name] = info["ort"]
    result["seconds_prepare"][name] = round(time.perf_counter() - t0, 3)
    return module, xin


def _prepare_ort(name: str, model: nn.Module, x: tuple, folder: Path, result: Dict[str, Any]) -> Tuple[Callable, tuple]:
    if len(x) != 1 or not isinstance(x[0], torch.Tensor) or x[0].device.type != "cpu":
        raise SurgeryError(f"{arg('backend')} ort times models fed one tensor, on CPU.")
    t0 = time.perf_counter()
    fused = apply_preparation(model, resolve_preparation("fused"))
    path = export_onnx(fused, folder / f"{name}.onnx", x[0], dynamic_batch=False)
    runner = _OrtModel(ort_session(path))
    with torch.inference_mode():
        expected = fused(*x)
    result["ort"].setdefault("parity", {})[name] = relative_error(torch.from_numpy(runner(x[0])), expected)
    result["seconds_prepare"][f"{name}_ort"] = round(time.perf_counter() - t0, 3)
    return runner, x


def _pair(o: Timing, c: Timing) -> Dict[str, Any]:
    cpu_c = statistics.median(c.cpu_times)
    return {
        "original": o.as_dict(),
        "converted": c.as_dict(),
        "speedup_median": round(o.median / c.median, 4),
        "speedup_p90": round(o.p90 / c.p90, 4),
        "speedup_paired": round(paired_speedup(o, c), 4),
        "speedup_cpu_time": round(statistics.median(o.cpu_times) / cpu_c, 4) if cpu_c > 0 else None,
    }


def benchmark(
    original: nn.Module,
    converted: nn.Module,
    example_inputs: Inputs,
    *,
    batch_size: int = 1,
    device: str = "cpu",
    prep: PrepLike = AUTO,
    backend: str = "torch",
    candidates: Optional[Sequence[str]] = None,
    cache: bool = True,
    warmup: int = 3,
    runs: int = 20,
    max_seconds: Optional[float] = None,
    seed: int = 0,
    copy_models: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Prepare both models, time them interleaved, return a JSON-able dict.

    ``prep``: ``"auto"`` (each model gets the fastest preparation measured for it, among
    ``candidates``; ``choose_preparation``), a preparation's name, a ``Preparation`` or
    ``PrepOptions`` (both models alike). ``backend``: ``torch``, ``ort`` (both models exported
    to ONNX, BatchNorm folded, timed in ONNX Runtime) or ``both`` (all four timed in one loop;
    ``cross_backend`` compares the best original with the best converted). With ``copy_models``
    the given modules are left untouched (preparation works on copies). ``example_inputs`` (an
    ``ExampleInputs``, the models' arguments, or an input size of one tensor) says how they are fed.

    >>> import torch, bsconv_surgery as bs
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3))
    >>> converted = bs.convert(net, "u", example_inputs=torch.randn(1, 3, 32, 32)).model
    >>> result = bs.benchmark(torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3)),
    ...                       converted, (3, 32, 32), prep="eager", runs=3, warmup=1)
    >>> result["speedup_median"] > 0
    True
    """
    if backend not in BACKENDS:
        raise SurgeryError(f"Unknown backend '{backend}'. Valid backends: {', '.join(BACKENDS)}.")
    dev = torch.device(device)
    if backend != "torch" and dev.type != "cpu":
        raise SurgeryError(f"{arg('backend')} ort runs on CPU here; leave out {arg('device')} cuda.")
    chosen = _as_preparation(prep)
    inputs = as_example_inputs(example_inputs)
    x = inputs.make(batch_size, torch.Generator().manual_seed(seed), device=dev)
    result: Dict[str, Any] = {"backend": backend, "batch_size": batch_size, "input_size": list(inputs.size),
                              "device": str(dev), "threads": torch.get_num_threads(), "preps": {}, "fold": {},
                              "seconds_prepare": {}}
    prepared: Dict[str, Callable] = {}
    feeds: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bsconv-ort-") as folder:
        for name, model in (("original", original), ("converted", converted)):
            m = (copy.deepcopy(model) if copy_models else model).to(dev)
            if backend in ("torch", "both"):
                source = copy.deepcopy(m) if backend == "both" else m
                prepared[name], feeds[name] = _prepare_torch(name, source, chosen, x, dev, candidates=candidates,
                                                             cache=cache, log=log, result=result)
            if backend in ("ort", "both"):
                result.setdefault("ort", {})
                key = name if backend == "ort" else f"{name}_ort"
                prepared[key], feeds[key] = _prepare_ort(name, m, x, Path(folder), result)
        timings = time_interleaved(prepared, feeds, warmup=warmup, runs=runs, max_seconds=max_seconds)
    labels = {p["label"] for p in result["preps"].values()}
    if backend == "ort":
        result["prep"] = "onnxruntime (fused)"
    elif len(labels) == 1:
        result["prep"] = labels.pop()
    else:
        result["prep"] = ", ".join(f"{n}: {p['label']}" for n, p in result["preps"].items())
    result.update(_pair(timings["original"], timings["converted"]))
    if backend == "both":
        result["ort"].update(_pair(timings["original_ort"], timings["converted_ort"]))
        best = {}
        for name in ("original", "converted"):
            # the "torch" form is whatever --prep gave (auto may have picked the ort preparation)
            own = "torch" if result["preps"][name]["name"] != "ort" else "torch backend, ort preparation"
            options = {own: timings[name].median, "ort": timings[f"{name}_ort"].median}
            where = min(options, key=options.get)
            best[name] = {"backend": where, "median_ms": round(options[where] * 1e3, 4)}
        result["cross_backend"] = {**best, "speedup": round(best["original"]["median_ms"] / best["converted"]["median_ms"], 4)}
    return result


def load_average() -> Optional[Tuple[float, float, float]]:
    try:
        return tuple(round(v, 2) for v in os.getloadavg())
    except (OSError, AttributeError):  # not on every platform
        return None


def busy_warning() -> Optional[str]:
    """A warning when other processes keep the CPUs busy (1-minute load above the CPU count); it
    suggests ``--threads 1`` only when torch runs on more threads."""
    load, cpus = load_average(), os.cpu_count() or 1
    if load is None or load[0] <= cpus:
        return None
    if torch.get_num_threads() == 1:
        return (f"The machine is busy (load average {load[0]:.1f} on {cpus} CPUs): wall-clock timings are inflated; "
                "compare the CPU-time speed-up.")
    return (f"The machine is busy (load average {load[0]:.1f} on {cpus} CPUs): wall-clock timings are inflated "
            f"and multi-threaded ones erratic; compare the CPU-time speed-up, or use --threads 1.")


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
