"""Named inference preparations (``PREPARATIONS``), applying one to a model, and the automatic
choice (``prep="auto"``): every available candidate prepared on a copy, timed briefly on the
example input (interleaved, ``timing.py``), the fastest kept.

| name | what it does |
|---|---|
| ``eager`` | eval mode only |
| ``fused`` | + BatchNorm folded into the convs |
| ``channels_last`` | fused, channels_last weights and input |
| ``compiled`` | channels_last, BSConv steps lowered, inductor with frozen weights (``CompiledForInference``) |
| ``aot`` | channels_last, lowered, AOTInductor package (``compile_aot``) |
| ``aot_conv`` | channels_last, AOTInductor, the BSConv steps left as convs (oneDNN) |
| ``ort`` | fused, exported to ONNX, run in ONNX Runtime (``OrtModule``; the ``export`` extra, CPU) |

Lowering pays at small batches (ResNet-18, batch 1: 6% faster than ``aot_conv``) and costs at
large ones (batch 16: 10% slower: oneDNN's 1x1 convs beat the GEMM of the lowered pointwise step
when the activations outgrow the caches), so ``auto`` measures both.

``auto`` measures ``fused``, ``channels_last``, where a C++ compiler is present (CPU) ``aot``
and ``aot_conv`` (``compiled`` when ``torch.export`` cannot capture the model; ``aot_conv`` only
when the model has BSConv steps to lower, else it is ``aot``), and ``ort`` where onnxruntime is
installed (CPU; left out, with the reason, when the export fails or does not match the model),
and keeps the one with the lowest median latency; a compiled or ONNX Runtime candidate must beat
the fastest eager one by ``AUTO_MARGIN`` (the choice never falls on one measured slower than
eager fused). Decisions are cached on disk (``choice_cache_path()``), keyed by the model's
structure, the input, threads, CPU, torch and onnxruntime (its version, or its absence), so the
next ``auto`` on the same model and machine prepares only the winner.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from ..core.errors import SurgeryError, describe_exception
from ..io.documents import load_json
from ..io.files import atomic_file
from ..passes.batchnorm import fold_batchnorm
from ..passes.lowering import lower_bsconv
from ..core.registry import AUTO, PREPARATIONS
from .compiled import COMPILER_HINT, AOTCompiled, CompiledForInference, channels_last_input, compiler_available
from .export import compile_aot
from .ort import ort_module, ort_unavailable, onnxruntime_version
from .timing import cpu_model, time_interleaved

__all__ = ["Preparation", "PREPARATIONS", "AUTO", "AUTO_MARGIN", "resolve_preparation", "apply_preparation",
           "auto_candidates", "choose_fastest", "choose_preparation", "choice_cache_path", "preparation_from_flags"]

#: A compiled or ONNX Runtime candidate is chosen only when its median is this much below the fastest eager one.
AUTO_MARGIN = 0.02


@dataclass(frozen=True)
class Preparation:
    """One way to prepare a model for inference. ``compile``: ``None`` (eager), ``"jit"``
    (``CompiledForInference``) or ``"aot"`` (AOTInductor); ``backend``: ``"torch"`` or ``"ort"``
    (exported to ONNX, run in ONNX Runtime: ``OrtModule``)."""

    name: str
    fuse: bool = False
    channels_last: bool = False
    lower: bool = False
    compile: Optional[str] = None
    summary: str = ""
    compile_options: Tuple[Tuple[str, Any], ...] = ()
    backend: str = "torch"

    @property
    def label(self) -> str:
        """The steps, as the benchmark tables name them: ``fused+channels_last+lowered+compiled``."""
        flags = (("fused", self.fuse), ("channels_last", self.channels_last), ("lowered", self.lower),
                 ("compiled", self.compile == "jit"), ("aot-compiled", self.compile == "aot"),
                 ("onnxruntime", self.backend == "ort"))
        parts = [p for p, on in flags if on]
        return "+".join(parts) if parts else "eager"

    @property
    def compiled(self) -> bool:
        return self.compile is not None

    @property
    def eager(self) -> bool:
        """Runs the PyTorch model as it is (no compiler, no other runtime): ``auto``'s baseline."""
        return not self.compiled and self.backend == "torch"

    def unavailable(self, device: torch.device) -> Optional[str]:
        """Why this preparation cannot run here, or ``None``."""
        if self.backend == "ort":
            if device.type != "cpu":
                return "ONNX Runtime runs on CPU here (its CPUExecutionProvider); leave out --device cuda"
            return ort_unavailable()
        if self.compiled and device.type == "cpu" and not compiler_available():
            return f"inductor on CPU needs a C++ compiler (g++ or clang++) on PATH; {COMPILER_HINT}"
        return None

    def as_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["compile_options"] = dict(self.compile_options)
        d["label"] = self.label
        return d


