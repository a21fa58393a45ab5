"""Per-site sensitivity: what converting each candidate site *alone* costs and saves
(``bsconv-surgery sensitivity``, and the ranking behind ``convert --target-macs/--target-params``).

``plan_sites(model, options, inputs)`` converts a deep copy of the model once with
``--init svd`` and keeps, for every site the variant's passes would convert, its ready
replacement module(s) (a reordered depthwise-separable pair also replaces the norm/activation
modules between the two convs by ``Identity``, and may move its constant term into the running
mean of the BatchNorm after it: those modules travel with the site), the parameters and MACs it
saves (fvcore, before minus after, over the site's modules) and the filter energy ``--init svd``
keeps. ``measure_sensitivity`` then swaps each site into the *original* model, measures its
fidelity on the calibration batches against the original's outputs (computed once), and swaps it
back: one calibration forward per site, no re-tracing, and the same numbers as converting that
site alone (the tests check it). With ``recalibrate_bn`` every single-site model also gets its
BatchNorm statistics re-estimated and is measured again (then restored); the site keeps the
lower of the two losses (``recalibrated`` says which), since ``convert`` keeps a recalibration
only where it lowers the loss. Ranking sites after recalibration chose the better set with the
relative error as the loss (digits ResNet-20, MACs <= 0.5: 97.8% against 95.3% held-out
accuracy), but not with the decision-aware loss on another checkpoint (88.9% against 96.7% for
the set ranked without it and then recalibrated; docs/results.md).

A site's *loss* is the fidelity's ``loss`` (``losses.py``): by default it follows the decision
output (disagreement plus a divergence suited to its head: softmax KL, per-bin Bernoulli KL for a
sigmoid head, box/score matching for detection; the relative output error for regression), or
the ``metric`` given. Without calibration data it is the share of filter energy the
factorisation loses (``1 - energy_kept``), a weaker proxy (measured Spearman correlation with the
end-to-end error: 0.49 on digits), except for a depthwise-separable reorder across a
nonlinearity (dw -> act -> pw): the reorder cannot keep the function of trained weights, however
much energy the fit keeps, so its proxy loss is 1 (``NONLINEAR_REORDER_LOSS``). Sites that
preserve the computation (BSConv-S bottlenecks) have loss 0 and save nothing. Rows are sorted by
loss per MAC saved; sites that save no MACs come last.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

from torch import nn

from ..analysis.counting import Budget, check_runs, count_budget
from ..core.bounds import flag
from ..core.errors import SurgeryError, arg
from ..data.dataset import Dataset, as_dataset
from .fidelity import ReferenceOutputs
from .losses import Metric, as_metric
from ..fx.modules import swap_module
from ..io.plots import new_figure, save_figure
from ..models.checkpoints import check_model_finite
from ..models.inputs import ExampleInputs, Inputs, as_example_inputs
from ..models.zoo import example_inputs_for, model_source
from ..core.options import SurgeryOptions, make_options
from ..passes import SurgeryContext
from .recalibration import batchnorms, recalibrate_batchnorm
from ..core.records import SiteRecord, SkipRecord
from ..core.registry import VARIANTS
from .selection import Target, choose_sites

__all__ = ["Site", "SitePlan", "plan_sites", "SiteSensitivity", "Sensitivity", "measure_sensitivity",
           "write_sensitivity_plot", "LOSS_KEY", "Selection", "select_for_targets", "swapped_in", "energy_loss",
           "kept_batchnorm_state", "NONLINEAR_REORDER_LOSS"]

#: The fidelity number a site's loss is (``losses.py``: the decision-aware loss, or the metric given).
LOSS_KEY = "loss"

#: The calibration-free loss of a depthwise-separable reorder across a nonlinearity (see above).
NONLINEAR_REORDER_LOSS = 1.0


@dataclass
class Site:
    """One candidate site, ready to swap in: ``modules`` maps qualified names to replacements."""

    record: SiteRecord
    modules: Dict[str, nn.Module]
    params_saved: int
    macs_saved: Optional[int]
    preserves_computation: bool

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def energy_kept(self) -> Optional[float]:
        return self.record.details.get("energy_kept")

    @property
    def nonlinear_between(self) -> List[str]:
        """The activations a depthwise-separable reorder moves past (``dw -> act -> pw``)."""
        return list(self.record.details.get("nonlinear_between") or [])


@dataclass
class SitePlan:
    """Every candidate site of a model (network order) and the model's totals."""

    sites: List[Site]
    skipped: List[SkipRecord]
    params_before: int
    macs_before: Optional[int]
    options: SurgeryOptions
    inputs: ExampleInputs

    @property
    def input_size(self) -> tuple:
        return self.inputs.size

    def by_name(self) -> Dict[str, Site]:
        return {site.name: site for site in self.sites}


