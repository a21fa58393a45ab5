"""``convert()``: trace, discover, run the variant's passes on the eager model, count, report;
``load_converted()``: rebuild a conversion saved with ``ConversionResult.save``.

The data flow of ``convert``: spec -> source model (``models/``) -> trace and discover
(``fx/``) -> the variant's passes (``passes/``) -> count before and after (``counting.py``) ->
``ConversionReport`` (``records.py``) -> ``ConversionResult`` (-> ``io/saving.py``).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from torch import nn

from . import initializers  # noqa: F401  (registers the "default" and "svd" initialisers)
from .bounds import flag
from .counting import Budget, check_runs, count_budget, count_params, counter_info, output_structure
from .errors import SurgeryError
from .fidelity import DEFAULT_BATCH_SIZE as FIDELITY_BATCH, CalibSource, ReferenceOutputs, calibration_label, load_calibration
from .io.saving import load_weights, read_surgery_json, save_converted
from .memory import check_memory
from .models.checkpoints import check_model_finite, file_sha256, load_checkpoint
from .fx.discovery import Discovery
from .models.inputs import InputFamily, input_family
from .models.zoo import (ModelSpec, build_source_model, check_input_size, check_num_classes, default_input_size,
                         model_from_source, parse_input_size, parse_model_spec)
from .options import SurgeryOptions, parse_kernel_sizes, parse_p
from .passes import BottleneckToBSConvS, ConvToBSConv, DSCToBSConvU, SurgeryContext, SurgeryPass
from .recalibration import recalibrate_batchnorm
from .records import BudgetNumbers, ConversionReport, ModelSource, TracingInfo
from .registry import INITIALIZERS, VARIANTS
from .selection import parse_target
from .sensitivity import LOSS_KEY, select_for_targets

__all__ = [
    "SurgeryOptions",
    "ConversionResult",
    "convert",
    "load_converted",
    "parse_kernel_sizes",
    "parse_p",
    "VARIANTS",
    "INITIALIZERS",
    "register_variant",
]


def register_variant(name: str, make_passes: Callable[[SurgeryOptions], List[SurgeryPass]]) -> None:
    """``make_passes(options)`` gives the passes of variant ``name``, run in order; earlier passes
    claim their sites first."""
    VARIANTS.register(name, make_passes)


register_variant("u", lambda o: [DSCToBSConvU(INITIALIZERS.get(o.init)), ConvToBSConv("u", INITIALIZERS.get(o.init))])
register_variant("s", lambda o: [BottleneckToBSConvS(), ConvToBSConv("s", INITIALIZERS.get(o.init))])


@dataclass
class ConversionResult:
    """``model`` is the user's own module with submodules swapped; ``report`` what was done;
    ``source`` where the model came from (``None`` for a module given without a spec or weights)."""

    model: nn.Module
    report: ConversionReport
    options: SurgeryOptions
    source: Optional[ModelSource] = None
    input_size: Tuple[int, ...] = (3, 224, 224)
    input_family: str = "tensor"

    @property
    def inputs(self) -> InputFamily:
        """How the model is fed (``models/inputs.py``): example arguments, "the output"."""
        return input_family(self.input_family)

    def save(self, out_dir: Union[str, Path], force: bool = False) -> Path:
        """Write ``model.safetensors`` and ``surgery.json`` to ``out_dir`` (atomic, see
        ``io/saving.py``); the report then names where it was saved (``saved_to``)."""
        path = save_converted(self, out_dir, force=force)
        self.report.saved_to = str(out_dir)
        return path


def _tracing_info(discovery: Discovery) -> TracingInfo:
    """How the graph was found, and the parts that traced when the whole model did not."""
    if discovery.traced:
        method = "fx"
    elif discovery.parts:
        method = "fx parts"
    else:
        method = "named_modules fallback"
    standalone = [p for p in discovery.parts if p and p not in discovery.leaf_parts]
    info = TracingInfo(method, discovery.trace_error, parts=standalone if method == "fx parts" else [],
                       fallbacks=dict(discovery.fallbacks), leaf_parts=list(discovery.leaf_parts))
    if method == "named_modules fallback":
        info.note = ("FX tracing failed for the model and every submodule that holds convs, so only standalone "
                     "standard convs found by named_modules() were considered; depthwise-separable pairs and "
                     "bottlenecks need the graph.")
    elif method == "fx parts":
        untraced = len(discovery.untraced)
        info.note = (f"The whole model does not trace; {len(standalone)} submodule(s) traced on their own (parts) and "
                     "discovery and the passes ran on each: depthwise-separable pairs and bottlenecks are found "
                     "inside a part, not across parts. "
                     + (f"{untraced} conv(s) outside every part were taken from named_modules() (standalone standard "
                        "convs only)." if untraced else "Every conv lies inside a traced part."))
    return info


def _site_macs(budget: Budget, names: List[str]) -> Optional[int]:
    """A site's MACs: those of its module, or summed over its modules (a reordered pair)."""
    if budget.macs is None:
        return None
    found = [budget.by_module[n] for n in names if n in budget.by_module]
    return sum(found) if found else None


