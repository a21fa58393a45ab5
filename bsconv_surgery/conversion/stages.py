"""The stages of ``convert``, each a short function with explicit inputs and a typed section:

``resolve`` (options, example inputs, data, targets: a ``Job``) -> ``plan`` (the original counted,
its output and, with data, its reference outputs: ``Original``) -> ``select`` (budget targets: the
sites, ``Selection``) -> ``run_passes`` (the variant's passes on the eager model: ``Passes``) ->
``measure`` (counted again, the output checked, fidelity: ``Measurement``) -> ``recalibrate``
(BatchNorm statistics, kept only where they lower the measured loss: ``Recalibration``) ->
``build_report`` (``ConversionReport``). No stage edits another's section; the report is
assembled from them at the end.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Dict, List, Optional, Union

from torch import nn

from ..analysis.counting import Budget, check_runs, count_budget, count_params, counter_info, example_args, output_structure
from ..analysis.memory import check_memory
from ..core.bounds import flag
from ..core.errors import SurgeryError, arg
from ..core.options import SurgeryOptions, Target, make_options
from ..core.records import BudgetNumbers, ConversionReport, ModelSource, SiteRecord, SkipRecord, TracingInfo
from ..core.registry import INITIALIZERS, VARIANTS
from ..data.dataset import DEFAULT_BATCH_SIZE, as_dataset
from ..fx.discovery import Discovery
from ..models.checkpoints import check_model_finite
from ..models.inputs import ExampleInputs, Inputs
from ..models.zoo import example_inputs_for, model_source
from ..passes import SurgeryContext
from ..recovery.fidelity import ReferenceOutputs
from ..recovery.losses import Metric, as_metric
from ..recovery.recalibration import recalibrate_batchnorm
from ..recovery.selection import parse_target
from ..recovery.sensitivity import LOSS_KEY, Selection, kept_batchnorm_state, select_for_targets

__all__ = ["Job", "Original", "Passes", "Measurement", "Recalibration", "resolve", "plan", "select", "run_passes",
           "measure", "recalibrate", "build_report", "noted_reorders", "CANNOT_KEEP"]


@dataclass
class Job:
    """What one conversion works on, resolved once: the module and its source, the options
    (``init="auto"`` resolved), how the model is fed, the calibration batches and the targets."""

    model: nn.Module
    source: Optional[ModelSource]
    options: SurgeryOptions
    inputs: ExampleInputs
    data: Optional[List[Any]]
    data_label: Optional[str]
    targets: list
    recalibrate_bn: bool
    output: Union[int, str, None]
    count: bool
    metric: Metric = dataclasses.field(default_factory=lambda: as_metric(None))


#: Keywords of the earlier ``convert(spec, ...)``, and what takes their place.
_MOVED = {"input_size": "example_inputs=(C, H, W)", "family": "example_inputs=ExampleInputs.of(family, size)",
          "calib": "calibration=Dataset(...)", "calib_batches": "calibration=Dataset(..., limit=N)",
          "target_macs": "target=Target(macs=...)", "target_params": "target=Target(params=...)",
          "checkpoint": "load_model(spec, checkpoint=...)", "num_classes": "load_model(spec, num_classes=...)",
          "pretrained": "load_model(spec, pretrained=True)", "weights": "load_model(spec, weights=...)",
          "source": "load_model(spec)"}


def _options(options: Union[str, SurgeryOptions], keywords: Dict[str, Any]) -> SurgeryOptions:
    moved = [f"{k}= (now {_MOVED[k]})" for k in keywords if k in _MOVED]
    if moved:
        raise SurgeryError(f"convert() no longer takes {'; '.join(moved)}.")
    return make_options(options, keywords)


def resolve(model: nn.Module, options: Union[str, SurgeryOptions], keywords: Dict[str, Any], example_inputs: Inputs,
            calibration: Any, target: Any, recalibrate_bn: bool, output: Union[int, str, None], count: bool,
            memory_check: bool, metric: Union[str, Callable, Metric, None] = None) -> Job:
    """Check every argument before any work and make the example inputs and the batches once."""
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"convert() takes an nn.Module (or a spec such as 'timm:resnet18'), not {type(model).__name__}.")
    for name, value in (("count", count), ("memory_check", memory_check), ("recalibrate_bn", recalibrate_bn)):
        flag(value, name)
    opts = _options(options, keywords)
    budget = Target.of(target)
    targets = [parse_target(value, metric) for metric, value in budget.metrics()] if budget is not None else []
    if targets and not count:
        raise SurgeryError("A budget target needs the counts: convert(..., count=True).")
    if recalibrate_bn and calibration is None:
        raise SurgeryError("recalibrate_bn needs calibration data: pass calibration=Dataset(...).")
    chosen = as_metric(metric)
    if metric is not None and calibration is None:
        raise SurgeryError(f"{arg('metric')} needs calibration data ({arg('calibration')}): without it nothing is "
                           "measured.")
    dataset = as_dataset(calibration) if calibration is not None else None  # bad names fail before any work
    source = model_source(model)
    if opts.init == "auto":  # trained weights: start from them (docs: keeping a trained model's accuracy)
        opts = dataclasses.replace(opts, init="svd" if source is not None and source.trained else "default")
    inputs = example_inputs_for(model, example_inputs)
    if count and memory_check:
        check_memory(model, inputs, batch=DEFAULT_BATCH_SIZE if dataset is not None else 1)
    data = dataset.batches_for(model, inputs) if dataset is not None else None
    return Job(model, source, opts, inputs, data, dataset.label if dataset is not None else None, targets,
               bool(recalibrate_bn), output, count, chosen)


@dataclass
class Original:
    """The model before surgery: its parameters, budget, output structure and, with calibration
    data, its outputs on it (``ReferenceOutputs``, what fidelity compares with)."""

    params: int
    budget: Optional[Budget]
    output_structure: Any
    reference: Optional[ReferenceOutputs]


def plan(job: Job) -> Original:
    """Count the original and run it once on the example inputs (a model that does not run there
    is refused before any surgery); keep its outputs on the calibration data."""
    structure = check_runs(job.model, job.inputs)[1] if job.count else None
    if INITIALIZERS.get(job.options.init) is not None:  # an initialiser that starts from the model's weights
        check_model_finite(job.model, job.source)
    reference = ReferenceOutputs(job.model, job.data, job.data_label, job.output, job.inputs, job.metric) \
        if job.data is not None else None
    return Original(count_params(job.model), count_budget(job.model, job.inputs) if job.count else None, structure,
                    reference)


def select(job: Job, original: Original) -> Optional[Selection]:
    """With budget targets: the sites that reach them with the least single-site loss (measured on
    the reference outputs, else filter energy)."""
    if not job.targets:
        return None
    return select_for_targets(job.model, job.options, job.inputs, job.targets, original.reference,
                              job.recalibrate_bn, original.budget)


@dataclass
class Passes:
    """What the variant's passes did: the records of the sites swapped and skipped, the discovery
    (census, other and hidden convs, tracing) and the seconds it took."""

    options: SurgeryOptions
    replaced: List[SiteRecord]
    skipped: List[SkipRecord]
    discovery: Discovery
    seconds: float


def run_passes(model: nn.Module, options: SurgeryOptions, inputs: Optional[ExampleInputs]) -> Passes:
    """Trace, discover (checking the scope's patterns against the convs), and run the passes of
    ``options.variant`` on the eager model (swapping submodules by qualified name)."""
    t0 = time.perf_counter()
    ctx = SurgeryContext.for_model(model, options, inputs)
    for surgery_pass in VARIANTS.get(options.variant)(options):
        surgery_pass.transform(model, ctx)
    if options.sites is not None:
        missing = sorted(set(options.sites) - {r.name for r in ctx.replaced})
        if missing:
            raise SurgeryError(f"Site(s) {', '.join(missing)} of the exact site list are not candidates of variant "
                               f"{options.variant} with these options (converted: {len(ctx.replaced)}).")
    return Passes(options, list(ctx.replaced), list(ctx.skipped), ctx.discovery, time.perf_counter() - t0)


@dataclass
class Measurement:
    """The converted model counted and compared: its parameters and budget, its output structure
    (checked equal to the original's), the site records with their MACs, and its fidelity."""

    params: int
    budget: Optional[Budget]
    output_structure: Any
    replaced: List[SiteRecord]
    fidelity: Optional[Dict[str, Any]]


def _site_macs(budget: Budget, names: List[str]) -> Optional[int]:
    """A site's MACs: those of its module, or summed over its modules (a reordered pair)."""
    if budget.macs is None:
        return None
    found = [budget.by_module[n] for n in names if n in budget.by_module]
    return sum(found) if found else None


def measure(job: Job, original: Original, passes: Passes) -> Measurement:
    """Count the converted model, check its output structure, put MACs on the site records (new
    records; the passes' stay as they were) and measure fidelity against the reference."""
    fidelity = original.reference.compare(job.model) if original.reference is not None else None
    if not job.count:
        return Measurement(count_params(job.model), None, None, list(passes.replaced), fidelity)
    after = count_budget(job.model, job.inputs)
    structure = output_structure(job.model, example_args(job.model, job.inputs), job.inputs)
    if structure != original.output_structure:
        raise SurgeryError(f"Internal check failed: the conversion changed the output shape "
                           f"{original.output_structure} -> {structure}.")
    replaced = [dataclasses.replace(r, macs_before=_site_macs(original.budget, r.module_names),
                                    macs_after=_site_macs(after, r.module_names), macs_counted=True,
                                    details=dict(r.details)) for r in passes.replaced]
    return Measurement(count_params(job.model), after, structure, replaced, fidelity)


@dataclass
class Recalibration:
    """BatchNorm statistics re-estimated on the calibration data, with the fidelity before and
    after; ``kept`` is false when they were restored because the loss did not go down (``reason``
    says so with both numbers), and ``fidelity_after`` is then the fidelity of the model as it is."""

    done: Dict[str, Any]
    fidelity_before: Optional[Dict[str, Any]]
    fidelity_after: Optional[Dict[str, Any]]
    kept: bool = True
    reason: Optional[str] = None
    fidelity_recalibrated: Optional[Dict[str, Any]] = None

    def to_json(self) -> Dict[str, Any]:
        out = dict(self.done, fidelity_before=self.fidelity_before, kept=self.kept)
        if not self.kept:
            out["reverted"] = self.reason
            out["fidelity_recalibrated"] = self.fidelity_recalibrated
        return out


def recalibrate(job: Job, original: Original, measurement: Measurement) -> Optional[Recalibration]:
    """With ``recalibrate_bn``: re-estimate every BatchNorm's running statistics on the data and
    measure again; the new statistics stay only if the loss went down, else the old ones are
    restored and the report says why."""
    if not job.recalibrate_bn or job.data is None:
        return None
    with kept_batchnorm_state(job.model) as restore:
        done = recalibrate_batchnorm(job.model, job.data)
        if not done.batchnorms or original.reference is None:
            restore.cancel()
            return Recalibration(done.to_json(), measurement.fidelity, measurement.fidelity)
        after = original.reference.compare(job.model)
        before_loss, after_loss = measurement.fidelity[LOSS_KEY], after[LOSS_KEY]
        if after_loss < before_loss:
            restore.cancel()
            return Recalibration(done.to_json(), measurement.fidelity, after)
    reason = (f"recalibrating did not lower the loss on {job.data_label} ({original.reference.loss_name}): "
              f"{_g(before_loss)} before, {_g(after_loss)} after; the BatchNorm statistics were restored")
    return Recalibration(done.to_json(), measurement.fidelity, measurement.fidelity, False, reason, after)


def _g(value: float) -> str:
    return f"{value:.4g}"


def _numbers(budget: Optional[Budget]) -> Optional[BudgetNumbers]:
    if budget is None:
        return None
    return BudgetNumbers(budget.macs, budget.conv_macs, dict(budget.unsupported_ops), budget.uncounted_compute_ops,
                         budget.error)


def _tracing_info(discovery: Discovery) -> TracingInfo:
    """How the graph was found, and the parts that traced when the whole model did not."""
    method = "fx" if discovery.traced else "fx parts" if discovery.parts else "named_modules fallback"
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


def _selection_section(selection: Selection, measurement: Measurement, fidelity: Optional[Dict[str, Any]],
                       recalibration: Optional[Recalibration]) -> Dict[str, Any]:
    """The selection's report with what the conversion reached for each target and the measured loss."""
    section = copy.deepcopy(selection.report)
    macs_after = measurement.budget.macs if measurement.budget is not None else None
    for target in section["targets"]:
        reached = measurement.params if target["metric"] == "params" else macs_after
        target["reached"] = reached
        target["reached_fraction"] = reached / target["original"] if reached is not None and target["original"] else None
        target["met"] = reached is not None and reached <= target["limit"]
    if fidelity is not None:
        section["measured_loss"] = fidelity[LOSS_KEY]
        section["loss"] = fidelity.get("loss_name")
        if recalibration is not None and recalibration.kept:
            section["measured_loss_before_recalibration"] = recalibration.fidelity_before[LOSS_KEY]
    return section


def _p_auto(options: SurgeryOptions, replaced: List[SiteRecord]) -> Optional[Dict[str, Any]]:
    if options.p != "auto" or options.variant != "s":
        return None
    chosen = [r.details["p"] for r in replaced if r.kind == "conv->bsconv_s"]
    return {"rule": "per conv, the p = M'/M whose BSConv-S parameter count is closest to the conv's own",
            "chosen": {p: chosen.count(p) for p in sorted(set(chosen), key=Fraction)}}


#: The key of a site record's note that the site cannot keep the function of trained weights.
CANNOT_KEEP = "cannot_keep_function"


def noted_reorders(replaced: List[SiteRecord], source: Optional[ModelSource]) -> List[SiteRecord]:
    """The records with a note on each depthwise-separable reorder across a nonlinearity when the
    model carries trained weights: such a pair computes ``pw(act(dw(x)))`` and BSConv-U
    ``dw(pw(x))``, so no choice of weights keeps the function (measured on a trained ImageNet mobile
    net: each such site alone took top-1 agreement to 0-9%)."""
    if source is None or not source.trained:
        return replaced
    out = []
    for record in replaced:
        between = record.details.get("nonlinear_between")
        if between:
            record = dataclasses.replace(record, details=dict(record.details, **{CANNOT_KEEP: (
                f"reordered across {', '.join(between)}: the trained weights' function cannot be kept (the activation "
                "between the depthwise and the pointwise conv is dropped); measure it on calibration data and expect "
                "to retrain")}))
        out.append(record)
    return out


def build_report(job: Job, original: Original, selection: Optional[Selection], passes: Passes,
                 measurement: Measurement, recalibration: Optional[Recalibration], started: float) -> ConversionReport:
    """The ``ConversionReport``, assembled from the stages' sections."""
    discovery = passes.discovery
    fidelity = recalibration.fidelity_after if recalibration is not None else measurement.fidelity
    source = job.source
    return ConversionReport(
        model=source.spec if source is not None and source.spec is not None else type(job.model).__name__,
        options=passes.options,
        input_size=job.inputs.size,
        tracing=_tracing_info(discovery),
        conv_census=discovery.census(),
        params_before=original.params,
        params_after=measurement.params,
        before=_numbers(original.budget),
        after=_numbers(measurement.budget),
        counter=counter_info(),
        output_shape=measurement.output_structure,
        replaced=noted_reorders(measurement.replaced, source),
        skipped=passes.skipped,
        other_convs=discovery.other_convs,
        hidden_convs=[{"name": c.name, "cls": c.cls, "kind": c.kind, "reason": c.hidden_reason}
                      for c in discovery.convs.values() if c.hidden],
        seconds={"surgery": round(passes.seconds, 4), "total": round(time.perf_counter() - started, 4)},
        source=source,
        input_family=job.inputs.name,
        fidelity=fidelity,
        selection=_selection_section(selection, measurement, fidelity, recalibration) if selection is not None else None,
        recalibration=recalibration.to_json() if recalibration is not None else None,
        p_auto=_p_auto(passes.options, passes.replaced),
    )
