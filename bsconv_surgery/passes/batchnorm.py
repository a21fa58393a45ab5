"""Eval-mode BatchNorm folded into the convolution before it (inference preparation).

Every eval-mode BatchNorm that directly follows a convolution is folded into that convolution:
the conv's weights are scaled per output channel and it gets a bias, the BatchNorm becomes
``nn.Identity`` (or its fused activation, for timm's ``BatchNormAct2d``). Pairs are found in the
FX graph (the conv's output must feed only the BatchNorm, and both must be called exactly once),
and modules are swapped on the eager model by qualified name, so the result is the user's own
module, not a ``GraphModule``. This covers the BatchNorm after a depthwise step, the optional one
between BSConv-U's pointwise and depthwise steps (``with_bn``), and the BatchNorms after plain
and pointwise convs of the original model, for 1-D, 2-D and 3-D convs (``BatchNorm1d``/``3d``).
``fold_batchnorm`` runs the ``FoldBatchNorm`` pass on the graphs of a model's traced parts (the
whole model, or the submodules that trace when it does not: ``fx/tracing.py``) and reports in
``FoldReport``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import fx, nn

from ..fx.discovery import conv_kind, conv_maths, is_conv
from ..fx.modules import batchnorm_affine, param_count, swap_module
from ..fx.tracing import FROZEN_BATCHNORM_NAMES, TraceResult, module_call_counts, trace_model
from ..core.records import SiteRecord, SkipRecord, count_by_kind
from .base import SurgeryContext, SurgeryPass

__all__ = ["FoldBatchNorm", "FoldReport", "fold_batchnorm"]

# Conv maths whose weights can absorb a per-output-channel scale exactly: a plain conv and
# timm's Conv2dSame (it only pads). Weight-standardised convs re-normalise the scaled weights.
_FOLDABLE_MATHS = {"plain", "same"}
_ACT_BN_NAMES = {"BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"}


@dataclass
class FoldReport:
    """What ``fold_batchnorm`` did: folded pairs and the BatchNorms it left alone (with why)."""

    folded: List[Dict[str, Any]] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)
    method: str = "fx"
    trace_error: Optional[str] = None

    def as_dict(self) -> Dict[str, Any]:
        return {
            "method": self.method,
            "trace_error": self.trace_error,
            "folded": self.folded,
            "skipped": self.skipped,
            "by_kind": self.by_kind(),
        }

    def by_kind(self) -> Dict[str, int]:
        return count_by_kind(self.folded, lambda rec: rec["conv_kind"])

    @classmethod
    def from_context(cls, ctx: SurgeryContext) -> "FoldReport":
        """The records of a ``FoldBatchNorm`` run, in this report's terms."""
        trace = ctx.trace
        traced = trace is not None and trace.traced
        method = "fx" if traced and trace.ok else (
            f"fx, {len(trace.parts)} part(s) (the whole model did not trace)" if traced else
            "nn.Sequential fallback (FX tracing failed)")
        return cls(
            folded=[{"conv": r.name, "bn": r.details["bn"], "conv_kind": r.details["conv_kind"], "kept": r.details["kept"]}
                    for r in ctx.replaced],
            skipped=[{"bn": s.name, **s.details, "reason": s.reason} for s in ctx.skipped],
            method=method,
            trace_error=ctx.trace.error if ctx.trace is not None else None,
        )


def _bn_kind(module: nn.Module) -> Optional[str]:
    """``plain`` / ``act`` (BatchNorm with a fused drop + activation) for a foldable 2-d
    BatchNorm class, else ``None``."""
    cls = type(module)
    name = cls.__name__
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if name in _ACT_BN_NAMES and hasattr(module, "act"):
            return "act"
        if cls.forward in (nn.modules.batchnorm._BatchNorm.forward, nn.SyncBatchNorm.forward):
            return "plain"
        return None  # a subclass with its own forward: unknown maths
    if name in FROZEN_BATCHNORM_NAMES and all(hasattr(module, a) for a in ("weight", "bias", "running_mean", "running_var")):
        return "act" if name in _ACT_BN_NAMES and hasattr(module, "act") else "plain"
    return None


def _bn_unfoldable(bn: nn.Module) -> Optional[str]:
    frozen = type(bn).__name__ in FROZEN_BATCHNORM_NAMES  # running statistics in every mode
    if getattr(bn, "training", False) and not frozen:
        return "in training mode (batch statistics); call model.eval() first"
    if getattr(bn, "running_mean", None) is None or getattr(bn, "running_var", None) is None:
        return "has no running statistics (track_running_stats=False uses batch statistics)"
    return None


def _conv_unfoldable(conv: nn.Module, bn: nn.Module) -> Optional[str]:
    if not is_conv(conv):
        return f"its input comes from {type(conv).__name__}, not a convolution"
    if conv_maths(conv) not in _FOLDABLE_MATHS:
        return f"{type(conv).__name__} computes its own weights ({conv_maths(conv)}); a scale cannot be folded into them"
    if conv.out_channels != bn.running_mean.numel():
        return "the conv's output channels and the BatchNorm's features differ"
    return None