for _prep in (
    Preparation("eager", summary="eval mode, nothing else"),
    Preparation("fused", fuse=True, summary="BatchNorm folded into the convs"),
    Preparation("channels_last", fuse=True, channels_last=True,
                summary="fused, channels_last weights and input (oneDNN's NHWC kernels)"),
    Preparation("compiled", fuse=True, channels_last=True, lower=True, compile="jit",
                summary="channels_last, BSConv steps lowered, inductor with frozen weights"),
    Preparation("aot", fuse=True, channels_last=True, lower=True, compile="aot",
                summary="channels_last, lowered, AOTInductor package (torch.export, frozen weights)"),
    Preparation("aot_conv", fuse=True, channels_last=True, compile="aot",
                summary="channels_last, AOTInductor package, BSConv steps left as convs (oneDNN; large batches)"),
    Preparation("ort", fuse=True, backend="ort",
                summary="fused, exported to ONNX, run in ONNX Runtime (CPU)"),
):
    PREPARATIONS.register(_prep.name, _prep)

#: The eager candidates of ``auto``, simplest first; the compiled ones follow.
_AUTO_EAGER = ("fused", "channels_last")
_AUTO_COMPILED = ("aot", "aot_conv", "compiled")  # "compiled" only when "aot" is unavailable or fails
_AUTO_OTHER = ("ort",)


def resolve_preparation(name: str, label: Optional[str] = None) -> Preparation:
    """The registered preparation ``name`` (``SurgeryError`` listing the valid names, ``auto``
    among them, for an unknown one)."""
    if name == AUTO:
        raise SurgeryError("'auto' is a choice among preparations, not one; use choose_preparation().")
    if name not in PREPARATIONS:
        raise SurgeryError(f"Unknown {label or 'preparation'} '{name}'. Valid preparations: "
                           f"{', '.join([AUTO, *PREPARATIONS.names()])}.")
    return PREPARATIONS.get(name)


