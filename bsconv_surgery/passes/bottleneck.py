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

from fractions import Fraction
from typing import Dict, List, Optional, Tuple, Union

from torch import fx, nn

from ..fx.discovery import ConvInfo
from ..fx.graph import Chain, activation_of, conv_info, describe, layer_role, pointwise_after_depthwise, walk_back, walk_forward
from ..fx.modules import param_count, swap_module
from ..layers import SubspaceProjection
from .base import SurgeryContext, SurgeryPass

__all__ = ["BottleneckToBSConvS", "find_next_expansion"]

_MATHS_OK = ("plain", "same")


def find_next_expansion(convs: List[Tuple[int, fx.Node]]) -> Optional[fx.Node]:
    """``W_A``: the nearest 1x1 groups-1 conv reached from the projection's output."""
    pointwise = [(d, n) for d, n in convs if conv_info(n).kind == "pointwise"]
    return min(pointwise, key=lambda dn: dn[0])[1] if pointwise else None


class BottleneckToBSConvS(SurgeryPass):
    """Inverted-residual projection -> ``SubspaceProjection`` (BSConv-S ``W_B``, paper 4.2)."""

    kind = "bottleneck->bsconv_s"

    def transform(self, model: nn.Module, ctx: SurgeryContext) -> None:
        if not ctx.trace.ok:
            return
        modules = dict(model.named_modules())
        sites = []
        for node, proj, chain, dw_node in pointwise_after_depthwise(ctx.trace.graph, modules, allow_gates=True):
            dw = conv_info(dw_node)
            found = self._check(node, proj, chain, dw_node, dw, modules, ctx)
            if isinstance(found, str):
                ctx.skip(proj.name, self.kind, f"{proj.name}: {found}")
            else:
                sites.append(found)
        for site in sites:
            self._rewrite(model, ctx, site)

    def _check(self, node: fx.Node, proj: ConvInfo, chain: Chain, dw_node: fx.Node, dw: ConvInfo,
               modules: Dict[str, nn.Module], ctx: SurgeryContext) -> Union[str, dict]:
        if chain.problem:
            return f"between the depthwise '{dw.name}' and this pointwise conv: {chain.problem}"
        if proj.name in ctx.claimed:
            return "already converted by an earlier pass"
        if not ctx.selected(proj.name):
            return "not selected by --include/--exclude"
        conv = modules[proj.name]
        if proj.maths not in _MATHS_OK:
            return f"it is a {proj.cls} ({proj.maths} maths); left as it is"
        if (proj.calls or 0) != 1:
            return f"it is called from {proj.calls} places"
        if tuple(conv.stride) != (1, 1) or tuple(conv.padding) != (0, 0):
            return "the projection has a stride or padding"

        # the expansion: a pointwise conv feeding the depthwise through norm/act only
        before = walk_back(dw_node, modules, allow_gates=False, allow_drop=False)
        if before.conv is None:
            return (f"no pointwise expansion before the depthwise '{dw.name}' "
                    f"({before.problem}): not an inverted residual")
        exp = conv_info(before.conv)
        if exp.kind != "pointwise":
            return (f"no pointwise expansion before the depthwise '{dw.name}': it is fed by "
                    f"'{exp.name}', a {exp.kind} conv (a depthwise-separable block, not an inverted residual)")
        if before.problem:
            return f"between the expansion '{exp.name}' and the depthwise '{dw.name}': {before.problem}"

        # linear: the projection feeds one norm that applies no activation, and no activation follows
        users = list(node.users)
        norm = users[0] if len(users) == 1 else None
        while norm is not None and norm.op == "call_module" and layer_role(modules.get(norm.target)) == "identity":
            norm = next(iter(norm.users)) if len(norm.users) == 1 else None
        if norm is None:
            shown = ", ".join(describe(u, modules) for u in users[:3])
            return f"its output goes to several places ({shown}) instead of one norm"
        if norm.op != "call_module" or layer_role(modules.get(norm.target)) != "norm":
            return f"no norm after the projection: it feeds {describe(norm, modules)}"
        act = activation_of(modules[norm.target])
        if act:
            return f"'{norm.target}' applies {act} after the projection: not a linear bottleneck"
        acts, convs = walk_forward(norm, modules)
        if acts:
            return f"{describe(acts[0], modules)} follows the projection: not a linear bottleneck"
        nxt = find_next_expansion(convs)
        return {
            "name": proj.name,
            "kind": self.kind,
            "cls": proj.cls,
            "in_channels": proj.in_channels,
            "out_channels": proj.out_channels,
            "kernel": list(proj.kernel_size),
            "stride": list(proj.stride),
            "projection": proj.name,
            "norm": norm.target,
            "depthwise": dw.name,
            "expansion": exp.name,
            "expansion_ratio": str(Fraction(exp.out_channels, exp.in_channels)),
            "next_expansion": nxt.target if nxt is not None else None,
            "between": chain.modules_between(modules),
            "p": str(Fraction(proj.out_channels, proj.in_channels)),
            "calls": proj.calls,
        }

    def _rewrite(self, model: nn.Module, ctx: SurgeryContext, site: dict) -> None:
        conv = model.get_submodule(site["name"])
        new = SubspaceProjection.from_conv(conv)
        swap_module(model, site["name"], new)
        ctx.claimed.add(site["name"])
        ctx.replaced.append({**site, "params_before": param_count(conv), "params_after": param_count(new)})
