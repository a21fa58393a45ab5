"""``convert()``: trace, discover, run the variant's passes on the eager model, count, report."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields
from fractions import Fraction
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .counting import Budget, _example_input, count_budget, count_params, counter_info
from .errors import SurgeryError, describe_exception
from .fidelity import measure_fidelity, parse_calib
from .fx.discovery import discover
from .fx.modules import temporary_mode
from .fx.tracing import trace_model
from .initializers import SVDInit
from .io.saving import WEIGHTS, load_weights, read_surgery_json, save_converted
from .models.zoo import ModelSpec, create_model, default_input_size, parse_model_spec
from .passes import BottleneckToBSConvS, ConvToBSConv, DSCToBSConvU, SurgeryContext, SurgeryPass

__all__ = [
    "SurgeryOptions",
    "ConversionResult",
    "convert",
    "parse_kernel_sizes",
    "parse_p",
    "VARIANTS",
    "register_variant",
    "load_converted",
]


def parse_kernel_sizes(text: Union[str, Iterable]) -> FrozenSet[Tuple[int, int]]:
    """``"3,5"`` -> ``{(3, 3), (5, 5)}``; ``"1x7"`` selects a rectangular ``1x7`` kernel."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    sizes = set()
    for item in items:
        try:
            if isinstance(item, (tuple, list)):
                kh, kw = (int(v) for v in item)
            elif isinstance(item, int):
                kh = kw = item
            elif "x" in str(item):
                kh, kw = (int(v) for v in str(item).lower().split("x"))
            else:
                kh = kw = int(item)
        except (TypeError, ValueError):
            kh = kw = 0
        if kh < 1 or kw < 1:
            raise SurgeryError(
                f"Bad kernel size '{item}' in '{text}': expected positive integers such as 3,5 "
                "(k selects k x k kernels, 1x7 a rectangular one)."
            )
        sizes.add((kh, kw))
    if not sizes:
        raise SurgeryError("--kernel-sizes needs at least one size, e.g. 3,5.")
    return frozenset(sizes)


def parse_p(value: Union[str, float, Fraction]) -> Union[Fraction, str]:
    """``0.25``, ``"1/6"`` or ``"auto"`` -> an exact ``Fraction`` in (0, 1], or ``"auto"``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        p = Fraction(value.strip()) if isinstance(value, str) else Fraction(value).limit_denominator(1_000_000)
    except (ValueError, ZeroDivisionError, TypeError):
        p = None
    if p is None or not 0 < p <= 1:
        raise SurgeryError(f"Bad p '{value}': expected a number in (0, 1] such as 0.25 or 1/6, or 'auto'.")
    return p


@dataclass(frozen=True)
class SurgeryOptions:
    """What a conversion does; everything here is stored in ``surgery.json``."""

    variant: str = "u"
    kernel_sizes: Optional[FrozenSet[Tuple[int, int]]] = None
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    p: Union[Fraction, str] = Fraction(1, 4)
    with_bn: bool = False
    min_mid_channels: int = 4
    init: str = "default"

    @classmethod
    def create(cls, variant: str = "u", **options: Any) -> "SurgeryOptions":
        """Validate and normalise user options; unknown names and bad values raise ``SurgeryError``."""
        valid = [f.name for f in fields(cls) if f.name != "variant"]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise SurgeryError(f"Unknown option(s) {', '.join(unknown)}. Valid options: {', '.join(valid)}.")
        if variant not in VARIANTS:
            raise SurgeryError(f"Unknown variant '{variant}'. Valid variants: {', '.join(sorted(VARIANTS))}.")
        if options.get("kernel_sizes") is not None:
            options["kernel_sizes"] = parse_kernel_sizes(options["kernel_sizes"])
        if "p" in options:
            options["p"] = parse_p(options["p"])
        for key in ("include", "exclude"):
            if key in options:
                value = options[key]
                options[key] = (value,) if isinstance(value, str) else tuple(value or ())
        if options.get("min_mid_channels", 4) < 1:
            raise SurgeryError("min_mid_channels must be at least 1.")
        init = options.get("init", "default")
        if init not in INITIALIZERS:
            raise SurgeryError(f"Unknown init '{init}'. Valid inits: {', '.join(sorted(INITIALIZERS))}.")
        return cls(variant=variant, **options)

    def to_json(self) -> Dict[str, Any]:
        out = asdict(self)
        out["kernel_sizes"] = None if self.kernel_sizes is None else sorted(list(k) for k in self.kernel_sizes)
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        out["p"] = str(self.p)
        return out

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "SurgeryOptions":
        data = dict(data)
        return cls.create(data.pop("variant", "u"), **data)


#: Passes run by each variant, in order; earlier passes claim their sites first.
VARIANTS: Dict[str, Callable[[SurgeryOptions], List[SurgeryPass]]] = {}

#: Weight initialisers for converted sites: name -> callable(conv, new) -> optional report extras,
#: or None (fresh init). An optional ``dsc`` method initialises reordered pairs (see ``init.py``).
INITIALIZERS: Dict[str, Optional[Callable]] = {"default": None, "svd": SVDInit()}


def register_variant(name: str, make_passes: Callable[[SurgeryOptions], List[SurgeryPass]]) -> None:
    VARIANTS[name] = make_passes


register_variant("u", lambda o: [DSCToBSConvU(INITIALIZERS[o.init]), ConvToBSConv("u", INITIALIZERS[o.init])])
register_variant("s", lambda o: [BottleneckToBSConvS(), ConvToBSConv("s", INITIALIZERS[o.init])])


@dataclass
class ConversionResult:
    """``model`` is the user's own module with submodules swapped; ``report`` is a JSON-able dict."""

    model: nn.Module
    report: Dict[str, Any]
    options: SurgeryOptions
    source: Optional[Dict[str, Any]] = None
    input_size: Tuple[int, int, int] = (3, 224, 224)

    def save(self, out_dir, force: bool = False):
        """Write ``model.safetensors`` and ``surgery.json`` to ``out_dir`` (atomic, see ``io/saving.py``)."""
        return save_converted(self, out_dir, force=force)