def _folded_conv(conv: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``conv`` computing ``bn(conv(x))`` (eval-mode BatchNorm)."""
    new = copy.deepcopy(conv)
    scale, shift = batchnorm_affine(bn)
    with torch.no_grad():
        bias = conv.bias.to(torch.float64) if conv.bias is not None else torch.zeros_like(shift)
        weight = conv.weight.to(torch.float64) * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
        new.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        new.bias = nn.Parameter((bias * scale + shift).to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    return new


def _bn_replacement(bn: nn.Module) -> nn.Module:
    """What stays of a folded BatchNorm: nothing, or its activation (timm ``BatchNormAct2d``)."""
    if _bn_kind(bn) != "act":
        return nn.Identity()
    drop = getattr(bn, "drop", None)
    act = bn.act
    if drop is None or isinstance(drop, nn.Identity):
        return act
    return nn.Sequential(drop, act)


@dataclass
class FoldSite:
    """A BatchNorm (``name``) after the conv it would fold into; ``problem``: why the graph
    already rules it out."""

    name: str
    conv: Optional[str]
    problem: Optional[str] = None
    calls: Optional[int] = 1


def _graph_sites(model: nn.Module, trace: TraceResult) -> Iterator[FoldSite]:
    """BatchNorms fed directly by a conv in the FX graph."""
    modules = dict(model.named_modules())
    calls = module_call_counts(trace)
    for node in trace.module_nodes():
        bn = modules.get(node.target)
        if bn is None or _bn_kind(bn) is None:
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            yield FoldSite(node.target, None, "called with more than one input")
            continue
        src = node.args[0]
        if src.op != "call_module" or not is_conv(modules.get(src.target)):
            continue  # not after a conv (e.g. after an add or a pool): nothing to fold into
        if calls.get(node.target, 0) != 1 or calls.get(src.target, 0) != 1:
            yield FoldSite(node.target, src.target, "the conv or the BatchNorm is called from several places")
        elif len(src.users) != 1:
            yield FoldSite(node.target, src.target, "the conv output is also used without the BatchNorm")
        else:
            yield FoldSite(node.target, src.target)


def _sequential_sites(model: nn.Module) -> Iterator[FoldSite]:
    """Fallback when tracing fails: a conv directly followed by a BatchNorm inside a plain
    ``nn.Sequential`` (whose forward feeds each child's output to the next one)."""
    refs: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        refs[id(m)] = refs.get(id(m), 0) + 1
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        children = list(seq.named_children())
        for (cname, conv), (bname, bn) in zip(children, children[1:]):
            if is_conv(conv) and _bn_kind(bn) is not None and refs[id(conv)] == 1 and refs[id(bn)] == 1:
                prefix = f"{name}." if name else ""
                yield FoldSite(prefix + bname, prefix + cname, calls=None)


class FoldBatchNorm(SurgeryPass):
    """Eval-mode BatchNorm after a conv -> folded into the conv (scaled weights plus a bias); the
    BatchNorm becomes ``nn.Identity``, or the activation it had fused (timm ``BatchNormAct2d``).
    Without a graph it falls back to conv -> BatchNorm neighbours in a plain ``nn.Sequential``."""

    kind = "batchnorm->conv"
    preserves_computation = True  # up to float rounding, in eval mode

    def match(self, model: nn.Module, ctx: SurgeryContext) -> Iterator[FoldSite]:
        if ctx.trace is not None and ctx.trace.traced:
            return _graph_sites(model, ctx.trace)
        return _sequential_sites(model)

    def skip_record(self, site: FoldSite, reason: str) -> SkipRecord:
        return SkipRecord(site.name, self.kind, reason, {"conv": site.conv} if site.conv is not None else {})

    def guard(self, model: nn.Module, site: FoldSite, ctx: SurgeryContext) -> Optional[str]:
        if site.problem:
            return site.problem
        bn = model.get_submodule(site.name)
        return _bn_unfoldable(bn) or _conv_unfoldable(model.get_submodule(site.conv), bn)

    def swap(self, model: nn.Module, site: FoldSite, ctx: SurgeryContext) -> SiteRecord:
        conv, bn = model.get_submodule(site.conv), model.get_submodule(site.name)
        folded, replacement = _folded_conv(conv, bn), _bn_replacement(bn)
        swap_module(model, site.conv, folded)
        swap_module(model, site.name, replacement)
        kept = type(replacement).__name__ if not isinstance(replacement, nn.Identity) else None
        return SiteRecord(site.conv, self.kind, type(conv).__name__, conv.in_channels, conv.out_channels,
                          list(conv.kernel_size), list(conv.stride), param_count(conv) + param_count(bn),
                          param_count(folded) + param_count(replacement), site.calls,
                          details={"bn": site.name, "conv_kind": conv_kind(conv), "kept": kept,
                                   "modules": [site.conv, site.name]})


def fold_batchnorm(model: nn.Module) -> FoldReport:
    """Fold eval-mode BatchNorms into the convolution before them, in place.

    Each folded conv is replaced by a copy with scaled weights and a bias; the BatchNorm by
    ``nn.Identity`` (or by its activation for timm's ``BatchNormAct2d``). The outputs stay the
    same up to float rounding. BatchNorms in training mode, without running statistics, after
    a shared conv, or after a conv whose output is also used elsewhere are left alone and
    listed in the report's ``skipped``.

    >>> import torch, bsconv_surgery as bs
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8)).eval()
    >>> _ = net[1].running_var.uniform_(0.5, 2.0)
    >>> x = torch.randn(1, 3, 8, 8)
    >>> expected = net(x)
    >>> report = bs.fold_batchnorm(net)
    >>> report.by_kind(), type(net[1]).__name__, torch.allclose(net(x), expected, atol=1e-5)
    ({'standard': 1}, 'Identity', True)
    """
    ctx = SurgeryContext(trace_model(model))
    FoldBatchNorm().transform(model, ctx)
    return FoldReport.from_context(ctx)
