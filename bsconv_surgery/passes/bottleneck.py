"""Linear bottleneck -> BSConv-S (paper 4.2): the projection of an inverted residual becomes the
``W_B`` of a BSConv-S, carrying the orthonormal regulariser.

An inverted residual is ``pw expand (1x1) -> norm/act -> dw KxK -> norm/act -> [squeeze-excite
or other channel-wise gates] -> pw projection (1x1, stride 1) -> norm`` with no activation
after the projection. Shifting the block boundary by one layer, ``projection (W_B) -> [residual
add] -> next expansion (W_A) -> dw`` is a BSConv-S with ``p = projection out / in``. The layers
stay as they are: the projection conv is swapped for ``layers.SubspaceProjection`` (same
weights, same parameter names), so parameters, MACs, outputs and checkpoints are unchanged and
``regularization_loss`` finds the site by its class.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Dict, Iterator, List, Optional, Tuple

from torch import fx, nn

from ..fx.discovery import ConvInfo
from ..fx.graph import Chain, activation_of, conv_info, describe, layer_role, pointwise_after_depthwise, walk_back, walk_forward
from ..fx.modules import param_count, swap_module
from ..layers import bsconv_class
from ..core.records import SiteRecord, SkipRecord
from .base import SurgeryContext, SurgeryPass, conv_record

__all__ = ["BottleneckToBSConvS", "find_next_expansion"]

_MATHS_OK = ("plain", "same")


def find_next_expansion(convs: List[Tuple[int, fx.Node]]) -> Optional[fx.Node]:
    """``W_A``: the nearest 1x1 groups-1 conv reached from the projection's output."""
    pointwise = [(d, n) for d, n in convs if conv_info(n).kind == "pointwise"]
    return min(pointwise, key=lambda dn: dn[0])[1] if pointwise else None


def _linear_tail(node: fx.Node, modules: Dict[str, nn.Module]) -> Tuple[Optional[str], Optional[fx.Node], Optional[fx.Node]]:
    """Whether the projection at ``node`` is linear: it feeds one norm that applies no
    activation, and no activation follows. Returns ``(problem, norm, next expansion)``."""
    users = list(node.users)
    norm = users[0] if len(users) == 1 else None
    while norm is not None and norm.op == "call_module" and layer_role(modules.get(norm.target)) == "identity":
        norm = next(iter(norm.users)) if len(norm.users) == 1 else None
    if norm is None:
        shown = ", ".join(describe(u, modules) for u in users[:3])
        return f"its output goes to several places ({shown}) instead of one norm", None, None
    if norm.op != "call_module" or layer_role(modules.get(norm.target)) != "norm":
        return f"no norm after the projection: it feeds {describe(norm, modules)}", None, None
    act = activation_of(modules[norm.target])
    if act:
        return f"'{norm.target}' applies {act} after the projection: not a linear bottleneck", None, None
    acts, convs = walk_forward(norm, modules)
    if acts:
        return f"{describe(acts[0], modules)} follows the projection: not a linear bottleneck", None, None
    return None, norm, find_next_expansion(convs)


@dataclass
class BottleneckSite:
    """A pointwise conv fed by a depthwise conv, read as the projection of an inverted residual:
    ``chain`` runs from the depthwise to it, ``expansion`` from the conv before the depthwise to
    the depthwise; ``tail_problem`` says why what follows it is not linear (``norm`` and
    ``next_expansion`` otherwise)."""

    name: str
    proj: ConvInfo
    dw: ConvInfo
    chain: Chain
    expansion: Chain
    tail_problem: Optional[str]
    norm: Optional[fx.Node]
    next_expansion: Optional[fx.Node]
    modules: Dict[str, nn.Module]


class BottleneckToBSConvS(SurgeryPass):
    """Inverted-residual projection -> ``SubspaceProjection`` (BSConv-S ``W_B``, paper 4.2)."""

    kind = "bottleneck->bsconv_s"
    preserves_computation = True  # the projection keeps its weights; only its class changes

    def match(self, model: nn.Module, ctx: SurgeryContext) -> Iterator[BottleneckSite]:
        modules = dict(model.named_modules())
        for graph in ctx.graphs():
            for node, proj, chain, dw_node in pointwise_after_depthwise(graph, modules, allow_gates=True):
                expansion = walk_back(dw_node, modules, allow_gates=False, allow_drop=False)
                problem, norm, nxt = _linear_tail(node, modules)
                yield BottleneckSite(proj.name, proj, conv_info(dw_node), chain, expansion, problem, norm, nxt, modules)

    def skip_record(self, site: BottleneckSite, reason: str) -> SkipRecord:
        return SkipRecord(site.name, self.kind, f"{site.name}: {reason}")

    def guard(self, model: nn.Module, site: BottleneckSite, ctx: SurgeryContext) -> Optional[str]:
        proj, dw, before = site.proj, site.dw, site.expansion
        if site.chain.problem:
            return f"between the depthwise '{dw.name}' and this pointwise conv: {site.chain.problem}"
        if proj.name in ctx.claimed:
            return "already converted by an earlier pass"
        if not ctx.options.selects(proj.name):
            return "not selected by --include/--exclude"
        conv = site.modules[proj.name]
        if proj.maths not in _MATHS_OK:
            return f"it is a {proj.cls} ({proj.maths} maths); left as it is"
        if (proj.calls or 0) != 1:
            return f"it is called from {proj.calls} places"
        if proj.dims != site.dw.dims:
            return f"a {site.dw.dims}-d depthwise conv feeds this {proj.dims}-d projection"
        if any(s != 1 for s in conv.stride) or conv.padding not in ((0,) * proj.dims, "valid"):
            return "the projection has a stride or padding"
        # the expansion: a pointwise conv feeding the depthwise through norm/act only
        if before.conv is None:
            return (f"no pointwise expansion before the depthwise '{dw.name}' "
                    f"({before.problem}): not an inverted residual")
        exp = conv_info(before.conv)
        if exp.kind != "pointwise":
            return (f"no pointwise expansion before the depthwise '{dw.name}': it is fed by "
                    f"'{exp.name}', a {exp.kind} conv (a depthwise-separable block, not an inverted residual)")
        if before.problem:
            return f"between the expansion '{exp.name}' and the depthwise '{dw.name}': {before.problem}"
        return site.tail_problem

    def swap(self, model: nn.Module, site: BottleneckSite, ctx: SurgeryContext) -> SiteRecord:
        proj, exp, nxt = site.proj, conv_info(site.expansion.conv), site.next_expansion
        conv = model.get_submodule(proj.name)
        new = bsconv_class("projection", proj.dims).from_conv(conv)
        swap_module(model, proj.name, new)
        return conv_record(
            self.kind, proj, param_count(conv), param_count(new),
            projection=proj.name,
            norm=site.norm.target,
            depthwise=site.dw.name,
            expansion=exp.name,
            expansion_ratio=str(Fraction(exp.out_channels, exp.in_channels)),
            next_expansion=nxt.target if nxt is not None else None,
            between=site.chain.modules_between(site.modules),
            p=str(Fraction(proj.out_channels, proj.in_channels)),
        )