def _numbers(budget: Optional[Budget]) -> Optional[BudgetNumbers]:
    if budget is None:
        return None
    return BudgetNumbers(budget.macs, budget.conv_macs, dict(budget.unsupported_ops), budget.uncounted_compute_ops,
                         budget.error)


def _source_model(model: Union[nn.Module, str], num_classes: Optional[int], checkpoint, source, pretrained: bool,
                  weights: Optional[str]) -> Tuple[nn.Module, Optional[ModelSource]]:
    """The module to convert and where it came from: a spec is parsed once and built (random
    init, the checkpoint's weights, or published weights: ``models.zoo.build_source_model``); a
    module given with a checkpoint gets those weights loaded."""
    if isinstance(model, str):
        return build_source_model(parse_model_spec(model), num_classes=num_classes, checkpoint=checkpoint,
                                  pretrained=pretrained, weights=weights)
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"convert() takes an nn.Module or a model spec string, not {type(model).__name__}.")
    if pretrained or weights is not None:
        raise SurgeryError("pretrained/weights apply to a model spec such as 'timm:resnet50' (built with its "
                           "published weights); a module you pass keeps the weights it has.")
    spec = None
    if source is not None:
        spec = source if isinstance(source, ModelSpec) else parse_model_spec(source)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    if spec is None and checkpoint is None:
        return model, None
    classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
    return model, ModelSource(
        str(spec) if spec is not None else None,
        classes if spec is not None else None,
        str(checkpoint) if checkpoint is not None else None,
        file_sha256(checkpoint) if checkpoint is not None else None,
    )