def _site_module_names(record: SiteRecord) -> List[str]:
    names = list(record.module_names) + list(record.details.get("removed") or [])
    if record.details.get("constant_module"):
        names.append(record.details["constant_module"])
    return list(dict.fromkeys(names))


def _macs(by_module: Dict[str, int], names: Sequence[str]) -> int:
    return sum(by_module.get(n, 0) for n in names)


def plan_sites(model: nn.Module, options: SurgeryOptions, inputs: Inputs, count: bool = True,
               before: Optional[Budget] = None) -> SitePlan:
    """Convert a copy of ``model`` once (``--init svd``) and keep every site's replacement and
    savings (see the module docstring). ``options.sites`` is ignored: every candidate is planned.
    ``inputs``: how the model is fed (``models/inputs.py``); ``before``: the model's budget when it
    was counted already."""
    opts = dataclasses.replace(options, init="svd", sites=None)
    inputs = as_example_inputs(inputs)
    if before is None and count:
        before = count_budget(model, inputs)
    work = copy.deepcopy(model)
    # with the inputs, the growth guard skips convs whose replacement would not be smaller
    ctx = SurgeryContext.for_model(work, opts, inputs)
    for surgery_pass in VARIANTS.get(opts.variant)(opts):
        surgery_pass.transform(work, ctx)
    after = count_budget(work, inputs) if count else None
    counted = before is not None and before.macs is not None and after is not None and after.macs is not None
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    sites = []
    preserving = {p.kind for p in VARIANTS.get(opts.variant)(opts) if p.preserves_computation}
    for record in ctx.replaced:
        names = _site_module_names(record)
        macs = _macs(before.by_module, names) - _macs(after.by_module, names) if counted else None
        sites.append(Site(record, {n: work.get_submodule(n) for n in names}, record.params_before - record.params_after,
                          macs, record.kind in preserving))
    sites.sort(key=lambda s: min(order.get(n, len(order)) for n in s.modules))
    return SitePlan(sites, list(ctx.skipped), sum(p.numel() for p in model.parameters()),
                    before.macs if before is not None else None, options, inputs)


@contextmanager
def swapped_in(model: nn.Module, sites: Sequence[Site]) -> Iterator[nn.Module]:
    """``model`` with the replacements of ``sites`` swapped in for the block, then swapped back."""
    saved: Dict[str, nn.Module] = {}
    try:
        for site in sites:
            for name, new in site.modules.items():
                saved[name] = model.get_submodule(name)
                swap_module(model, name, new)
        yield model
    finally:
        for name, old in saved.items():
            swap_module(model, name, old)


