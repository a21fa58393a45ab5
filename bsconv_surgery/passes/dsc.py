"""Depthwise-separable conv -> BSConv-U by reordering (paper 4.1).

A depthwise-separable conv (DSC) is ``dw KxK (M) -> [norm/act] -> pw 1x1 (M -> N)``. BSConv-U is
the same two steps in the other order: ``pw 1x1 (M -> N) -> dw KxK (N)``. The rewrite puts
the new pointwise at the old depthwise's name, ``nn.Identity`` at the names of the norm and
activation modules that sat between the two (the paper drops them: the blueprint weights must
be free to be negative), and the new depthwise at the old pointwise's name. Whatever followed
the pointwise (its norm and activation, on ``N`` channels) stays.

Parameter change of one site (measured in the tests against this formula)::

    before = M*K^2 (+M dw bias) + R + M*N (+N pw bias)
    after  = M*N + N*K^2 (+N, the pw bias moves to the new depthwise)
    delta  = K^2 * (N - M) - R - (M if the old depthwise had a bias)

with ``K^2 = kh*kw`` and ``R`` the parameters of the removed norm/activation modules
(``2M`` for an affine BatchNorm on ``M`` channels, 0 for a plain activation). So the change is
*not* norm/bias terms only: the depthwise now runs on ``N`` channels instead of ``M`` and grows by
``K^2 (N - M)`` whenever the pair changes the channel count. MACs go up: the pointwise now runs
before the depthwise's stride, and the depthwise on ``N`` channels.
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn

from ..fx.discovery import ConvInfo, depthwise_class_for
from ..fx.graph import Chain, conv_info, innermost_module, layer_role, pointwise_after_depthwise, sole_reader
from ..fx.modules import param_count, swap_module
from ..fx.tracing import module_call_counts
from ..layers import make_depthwise
from .base import SurgeryContext, SurgeryPass

__all__ = ["DSCToBSConvU", "dsc_param_delta"]


def names_selected(ctx: SurgeryContext, names: Iterable[str]) -> bool:
    """``--include``: any of the site's names matches; ``--exclude``: none of them matches."""
    names = list(names)
    include, exclude = ctx.options.include, ctx.options.exclude
    if include and not any(fnmatch.fnmatchcase(n, g) for n in names for g in include):
        return False
    return not any(fnmatch.fnmatchcase(n, g) for n in names for g in exclude)


_MATHS_OK = ("plain", "same")


# --------------------------------------------------------------------------------------------
# The pass
# --------------------------------------------------------------------------------------------


def dsc_param_delta(m: int, n: int, kh: int, kw: int, removed_params: int, dw_bias: bool) -> int:
    """Closed-form parameter change of one reordered pair (see the module docstring)."""
    return kh * kw * (n - m) - removed_params - (m if dw_bias else 0)