def convert(
    model: Union[nn.Module, str],
    variant: Union[str, SurgeryOptions] = "u",
    *,
    input_size: Optional[Sequence[int]] = None,
    num_classes: Optional[int] = None,
    checkpoint: Optional[Union[str, Path]] = None,
    count: bool = True,
    source: Optional[Union[str, ModelSpec]] = None,
    calib: Optional[CalibSource] = None,
    calib_batches: Optional[int] = None,
    family: Optional[str] = None,
    memory_check: bool = True,
    pretrained: bool = False,
    weights: Optional[str] = None,
    target_macs: Optional[Union[str, float, int]] = None,
    target_params: Optional[Union[str, float, int]] = None,
    recalibrate_bn: bool = False,
    output: Optional[Union[int, str]] = None,
    **options: Any,
) -> ConversionResult:
    """Convert ``model`` (an ``nn.Module``, or a spec such as ``"timm:resnet18"``) in place.

    ``variant`` is ``"u"`` (standard convs and depthwise-separable pairs -> BSConv-U) or ``"s"``
    (standard convs -> BSConv-S, linear bottlenecks -> BSConv-S projections), with the options
    ``kernel_sizes``, ``include``/``exclude`` (globs on qualified names), ``p``, ``with_bn``,
    ``min_mid_channels``, ``init`` as keywords; or a ``SurgeryOptions`` that holds them all.
    ``init="auto"`` (the command line's default) is ``svd`` when trained weights are loaded (a
    checkpoint, ``pretrained`` or ``weights``), else ``default``. ``checkpoint`` weights are
    loaded into the source model (built from the spec, or the module given) and recorded with
    their SHA-256 in ``result.source``; ``source`` names the spec of a module built elsewhere, so
    the result can be saved and rebuilt. With ``calib`` (``digits``,
    ``random``, ``imagefolder:PATH``, ``images:PATH``, or any iterable of batches: see
    ``fidelity.py``) a copy of the original is kept and ``report.fidelity`` compares the two on
    ``calib_batches`` batches (named sets: 4 of 16 by default; iterables: all); ``output`` picks
    the decision output of a multi-output model. ``family`` says how a module given without a
    spec is fed (``models/inputs.py``; default ``tensor``: one tensor of ``input_size`` of any
    rank); a spec's family is its own. ``input_size`` is ``C,H,W``, ``C,T,H,W`` for video, as a
    sequence or the text ``"C,H,W"`` (as ``--input-size`` takes it). An input whose forward pass
    cannot fit in memory is refused before it runs unless ``memory_check=False`` (see
    ``memory.py``). ``pretrained`` builds a spec with its published weights (timm's tag in the
    spec such as ``"timm:resnet50.a1_in1k"``, torchvision's ``weights`` entry, default
    ``DEFAULT``), found in the libraries' caches (``models/pretrained.py``);
    ``result.source.pretrained`` records which, and ``num_classes`` other than theirs gives a fresh
    head (``result.source.head_replaced``).

    ``target_macs`` / ``target_params`` (a fraction of the original such as ``0.5``, or a count
    such as ``"300M"``): convert the set of candidate sites that reaches the budget with the least
    summed single-site loss, measured on ``calib`` (else ranked by filter energy kept); the chosen
    sites become ``options.sites`` (stored, so ``load_converted`` rebuilds them without measuring)
    and ``report.selection`` says what was asked, reached, chosen, predicted and measured
    (``sensitivity.py``, ``selection.py``). ``recalibrate_bn`` re-estimates every BatchNorm's running
    statistics on ``calib`` after the surgery (``recalibration.py``); ``report.recalibration`` holds
    the fidelity before, ``report.fidelity`` the one after.
    """
    if isinstance(variant, SurgeryOptions):
        if options:
            raise SurgeryError("Pass the options in the SurgeryOptions or as keywords, not both.")
        opts = variant
    else:
        opts = SurgeryOptions.create(variant, **options)
    check_num_classes(num_classes)
    for name, value in (("count", count), ("memory_check", memory_check), ("pretrained", pretrained),
                        ("recalibrate_bn", recalibrate_bn)):
        flag(value, name)
    given_size = parse_input_size(input_size) if input_size is not None else None
    targets = [parse_target(value, metric) for metric, value in (("macs", target_macs), ("params", target_params))
               if value is not None]
    if targets and not count:
        raise SurgeryError("A budget target needs the counts: convert(..., count=True).")
    if recalibrate_bn and calib is None:
        raise SurgeryError("--recalibrate-bn needs calibration data: pass --calib SET.")
    if isinstance(calib, str):
        calibration_label(calib)  # bad names and missing folders fail before any work
    model, src = _source_model(model, num_classes, checkpoint, source, pretrained, weights)
    if opts.init == "auto":  # trained weights: start from them (README, "Keeping a trained model's accuracy")
        opts = dataclasses.replace(opts, init="svd" if src is not None and src.trained else "default")
    spec = parse_model_spec(src.spec) if src is not None and src.spec is not None else None
    inputs = spec.inputs if spec is not None else input_family(family)
    size = default_input_size(spec, model) if given_size is None else given_size
    size = check_input_size(spec, size, inputs.name)
    if count and memory_check:
        check_memory(model, size, batch=FIDELITY_BATCH if calib is not None else 1, family=inputs)
    data = load_calibration(calib, size, calib_batches, family=inputs) if calib is not None else None
    calib_label = calibration_label(calib) if calib is not None else None

    started = time.perf_counter()
    params_before = count_params(model)
    before = count_budget(model, size, family=inputs) if count else None
    x, shape_before = check_runs(model, size, inputs) if count else (None, None)
    if INITIALIZERS.get(opts.init) is not None:  # an initialiser that starts from the model's weights
        check_model_finite(model, src)
    original = copy.deepcopy(model) if data is not None and not targets else None
    selection = None
    if targets:
        selection = select_for_targets(model, opts, size, targets, data, calib_label, recalibrate_bn, output, before,
                                       family=inputs)
        opts = dataclasses.replace(opts, sites=tuple(selection.sites))

    t0 = time.perf_counter()
    ctx = SurgeryContext.for_model(model, opts, input_size=size, family=inputs)
    for surgery_pass in VARIANTS.get(opts.variant)(opts):
        surgery_pass.transform(model, ctx)
    surgery_seconds = time.perf_counter() - t0
    if opts.sites is not None:
        missing = sorted(set(opts.sites) - {r.name for r in ctx.replaced})
        if missing:
            raise SurgeryError(f"Site(s) {', '.join(missing)} of the exact site list are not candidates of variant "
                               f"{opts.variant} with these options (converted: {len(ctx.replaced)}).")

    after = count_budget(model, size, family=inputs) if count else None
    shape_after = output_structure(model, x, inputs) if count else None
    if count and shape_before != shape_after:
        raise SurgeryError(f"Internal check failed: the conversion changed the output shape {shape_before} -> {shape_after}.")
    if count:
        for record in ctx.replaced:
            names = record.module_names
            record.macs_before, record.macs_after = _site_macs(before, names), _site_macs(after, names)
            record.macs_counted = True

    discovery = ctx.discovery
    report = ConversionReport(
        model=src.spec if src is not None and src.spec is not None else type(model).__name__,
        options=opts,
        input_size=size,
        tracing=_tracing_info(discovery),
        conv_census=discovery.census(),
        params_before=params_before,
        params_after=count_params(model),
        before=_numbers(before),
        after=_numbers(after),
        counter=counter_info(),
        output_shape=shape_after,
        replaced=ctx.replaced,
        skipped=ctx.skipped,
        other_convs=discovery.other_convs,
        hidden_convs=[
            {"name": c.name, "cls": c.cls, "kind": c.kind, "reason": c.hidden_reason}
            for c in discovery.convs.values() if c.hidden
        ],
        seconds={"surgery": round(surgery_seconds, 4), "total": round(time.perf_counter() - started, 4)},
        source=src,
        input_family=inputs.name,
    )
    if data is not None:
        reference = selection.reference if selection is not None and selection.reference is not None else \
            ReferenceOutputs(original, data, calib_label, output, inputs)
        report.fidelity = reference.compare(model)
        if recalibrate_bn:
            done = recalibrate_batchnorm(model, data)
            report.recalibration = dict(done.to_json(), fidelity_before=report.fidelity)
            report.fidelity = reference.compare(model) if done.batchnorms else report.fidelity
    if selection is not None:
        report.selection = selection.report
        for target in report.selection["targets"]:
            reached = report.params_after if target["metric"] == "params" else report.macs_after
            target["reached"] = reached
            target["reached_fraction"] = reached / target["original"] if reached is not None and target["original"] else None
            target["met"] = reached is not None and reached <= target["limit"]
        if report.fidelity is not None:
            report.selection["measured_loss"] = report.fidelity[LOSS_KEY]
            if report.recalibration is not None:
                report.selection["measured_loss_before_recalibration"] = report.recalibration["fidelity_before"][LOSS_KEY]
    if opts.p == "auto" and opts.variant == "s":
        chosen = [r.details["p"] for r in ctx.replaced if r.kind == "conv->bsconv_s"]
        report.p_auto = {
            "rule": "per conv, the p = M'/M whose BSConv-S parameter count is closest to the conv's own",
            "chosen": {p: chosen.count(p) for p in sorted(set(chosen), key=Fraction)},
        }
    return ConversionResult(model, report, opts, src, size, inputs.name)


def load_converted(directory: Union[str, Path]) -> ConversionResult:
    """Rebuild a conversion saved by ``convert --out DIR`` (or ``ConversionResult.save``): the
    source model is built from the saved spec, the same surgery runs on it, and the saved weights
    load strictly, so the model computes exactly what was saved. The result carries the saved
    report, options, source (spec, checkpoint) and input size."""
    saved = read_surgery_json(directory)
    model = model_from_source(saved.source)  # the architecture only: the weights come from model.safetensors
    # the weights are loaded below: no need to initialise the converted sites from the source's
    # at the saved input size: the growth guard sees the same conv sizes as the conversion did
    convert(model, dataclasses.replace(saved.options, init="default"), count=False, input_size=saved.input_size)
    load_weights(model, saved)
    family = saved.report.input_family or parse_model_spec(saved.source.spec).family
    return ConversionResult(model, saved.report, saved.options, saved.source, saved.input_size, family)