def preparation_from_flags(fuse: bool = True, channels_last: bool = False, compile: bool = False,
                           lower: Optional[bool] = None, aot: bool = False,
                           compile_options: Optional[Dict[str, Any]] = None) -> Preparation:
    """The preparation the keyword flags of ``prepare_for_inference`` (and the benchmark's
    ``--fuse`` / ``--channels-last`` / ``--lower`` / ``--compile`` / ``--aot``) ask for; named
    after the registered one with the same steps when there is one (``custom`` otherwise)."""
    if lower is None:
        lower = compile or aot
    mode = "aot" if aot else ("jit" if compile else None)
    steps = dict(fuse=fuse, channels_last=channels_last, lower=lower, compile=mode, backend="torch")
    name = next((n for n in PREPARATIONS.names()
                 if all(getattr(PREPARATIONS.get(n), k) == v for k, v in steps.items())), "custom")
    return Preparation(name, **steps, compile_options=tuple(sorted((compile_options or {}).items())))


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def apply_preparation(model: nn.Module, prep: Preparation, example_input: Any = None,
                      report: Optional[Dict[str, Any]] = None) -> nn.Module:
    """Prepare ``model`` in place as ``prep`` says and return the module to run: the model
    itself (eager preparations), a ``CompiledForInference``, an ``AOTCompiled`` or an
    ``OrtModule``. ``example_input`` (a tensor or a tuple of arguments) is needed for ``aot``
    and ``ort`` (one tensor); ``report`` receives the folding and lowering reports under
    ``fold`` / ``lower`` (and the ONNX export's facts under ``ort``)."""
    device = _device_of(model)
    reason = prep.unavailable(device)
    if reason:
        raise SurgeryError(f"Preparation '{prep.name}' ({prep.label}) is not available: {reason.rstrip('.')}.")
    if prep.compile == "aot" and example_input is None:
        raise SurgeryError(f"Preparation '{prep.name}' compiles ahead of time and needs an example input.")
    if prep.backend == "ort" and example_input is None:
        raise SurgeryError(f"Preparation '{prep.name}' exports the model to ONNX and needs an example input.")
    model.eval()
    if prep.fuse:
        folded = fold_batchnorm(model)
        if report is not None:
            report["fold"] = folded.as_dict()
    if prep.lower:
        lowered = lower_bsconv(model)
        if report is not None:
            report["lower"] = lowered.as_dict()
    if prep.channels_last:
        model = model.to(memory_format=torch.channels_last)
    options = dict(prep.compile_options)
    if prep.backend == "ort":
        x = example_input[0] if isinstance(example_input, tuple) and len(example_input) == 1 else example_input
        return ort_module(model, x, report=report)
    if prep.compile == "jit":
        return CompiledForInference(model, options, freezing=options.pop("freezing", True),
                                    channels_last=prep.channels_last)
    if prep.compile == "aot":
        x = channels_last_input(example_input) if prep.channels_last else example_input
        return AOTCompiled(model, compile_aot(model, x, options=options or None), channels_last=prep.channels_last)
    return model


def _same_but_lowering(a: Preparation, b: Preparation) -> bool:
    return ((a.fuse, a.channels_last, a.compile, a.backend) == (b.fuse, b.channels_last, b.compile, b.backend)
            and a.lower != b.lower)


def auto_candidates(device: torch.device) -> List[str]:
    """The preparations ``auto`` measures on ``device``, in order (the unavailable ones left out)."""
    names = list(_AUTO_EAGER)
    names += [n for n in (*_AUTO_COMPILED, *_AUTO_OTHER) if PREPARATIONS.get(n).unavailable(device) is None]
    return names


def _auto_left_out(device: torch.device) -> Dict[str, str]:
    """The default candidates of ``auto`` that cannot run on ``device``, each with why."""
    reasons = {n: PREPARATIONS.get(n).unavailable(device) for n in (*_AUTO_COMPILED, *_AUTO_OTHER)}
    return {n: r for n, r in reasons.items() if r}


def choose_fastest(medians: Dict[str, float], compiled: Sequence[str] = (), margin: float = AUTO_MARGIN) -> str:
    """The name with the lowest median latency, except that a name in ``compiled`` (the compiled
    and ONNX Runtime candidates) must be at least ``margin`` (relative) faster than the fastest
    of the others to win. The fastest of the
    others is never beaten by a slower candidate, so the choice is never slower than it."""
    eager = {n: t for n, t in medians.items() if n not in compiled}
    if not eager:
        return min(medians, key=medians.get)
    best_eager = min(eager, key=eager.get)
    best = min(medians, key=medians.get)
    if best in compiled and medians[best] > (1.0 - margin) * medians[best_eager]:
        return best_eager
    return best


