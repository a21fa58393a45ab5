"""Eval-mode BatchNorm folded into the convolution before it (inference preparation).

Every eval-mode BatchNorm that directly follows a convolution is folded into that convolution:
the conv's weights are scaled per output channel and it gets a bias, the BatchNorm becomes
``nn.Identity`` (or its fused activation, for timm's ``BatchNormAct2d``). Pairs are found in the
FX graph (the conv's output must feed only the BatchNorm, and both must be called exactly once),
and modules are swapped on the eager model by qualified name, so the result is the user's own
module, not a ``GraphModule``. This covers the BatchNorm after a depthwise step, the optional one
between BSConv-U's pointwise and depthwise steps (``with_bn``), and the BatchNorms after plain
and pointwise convs of the original model.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import fx, nn

from ..fx.discovery import conv_kind, conv_maths
from ..fx.modules import batchnorm_affine, swap_module
from ..fx.tracing import FROZEN_BATCHNORM_NAMES, TraceResult, module_call_counts, trace_graph

__all__ = ["FoldReport", "fold_batchnorm"]

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
        out: Dict[str, int] = {}
        for rec in self.folded:
            out[rec["conv_kind"]] = out.get(rec["conv_kind"], 0) + 1
        return out


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
    if not isinstance(conv, nn.Conv2d):
        return f"its input comes from {type(conv).__name__}, not a Conv2d"
    if conv_maths(conv) not in _FOLDABLE_MATHS:
        return f"{type(conv).__name__} computes its own weights ({conv_maths(conv)}); a scale cannot be folded into them"
    if conv.out_channels != bn.running_mean.numel():
        return "the conv's output channels and the BatchNorm's features differ"
    return None


def _folded_conv(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
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


def _fx_pairs(model: nn.Module, report: FoldReport) -> Optional[List[Tuple[str, str]]]:
    """``(conv_name, bn_name)`` pairs from the FX graph; ``None`` when the model does not trace."""
    trace = TraceResult(*trace_graph(model))
    if not trace.ok:
        report.trace_error = trace.error
        return None
    modules = dict(model.named_modules())
    calls = module_call_counts(trace)
    pairs = []
    for node in trace.module_nodes():
        bn = modules.get(node.target)
        if bn is None or _bn_kind(bn) is None:
            continue
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            report.skipped.append({"bn": node.target, "reason": "called with more than one input"})
            continue
        src = node.args[0]
        if src.op != "call_module" or not isinstance(modules.get(src.target), nn.Conv2d):
            continue  # not after a conv (e.g. after an add or a pool): nothing to fold into
        if calls.get(node.target, 0) != 1 or calls.get(src.target, 0) != 1:
            report.skipped.append({"bn": node.target, "conv": src.target,
                                   "reason": "the conv or the BatchNorm is called from several places"})
            continue
        if len(src.users) != 1:
            report.skipped.append({"bn": node.target, "conv": src.target,
                                   "reason": "the conv output is also used without the BatchNorm"})
            continue
        pairs.append((src.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """Fallback when tracing fails: a conv directly followed by a BatchNorm inside a plain
    ``nn.Sequential`` (whose forward feeds each child's output to the next one)."""
    refs: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        refs[id(m)] = refs.get(id(m), 0) + 1
    pairs = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        children = list(seq.named_children())
        for (cname, conv), (bname, bn) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and _bn_kind(bn) is not None and refs[id(conv)] == 1 and refs[id(bn)] == 1:
                prefix = f"{name}." if name else ""
                pairs.append((prefix + cname, prefix + bname))
    return pairs


def fold_batchnorm(model: nn.Module) -> FoldReport:
    """Fold eval-mode BatchNorms into the convolution before them, in place.

    Each folded conv is replaced by a copy with scaled weights and a bias; the BatchNorm by
    ``nn.Identity`` (or by its activation for timm's ``BatchNormAct2d``). The outputs stay the
    same up to float rounding. BatchNorms in training mode, without running statistics, after
    a shared conv, or after a conv whose output is also used elsewhere are left alone and
    listed in the report's ``skipped``.
    """
    report = FoldReport()
    pairs = _fx_pairs(model, report)
    if pairs is None:
        report.method = "nn.Sequential fallback (FX tracing failed)"
        pairs = _sequential_pairs(model)
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        reason = _bn_unfoldable(bn) or _conv_unfoldable(conv, bn)
        if reason:
            report.skipped.append({"bn": bn_name, "conv": conv_name, "reason": reason})
            continue
        replacement = _bn_replacement(bn)
        swap_module(model, conv_name, _folded_conv(conv, bn))
        swap_module(model, bn_name, replacement)
        report.folded.append({
            "conv": conv_name,
            "bn": bn_name,
            "conv_kind": conv_kind(conv),
            "kept": type(replacement).__name__ if not isinstance(replacement, nn.Identity) else None,
        })
    return report