def _output_shapes(model: nn.Module, x: torch.Tensor) -> Any:
    with temporary_mode(model, training=False), torch.no_grad():
        out = model(x)
    if isinstance(out, torch.Tensor):
        return list(out.shape)
    if isinstance(out, dict):
        return {k: list(v.shape) for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        return [list(v.shape) for v in out if isinstance(v, torch.Tensor)]
    return None


def _model_label(model: nn.Module, source: Optional[Dict[str, Any]]) -> str:
    return source["spec"] if source else type(model).__name__


def _attach_site_macs(records: List[dict], before: Budget, after: Budget) -> None:
    """A site's MACs: those of its module, or summed over ``rec["modules"]`` (a reordered pair)."""

    def macs(budget: Budget, names: List[str]) -> Optional[int]:
        if budget.macs is None:
            return None
        found = [budget.by_module[n] for n in names if n in budget.by_module]
        return sum(found) if found else None

    for rec in records:
        names = rec.get("modules") or [rec["name"]]
        rec["macs_before"] = macs(before, names)
        rec["macs_after"] = macs(after, names)


def _budget_fields(prefix: str, budget: Optional[Budget]) -> Dict[str, Any]:
    if budget is None:
        return {f"macs_{prefix}": None}
    out = {
        f"macs_{prefix}": budget.macs,
        f"conv_macs_{prefix}": budget.conv_macs,
        f"unsupported_ops_{prefix}": budget.unsupported_ops,
        f"uncounted_compute_ops_{prefix}": budget.uncounted_compute_ops,
    }
    if budget.error:
        out[f"macs_error_{prefix}"] = budget.error
    return out


def convert(
    model: Union[nn.Module, str],
    variant: str = "u",
    *,
    input_size: Optional[Sequence[int]] = None,
    num_classes: Optional[int] = None,
    checkpoint=None,
    count: bool = True,
    source: Optional[Union[str, ModelSpec]] = None,
    calib: Optional[str] = None,
    calib_batches: int = 4,
    **options: Any,
) -> ConversionResult:
    """Convert ``model`` (an ``nn.Module``, or a spec such as ``"timm:resnet18"``) in place.

    ``variant`` is ``"u"`` (standard convs and depthwise-separable pairs -> BSConv-U) or ``"s"``
    (standard convs -> BSConv-S, linear bottlenecks -> BSConv-S projections). Options:
    ``kernel_sizes``, ``include``/``exclude`` (globs on qualified names), ``p``, ``with_bn``,
    ``min_mid_channels``, ``init``. With ``calib`` (``digits``, ``random``, ``imagefolder:PATH``) a
    copy of the original is kept and ``report["fidelity"]`` compares the two on ``calib_batches``
    batches (see ``fidelity.py``). Returns a ``ConversionResult`` with the model and report.
    """
    opts = SurgeryOptions.create(variant, **options)
    if calib is not None:
        calib = parse_calib(calib)  # bad names and missing folders fail before any work
    spec = None
    if isinstance(model, str):
        spec = parse_model_spec(model)
        model = create_model(spec, num_classes=num_classes, checkpoint=checkpoint)
    elif source is not None:
        spec = source if isinstance(source, ModelSpec) else parse_model_spec(source)
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"convert() takes an nn.Module or a model spec string, not {type(model).__name__}.")
    src = None
    if spec is not None:
        classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
        src = {"spec": str(spec), "num_classes": classes}
    size = tuple(int(v) for v in input_size) if input_size is not None else default_input_size(spec, model)

    started = time.perf_counter()
    params_before = count_params(model)
    before = count_budget(model, size) if count else None
    x = _example_input(model, size) if count else None
    try:
        shape_before = _output_shapes(model, x) if count else None
    except Exception as exc:  # the user's model at the user's (or default) input size
        raise SurgeryError(
            f"The model does not run on a {'x'.join(map(str, size))} input before any surgery "
            f"({describe_exception(exc, 200)}). Pass an input size it accepts with --input-size C,H,W."
        ) from exc
    original = copy.deepcopy(model) if calib is not None else None

    t0 = time.perf_counter()
    trace = trace_model(model)
    discovery = discover(model, trace)
    ctx = SurgeryContext(trace, discovery, opts)
    for surgery_pass in VARIANTS[opts.variant](opts):
        surgery_pass.transform(model, ctx)
    surgery_seconds = time.perf_counter() - t0

    after = count_budget(model, size) if count else None
    shape_after = _output_shapes(model, x) if count else None
    if count and shape_before != shape_after:
        raise SurgeryError(f"Internal check failed: the conversion changed the output shape {shape_before} -> {shape_after}.")
    if count:
        _attach_site_macs(ctx.replaced, before, after)

    report: Dict[str, Any] = {
        "model": _model_label(model, src),
        "variant": opts.variant,
        "options": opts.to_json(),
        "input_size": list(size),
        "tracing": {
            "method": "fx" if discovery.traced else "named_modules fallback",
            "error": discovery.trace_error,
        },
        "conv_census": discovery.census(),
        "params_before": params_before,
        "params_after": count_params(model),
        **_budget_fields("before", before),
        **_budget_fields("after", after),
        "counter": counter_info(),
        "output_shape": shape_after,
        "replaced": ctx.replaced,
        "skipped": ctx.skipped,
        "other_convs": discovery.other_convs,
        "hidden_convs": [
            {"name": c.name, "cls": c.cls, "kind": c.kind, "reason": c.hidden_reason}
            for c in discovery.convs.values() if c.hidden
        ],
        "seconds": {"surgery": round(surgery_seconds, 4), "total": round(time.perf_counter() - started, 4)},
    }
    if calib is not None:
        report["fidelity"] = measure_fidelity(original, model, calib, size, batches=calib_batches)
    if opts.p == "auto" and opts.variant == "s":
        chosen = [r["p"] for r in ctx.replaced if r["kind"] == "conv->bsconv_s"]
        report["p_auto"] = {
            "rule": "per conv, the p = M'/M whose BSConv-S parameter count is closest to the conv's own",
            "chosen": {p: chosen.count(p) for p in sorted(set(chosen), key=Fraction)},
        }
    if not discovery.traced:
        report["tracing"]["note"] = (
            "FX tracing failed, so only standalone standard convs found by named_modules() were "
            "considered; depthwise-separable pairs and bottlenecks need the graph."
        )
    return ConversionResult(model, report, opts, src, size)


def load_converted(directory) -> nn.Module:
    """Rebuild a model saved by ``convert --out DIR`` and load its weights (bit-identical)."""
    directory = Path(directory)
    meta = read_surgery_json(directory)
    if not (directory / WEIGHTS).is_file():
        raise SurgeryError(f"'{directory}' has no {WEIGHTS}.")
    spec = parse_model_spec(meta["source"]["spec"])
    model = create_model(spec, num_classes=meta["source"].get("num_classes"))
    options = SurgeryOptions.from_json(meta["options"]).to_json()
    options["init"] = "default"  # the weights are loaded below; no need to initialise them
    variant = options.pop("variant")
    convert(model, variant, count=False, **options)
    load_weights(model, directory, meta)
    return model