class _Restore:
    """``cancel()`` keeps the statistics the block set instead of restoring the old ones."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@contextmanager
def kept_batchnorm_state(model: nn.Module) -> Iterator[_Restore]:
    """Every BatchNorm's running statistics are restored after the block, unless the block calls
    ``cancel()`` on what it yields."""
    saved = [(bn, {k: v.detach().clone() for k, v in bn.state_dict().items()}) for _, bn in batchnorms(model)]
    restore = _Restore()
    try:
        yield restore
    finally:
        if not restore.cancelled:
            for bn, state in saved:
                bn.load_state_dict(state)


@dataclass
class SiteSensitivity:
    """One row of the sensitivity table."""

    name: str
    kind: str
    modules: List[str]
    params_saved: int
    macs_saved: Optional[int]
    energy_kept: Optional[float]
    loss: float
    fidelity: Optional[Dict[str, Any]] = None
    preserves_computation: bool = False
    seconds: float = 0.0
    nonlinear_between: List[str] = field(default_factory=list)
    recalibrated: Optional[bool] = None
    loss_without_recalibration: Optional[float] = None

    @property
    def loss_per_mac(self) -> Optional[float]:
        """Loss per million MACs saved (``inf`` when the site saves none)."""
        if self.macs_saved is None:
            return None
        return self.loss / (self.macs_saved / 1e6) if self.macs_saved > 0 else math.inf

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "name": self.name, "kind": self.kind, "modules": list(self.modules),
            "params_saved": self.params_saved, "macs_saved": self.macs_saved, "energy_kept": self.energy_kept,
            "loss": self.loss,
            "loss_per_mmac_saved": None if self.loss_per_mac is None or math.isinf(self.loss_per_mac) else self.loss_per_mac,
            "preserves_computation": self.preserves_computation,
            "seconds": round(self.seconds, 4),
        }
        if self.nonlinear_between:
            out["nonlinear_between"] = list(self.nonlinear_between)
        if self.recalibrated is not None:
            out["recalibrated_bn"] = self.recalibrated
            out["loss_without_recalibration"] = self.loss_without_recalibration
        if self.fidelity is not None:
            out["fidelity"] = self.fidelity
        return out


@dataclass
class Sensitivity:
    """What ``measure_sensitivity`` found; ``rows`` sorted by loss per MAC saved."""

    model: str
    variant: str
    input_size: tuple
    calib: Optional[str]
    loss: str
    recalibrated: bool
    params_before: int
    macs_before: Optional[int]
    rows: List[SiteSensitivity]
    skipped: List[SkipRecord] = field(default_factory=list)
    baseline: Optional[Dict[str, Any]] = None
    seconds: Dict[str, float] = field(default_factory=dict)

    def losses(self) -> Dict[str, float]:
        return {row.name: row.loss for row in self.rows}

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "model": self.model, "variant": self.variant, "input_size": list(self.input_size), "calib": self.calib,
            "loss": self.loss, "recalibrated_bn": self.recalibrated, "params_before": self.params_before,
            "macs_before": self.macs_before, "sites": [row.to_json() for row in self.rows],
            "skipped": [s.to_json() for s in self.skipped], "seconds": dict(self.seconds),
        }
        if self.baseline is not None:
            out["baseline"] = self.baseline
        return out


def _sort_key(row: SiteSensitivity):
    per = row.loss_per_mac
    return (per is None or math.isinf(per), per if per is not None and not math.isinf(per) else 0.0, row.loss, row.name)


def energy_loss(site: Site) -> float:
    """The calibration-free loss of a site: the share of filter energy it loses; a reorder across a
    nonlinearity ``NONLINEAR_REORDER_LOSS`` (see the module docstring)."""
    if site.preserves_computation:
        return 0.0
    if site.nonlinear_between:
        return NONLINEAR_REORDER_LOSS
    kept = site.energy_kept
    return 1.0 - kept if kept is not None else 1.0


def measure_sensitivity(
    model: nn.Module,
    data: Union[Dataset, str, Any, None] = None,
    *,
    options: Union[str, SurgeryOptions] = "u",
    example_inputs: Inputs = None,
    recalibrate_bn: bool = False,
    output: Union[int, str, None] = None,
    plan: Optional[SitePlan] = None,
    reference: Optional[ReferenceOutputs] = None,
    metric: Union[str, Callable, Metric, None] = None,
    **option_keywords: Any,
) -> Sensitivity:
    """Each candidate site of ``model`` converted alone (``init="svd"``): its savings and, with
    ``data`` (a ``Dataset``, a named set, or any iterable of batches), its fidelity loss; without
    ``data``, the filter energy it loses. ``metric`` is what the loss is (``losses.py``: ``auto``,
    the decision output's disagreement plus a divergence suited to its head; a name such as
    ``relative-error``, ``kl``, ``bce``, ``disagreement``; or a callable
    ``metric(reference_outputs, converted_outputs) -> float``). ``options`` is a variant name (with the options as
    keywords) or a ``SurgeryOptions``; ``example_inputs`` says how the model is fed (default: as
    ``convert`` does). ``model`` is left as it was. A model that does not run on the example
    inputs, or whose weights hold NaN or inf, is refused before any work.

    >>> import torch, bsconv_surgery as bs
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3))
    >>> rows = bs.measure_sensitivity(net, bs.Dataset("random", limit=1), example_inputs=torch.randn(1, 3, 16, 16)).rows
    >>> sorted(row.name for row in rows)
    ['0', '2']
    """
    started = time.perf_counter()
    opts = make_options(options, option_keywords)
    flag(recalibrate_bn, "recalibrate_bn")
    chosen = as_metric(metric) if metric is not None else None
    if chosen is not None and data is None:
        raise SurgeryError(f"{arg('metric')} needs calibration data: without it the sites are ranked by filter energy.")
    if chosen is not None and reference is not None and chosen != reference.metric:
        raise SurgeryError("Give the metric once: to the ReferenceOutputs, or to measure_sensitivity without one.")
    if plan is None:
        inputs = example_inputs_for(model, example_inputs)
        check_runs(model, inputs)
        check_model_finite(model, model_source(model))  # every site starts from the model's weights (init svd)
        plan = plan_sites(model, opts, inputs)
    t_plan = time.perf_counter() - started
    baseline = None
    if data is None:
        rows = [SiteSensitivity(site.name, site.record.kind, list(site.modules), site.params_saved, site.macs_saved,
                                site.energy_kept, energy_loss(site), None, site.preserves_computation,
                                nonlinear_between=site.nonlinear_between)
                for site in plan.sites]
        loss, label = ("1 - energy_kept (no calibration data; 1 for a depthwise-separable reorder across a "
                       "nonlinearity)"), None
    else:
        dataset = as_dataset(data)
        batches = reference.batches if reference is not None else dataset.batches_for(model, plan.inputs)
        label = reference.label if reference is not None else dataset.label
        if reference is None:
            reference = ReferenceOutputs(model, batches, label, output, plan.inputs, chosen)
        if recalibrate_bn and batchnorms(model):
            with kept_batchnorm_state(model):
                recalibrate_batchnorm(model, batches)
                baseline = reference.compare(model)
        rows = [_measure_site(model, site, reference, batches, recalibrate_bn) for site in plan.sites]
        loss = reference.loss_name + (", after BatchNorm recalibration where it lowers it" if recalibrate_bn else "")
    rows.sort(key=_sort_key)
    return Sensitivity(type(model).__name__, opts.variant, plan.input_size, label, loss,
                       bool(recalibrate_bn and data is not None), plan.params_before, plan.macs_before, rows,
                       plan.skipped, baseline,
                       {"plan": round(t_plan, 4), "total": round(time.perf_counter() - started, 4)})


def _measure_site(model: nn.Module, site: Site, reference: ReferenceOutputs, batches: List[Any],
                  recalibrate_bn: bool) -> SiteSensitivity:
    """One row: ``site`` swapped into ``model`` alone and compared with the reference outputs."""
    t0 = time.perf_counter()
    fid, site_loss, recalibrated, plain_loss = None, 0.0, None, None
    if not site.preserves_computation:
        with swapped_in(model, [site]), kept_batchnorm_state(model):
            fid = reference.compare(model)
            if recalibrate_bn and batchnorms(model):  # kept only where it lowers the loss, as convert does
                plain_loss = float(fid[LOSS_KEY])
                recalibrate_batchnorm(model, batches)
                after = reference.compare(model)
                recalibrated = after[LOSS_KEY] < plain_loss
                fid = after if recalibrated else fid
        site_loss = float(fid[LOSS_KEY])
    return SiteSensitivity(site.name, site.record.kind, list(site.modules), site.params_saved, site.macs_saved,
                           site.energy_kept, site_loss, fid, site.preserves_computation, time.perf_counter() - t0,
                           site.nonlinear_between, recalibrated, plain_loss)


def write_sensitivity_plot(result: Sensitivity, path, force: bool = False):
    """MACs saved against loss, one point per site (labelled), as a PNG written atomically."""
    fig = new_figure(7.5, 4.6)
    ax = fig.add_subplot()
    rows = [r for r in result.rows if r.macs_saved is not None and not r.preserves_computation]
    xs = [r.macs_saved / 1e6 for r in rows]
    ys = [r.loss for r in rows]
    colors = [f"C{['conv->bsconv_u', 'conv->bsconv_s', 'dsc->bsconv_u'].index(r.kind) if r.kind in ('conv->bsconv_u', 'conv->bsconv_s', 'dsc->bsconv_u') else 3}" for r in rows]
    ax.scatter(xs, ys, c=colors, s=28, zorder=3)
    for r, x, y in zip(rows, xs, ys):
        ax.annotate(r.name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.axvline(0, color="0.6", linewidth=0.8)
    ax.set_xlabel("MACs saved by converting the site alone (millions)")
    ylabel = "loss, site alone" if result.calib else "filter energy lost (1 - energy kept)"
    if result.calib:
        ylabel += f"\n({result.loss})"
    ax.set_ylabel(ylabel)
    where = f" on {result.calib}" if result.calib else ""
    ax.set_title(f"{result.model}: per-site sensitivity, BSConv-{result.variant.upper()} --init svd{where}", fontsize=9)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, force)


# ---------------------------------------------------------------------------------------------
# budget targets
# ---------------------------------------------------------------------------------------------


@dataclass
class Selection:
    """The sites a budget target chose, and the ``selection`` section of the report."""

    sites: List[str]
    report: Dict[str, Any]


def select_for_targets(model: nn.Module, options: SurgeryOptions, inputs: ExampleInputs, targets: Sequence[Target],
                       reference: Optional[ReferenceOutputs] = None, recalibrate_bn: bool = False,
                       before: Optional[Any] = None) -> Selection:
    """Choose the candidate sites that reach every target with the least summed single-site loss
    (``selection.py``); the ``reference`` outputs of the original on calibration batches give
    measured losses (its metric says which: ``losses.py``), else the filter energy lost ranks them
    (a reorder across a nonlinearity: loss 1). An unreachable target is a ``SurgeryError`` naming
    the closest reachable value. Sites that preserve the computation (BSConv-S bottlenecks) are
    always kept; sites that grow the MACs or the parameters (``allow_growth``) are never chosen."""
    started = time.perf_counter()
    plan = plan_sites(model, options, inputs, before=before)
    # a site that grows the MACs or the parameters (possible with --allow-growth) is never chosen
    grown = [s for s in plan.sites if s.params_saved < 0 or (s.macs_saved or 0) < 0]
    plan = dataclasses.replace(plan, sites=[s for s in plan.sites if s not in grown])
    if plan.macs_before is None and any(t.metric == "macs" for t in targets):
        raise SurgeryError(f"{arg('target.macs')} needs MAC counts, and fvcore could not count this model.")
    totals = {"macs": plan.macs_before, "params": plan.params_before}
    savings_of = {"macs": lambda s: s.macs_saved or 0, "params": lambda s: s.params_saved}
    limits = [t.limit(totals[t.metric]) for t in targets]
    needs = [totals[t.metric] - limit for t, limit in zip(targets, limits)]
    savings = [[savings_of[t.metric](s) for s in plan.sites] for t in targets]
    best = [totals[t.metric] - sum(max(v, 0) for v in sav) for t, sav in zip(targets, savings)]
    for t, need, sav, reachable in zip(targets, needs, savings, best):
        if sum(max(v, 0) for v in sav) < need:
            total = totals[t.metric]
            raise SurgeryError(
                f"{arg('target.' + t.metric)} {t.text} cannot be reached: converting every candidate site leaves "
                f"{_count(reachable)} {t.metric} ({reachable / total:.3f} of the original's {_count(total)}). "
                f"Ask for {math.ceil(reachable / total * 1000) / 1000:.3f} or more, or widen the candidates "
                f"({arg('include')}/{arg('exclude')}/{arg('kernel_sizes')}, {arg('variant')}).")
    if reference is not None:
        sens = measure_sensitivity(model, reference.batches, options=options, plan=plan, recalibrate_bn=recalibrate_bn,
                                   reference=reference)
        losses = sens.losses()
        method = (f"exact 0/1 knapsack on each site's measured loss alone ({reference.loss_name})"
                  + (" after BatchNorm recalibration where it lowers it" if recalibrate_bn else "")
                  + f" on {reference.label}")
    else:
        losses = {s.name: energy_loss(s) for s in plan.sites}
        method = ("exact 0/1 knapsack on each site's lost filter energy (1 - energy_kept of --init svd; 1 for a "
                  "depthwise-separable reorder across a nonlinearity): no calibration data, so nothing was "
                  "measured; pass --calib to rank sites by measured fidelity")
    costs = [losses[s.name] for s in plan.sites]
    choice = choose_sites(costs, savings, needs)
    chosen = [plan.sites[i] for i in choice.chosen]
    kept = [s for s in plan.sites if s.preserves_computation]
    names = [s.name for s in plan.sites if s in chosen or s in kept]
    report = {
        "method": method + ("" if choice.exact else " (search stopped early: greedy by loss per unit saved, pruned)"),
        "exact": choice.exact,
        "targets": [dict(t.to_json(), limit=limit, original=totals[t.metric], best_reachable=reachable,
                         best_reachable_fraction=reachable / totals[t.metric] if totals[t.metric] else None)
                    for t, limit, reachable in zip(targets, limits, best)],
        "candidates": len(plan.sites),
        "chosen": [{"name": s.name, "kind": s.record.kind, "loss": losses[s.name], "macs_saved": s.macs_saved,
                    "params_saved": s.params_saved} for s in chosen],
        "kept_preserving_sites": [s.name for s in kept],
        "growing_sites_left_out": [{"name": s.name, "kind": s.record.kind, "macs_saved": s.macs_saved,
                                    "params_saved": s.params_saved} for s in grown],
        "predicted_loss": choice.loss,
        "seconds": round(time.perf_counter() - started, 4),
    }
    return Selection(names, report)


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"