def _signature(model: nn.Module, example_input: Any) -> Dict[str, Any]:
    """What a cached choice depends on: the model's class and parameter/buffer names and shapes
    (not their values), the input's shapes, dtypes and layout, threads, CPU, torch, onnxruntime."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    for m in model.modules():
        h.update(type(m).__qualname__.encode())
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    inputs = [[list(a.shape), str(a.dtype), list(a.stride()), a.device.type] if isinstance(a, torch.Tensor) else repr(a)
              for a in args]
    return {"model": h.hexdigest()[:20], "inputs": inputs, "threads": torch.get_num_threads(), "cpu": cpu_model(),
            "torch": torch.__version__, "onnxruntime": onnxruntime_version()}


def choice_cache_path() -> Path:
    """Where ``auto`` keeps its decisions: ``$BSCONV_SURGERY_CACHE`` or ``~/.cache/bsconv-surgery``,
    file ``prep-choices.json``."""
    root = os.environ.get("BSCONV_SURGERY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bsconv-surgery")
    return Path(root) / "prep-choices.json"


def _cache_key(signature: Dict[str, Any], candidates: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps([signature, list(candidates)], sort_keys=True).encode()).hexdigest()[:24]


class _CachedCandidate(BaseModel):
    """What ``auto`` noted about one candidate (the report's ``candidates`` entries)."""

    model_config = ConfigDict(strict=True, extra="allow")
    label: str = ""
    median_ms: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    prepare_s: Optional[float] = Field(None, ge=0, allow_inf_nan=False)
    unavailable: Optional[str] = None
    failed: Optional[str] = None
    same_as: Optional[str] = None


class _CachedChoice(BaseModel):
    """One decision of the choice cache (``signature`` and ``date`` are kept as they are)."""

    model_config = ConfigDict(strict=True, extra="allow")
    chosen: str
    candidates: Dict[str, _CachedCandidate] = {}


def _read_cache(path: Path, say: Callable[[str], None] = lambda message: None) -> Dict[str, Dict[str, Any]]:
    """The valid decisions of the choice cache, by key. A file that cannot be read, is not JSON or
    not a mapping, and entries of the wrong shape are left out (``say`` hears why): the choice is
    measured again and the next write drops them."""
    try:
        data = load_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        say(f"auto: ignoring the choice cache {path} ({describe_exception(exc, 120)}); measuring again")
        return {}
    if not isinstance(data, dict):
        kind = {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}.get(
            type(data), "null")
        say(f"auto: ignoring the choice cache {path} (it holds {kind}, not a mapping of decisions); measuring again")
        return {}
    entries, damaged = {}, 0
    for key, value in data.items():
        try:
            entries[key] = _CachedChoice.model_validate(value).model_dump(exclude_none=True)
        except ValidationError:
            damaged += 1
    if damaged:
        say(f"auto: ignoring {damaged} damaged decision(s) in the choice cache {path}")
    return entries


def _write_cache(path: Path, key: str, entry: Dict[str, Any]) -> None:
    data = _read_cache(path)
    data[key] = entry
    try:
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    except SurgeryError:
        pass  # a cache that cannot be written is not an error


def choose_preparation(
    model: nn.Module,
    example_input: Any,
    *,
    candidates: Optional[Sequence[str]] = None,
    cache: bool = True,
    rounds: int = 10,
    max_seconds: float = 3.0,
    timer: Optional[Callable[..., Dict[str, Any]]] = None,
    report: Optional[Dict[str, Any]] = None,
    log: Optional[Callable[[str], None]] = None,
) -> Tuple[nn.Module, Preparation]:
    """Prepare a copy of ``model`` with each candidate (default ``auto_candidates``), time them
    interleaved on ``example_input`` (``rounds`` rounds at most, ``max_seconds`` of timed rounds)
    and return the fastest prepared module and its ``Preparation`` (``choose_fastest``).
    ``model`` itself is left as it is. ``timer`` replaces ``time_interleaved`` (tests).
    ``report["prep"]`` receives the choice and every candidate's median or why it was left out;
    ``log`` (e.g. ``print``) hears what is being prepared (compiling takes a while).
    With ``cache`` a decision for the same model structure, input, threads, CPU, torch and
    onnxruntime is reused from ``choice_cache_path()`` without measuring (and measured again when
    the cached choice fails to prepare). Without ``candidates``, the default ones that cannot run
    here are listed in the report as unavailable, with the reason."""
    device = _device_of(model)
    names = list(candidates) if candidates else auto_candidates(device)
    for n in names:
        resolve_preparation(n)
    say = log or (lambda message: None)
    signature = _signature(model, example_input)
    key = _cache_key(signature, names)
    path = choice_cache_path()
    info: Dict[str, Any] = {"auto": True, "candidates": {}, "cached": False}
    if report is not None:
        report["prep"] = info
    if cache:
        hit = _read_cache(path, say).get(key)
        if hit and hit["chosen"] in names:
            prep = resolve_preparation(hit["chosen"])
            say(f"auto: {prep.name} ({prep.label}), the choice cached in {path}")
            sub: Dict[str, Any] = {}
            try:
                prepared = apply_preparation(copy.deepcopy(model), prep, example_input, report=sub)
            except Exception as exc:  # the cached winner no longer prepares: measure again
                say(f"auto: the cached choice {prep.name} failed ({describe_exception(exc)}); measuring again")
            else:
                info.update(chosen=prep.name, label=prep.label, candidates=hit["candidates"], cached=True)
                info.update({k: v for k, v in sub.items() if k in ("fold", "lower", "ort")})
                return prepared, prep
    prepared: Dict[str, nn.Module] = {}
    inputs: Dict[str, Any] = {}
    compiled: List[str] = []
    lowered_nothing = set()
    if not candidates:
        for name, reason in _auto_left_out(device).items():
            info["candidates"][name] = {"label": resolve_preparation(name).label, "unavailable": reason}
    for name in names:
        prep = resolve_preparation(name)
        reason = prep.unavailable(device)
        if reason:
            info["candidates"][name] = {"label": prep.label, "unavailable": reason}
            continue
        if name == "compiled" and "aot" in prepared:
            continue  # the same compiled code as aot, with a Python wrapper: only a fallback
        twin = next((n for n in prepared if n in lowered_nothing and _same_but_lowering(resolve_preparation(n), prep)),
                    None)
        if twin:
            info["candidates"][name] = {"label": prep.label, "same_as": twin}
            continue  # nothing to lower in this model: the same code as its lowered twin
        say(f"auto: preparing {name} ({prep.label}) ...")
        t0 = time.perf_counter()
        x = channels_last_input(example_input) if prep.channels_last else example_input
        try:
            sub: Dict[str, Any] = {}
            module = apply_preparation(copy.deepcopy(model), prep, x, report=sub)
            if prep.lower and not sub["lower"]["lowered"]:
                lowered_nothing.add(name)
            with torch.inference_mode():
                module(*(x if isinstance(x, tuple) else (x,)))  # compiles a jit candidate
        except SurgeryError as exc:
            info["candidates"][name] = {"label": prep.label, "failed": str(exc)}
            continue
        except Exception as exc:  # a candidate that fails to compile is left out, not fatal
            info["candidates"][name] = {"label": prep.label, "failed": describe_exception(exc)}
            continue
        info["candidates"][name] = {"label": prep.label, "prepare_s": round(time.perf_counter() - t0, 2)}
        prepared[name], inputs[name] = module, x
        if not prep.eager:
            compiled.append(name)
    if not prepared:
        raise SurgeryError("No preparation could be applied to this model: "
                           + "; ".join(f"{n}: {c.get('failed') or c.get('unavailable')}"
                                       for n, c in info["candidates"].items()))
    say(f"auto: timing {', '.join(prepared)} ...")
    timings = (timer or time_interleaved)(prepared, inputs, warmup=2, runs=rounds, min_runs=3, max_seconds=max_seconds)
    medians = {n: timings[n].median for n in prepared}
    for n, t in medians.items():
        info["candidates"][n]["median_ms"] = round(t * 1e3, 4)
    chosen = choose_fastest(medians, compiled)
    prep = resolve_preparation(chosen)
    info.update(chosen=chosen, label=prep.label)
    say(f"auto: {chosen} ({prep.label}), median "
        + ", ".join(f"{n} {t * 1e3:.2f} ms" for n, t in sorted(medians.items(), key=lambda kv: kv[1])))
    if cache:
        _write_cache(path, key, {"chosen": chosen, "candidates": info["candidates"], "signature": signature,
                                 "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    return prepared[chosen], prep