class DSCToBSConvU(SurgeryPass):
    """``dw KxK -> [norm/act] -> pw 1x1`` -> ``pw 1x1 -> dw KxK`` (BSConv-U, paper 4.1).

    The new weights start fresh (the reordered pair computes something else), unless the
    initialiser has a ``dsc`` method (``--init svd``, see ``initializers.py``). The new depthwise
    keeps the old one's stride, padding, dilation, padding mode and class (timm ``Conv2dSame``);
    the old pointwise bias moves to it. ``--kernel-sizes`` selects on the depthwise kernel,
    ``--include``/``--exclude`` on either conv name.
    """

    kind = "dsc->bsconv_u"

    def __init__(self, initializer: Optional[Callable] = None):
        self.initializer = initializer

    def transform(self, model: nn.Module, ctx: SurgeryContext) -> None:
        if not ctx.trace.ok:
            return
        modules = dict(model.named_modules())
        calls = module_call_counts(ctx.trace)
        sites = []
        for node, pw, chain, dw_node in pointwise_after_depthwise(ctx.trace.graph, modules, allow_gates=False):
            dw = conv_info(dw_node)
            reason = self._check(chain, dw, pw, modules, calls, ctx)
            if reason:
                ctx.skip(dw.name, self.kind, f"{dw.name} -> {pw.name}: {reason}")
                continue
            sites.append((dw, pw, chain))
        for dw, pw, chain in sites:
            self._rewrite(model, ctx, dw, pw, chain, modules, calls)

    def _check(self, chain: Chain, dw: ConvInfo, pw: ConvInfo, modules, calls, ctx) -> Optional[str]:
        if chain.problem and chain.conv is None:  # the walk stopped at something between them
            node = chain.problem_node
            owner = innermost_module(node) if node is not None and node.op != "call_module" else None
            where = f" (in '{owner[0]}', {owner[1].__name__})" if owner and owner[0] else ""
            return (f"{chain.problem}{where}: only norm/activation modules may sit between a depthwise "
                    "and a pointwise conv that are reordered (a squeeze-excite or any other module "
                    "cannot move to the N output channels)")
        if chain.problem:  # a node of the chain has other users
            return chain.problem
        if dw.name in ctx.claimed or pw.name in ctx.claimed:
            return "already converted by an earlier pass"
        kernels = ctx.options.kernel_sizes
        if kernels is not None and tuple(dw.kernel_size) not in kernels:
            sizes = ",".join(f"{h}x{w}" for h, w in sorted(kernels))
            kh, kw = dw.kernel_size
            return f"not selected: depthwise kernel {kh}x{kw} is not in --kernel-sizes {sizes}"
        if not names_selected(ctx, (dw.name, pw.name)):
            return "not selected by --include/--exclude"
        if dw.out_channels != dw.in_channels:
            multiplier = dw.out_channels // dw.in_channels
            return f"the depthwise has depth multiplier {multiplier}; only multiplier 1 is reordered"
        for info in (dw, pw):
            if info.maths not in _MATHS_OK:
                return f"'{info.name}' is a {info.cls} ({info.maths} maths); left as it is"
            if (info.calls or 0) != 1:
                return f"'{info.name}' is called from {info.calls} places"
        pw_mod = modules[pw.name]
        if tuple(pw_mod.stride) != (1, 1) or tuple(pw_mod.padding) != (0, 0):
            return "the pointwise conv has a stride or padding"
        for node in chain.path:
            if layer_role(modules.get(node.target)) != "identity" and calls.get(node.target, 0) != 1:
                return (f"'{node.target}' between them is called from {calls.get(node.target)} places; "
                        "replacing it by Identity would change the other calls")
        return None

    def _rewrite(self, model: nn.Module, ctx: SurgeryContext, dw: ConvInfo, pw: ConvInfo, chain: Chain, modules,
                 calls: Dict[str, int]) -> None:
        old_dw, old_pw = modules[dw.name], modules[pw.name]
        m, n = old_dw.in_channels, old_pw.out_channels
        kh, kw = old_dw.kernel_size
        factory = {"device": old_dw.weight.device, "dtype": old_dw.weight.dtype}
        removed = [node.target for node in chain.path if layer_role(modules[node.target]) != "identity"]
        removed_params = sum(param_count(modules[name]) for name in removed)
        before = param_count(old_dw) + removed_params + param_count(old_pw)

        new_pw = nn.Conv2d(m, n, 1, bias=False, **factory)
        new_dw = make_depthwise(n, old_dw.kernel_size, old_dw.stride, old_dw.padding, old_dw.dilation,
                            old_pw.bias is not None, old_dw.padding_mode, depthwise_class_for(old_dw), factory)
        if old_pw.bias is not None:
            with torch.no_grad():
                new_dw.bias.copy_(old_pw.bias)
        init = getattr(self.initializer, "dsc", None)
        init_extra = init(old_dw, [(name, modules[name]) for name in removed], old_pw, new_pw, new_dw,
                          after=sole_reader(chain.end, modules, calls)) if init else None
        swap_module(model, dw.name, new_pw)
        for name in removed:
            swap_module(model, name, nn.Identity())
        swap_module(model, pw.name, new_dw)
        ctx.claimed.update((dw.name, pw.name))
        after = param_count(new_pw) + param_count(new_dw)
        ctx.replaced.append({
            "name": dw.name,
            "kind": self.kind,
            "cls": dw.cls,
            "depthwise": dw.name,
            "pointwise": pw.name,
            "removed": removed,
            "in_channels": m,
            "out_channels": n,
            "kernel": [kh, kw],
            "stride": list(dw.stride),
            "params_before": before,
            "params_after": after,
            "params_delta_formula": dsc_param_delta(m, n, kh, kw, removed_params, old_dw.bias is not None),
            "modules": [dw.name, pw.name],
            "calls": 1,
            **(init_extra or {}),
        })

