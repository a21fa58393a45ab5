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

with ``K^2 = prod(kernel)`` (``kh*kw``; ``K`` for a 1-D pair, ``kt*kh*kw`` for a 3-D one) and ``R`` the parameters of the removed norm/activation modules
(``2M`` for an affine BatchNorm on ``M`` channels, 0 for a plain activation). So the change is
*not* norm/bias terms only: the depthwise now runs on ``N`` channels instead of ``M`` and grows by
``K^2 (N - M)`` whenever the pair changes the channel count. MACs go up: the pointwise now runs
before the depthwise's stride, and the depthwise on ``N`` channels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional

import torch
from torch import nn

from ..fx.discovery import ConvInfo, depthwise_class_for, plain_conv_class
from ..fx.graph import (Chain, activation_of, conv_info, innermost_module, layer_role, pointwise_after_depthwise,
                        sole_reader)
from ..fx.modules import param_count, swap_module
from ..fx.tracing import module_call_counts
from ..layers import bsconv_macs, conv_macs, kernel_volume, make_depthwise
from ..core.records import SiteRecord, SkipRecord
from .base import SurgeryContext, SurgeryPass

__all__ = ["DSCToBSConvU", "dsc_param_delta", "dsc_growth_reason"]

_MATHS_OK = ("plain", "same")


def dsc_param_delta(m: int, n: int, kh, kw: Optional[int], removed_params: int, dw_bias: bool) -> int:
    """Closed-form parameter change of one reordered pair (see the module docstring); ``kh, kw``
    of a 2-D kernel, or the kernel tuple as ``kh`` and ``kw=None``."""
    return kernel_volume(kh, kw) * (n - m) - removed_params - (m if dw_bias else 0)


def dsc_growth_reason(dw: nn.Module, pw: nn.Module, removed_params: int, call_sizes: Optional[list]) -> Optional[str]:
    """Why reordering ``dw -> pw`` would grow the site: its parameters (``dsc_param_delta`` > 0) or
    its conv MACs over every call of the depthwise (``call_sizes``: before, the depthwise and the
    pointwise both at the output's resolution; after, the pointwise at the *input's* resolution,
    in front of the stride, and the depthwise on ``N`` channels). ``None`` when neither grows.
    Unlike a standard conv, a reorder that keeps a count equal is not refused: the reorder is
    the paper's structural rewrite, not a saving."""
    m, n, kernel = dw.in_channels, pw.out_channels, tuple(dw.kernel_size)
    before = param_count(dw) + removed_params + param_count(pw)
    grows = [("parameters", before, before + dsc_param_delta(m, n, kernel, None, removed_params, dw.bias is not None))]
    if call_sizes:
        volume = math.prod
        grows.append(("MACs", sum(conv_macs(m, m, kernel, volume(out), groups=m) + conv_macs(m, n, (1,), volume(out))
                                  for _, out in call_sizes),
                      sum(bsconv_macs(m, n, kernel, volume(inp), volume(out)) for inp, out in call_sizes)))
    said = [f"the {what} ({old:,} -> {new:,})" for what, old, new in grows if new > old]
    if not said:
        return None
    stride = "x".join(map(str, dw.stride))
    why = f" (the pointwise step would run before the stride {stride})" if any(s != 1 for s in dw.stride) else ""
    return f"reordering it would grow {' and '.join(said)}{why}; --allow-growth reorders it anyway"


@dataclass
class PairSite:
    """A depthwise conv, the pointwise conv it feeds, and what lies between them (``chain``);
    ``modules`` and ``calls`` are the model's as they were when the pass matched."""

    name: str
    dw: ConvInfo
    pw: ConvInfo
    chain: Chain
    modules: Dict[str, nn.Module]
    calls: Dict[str, int]

    @property
    def removed(self) -> List[str]:
        """The norm/activation modules between the two convs: the reorder replaces them by Identity."""
        return [node.target for node in self.chain.path if layer_role(self.modules[node.target]) != "identity"]

    @property
    def removed_params(self) -> int:
        return sum(param_count(self.modules[name]) for name in self.removed)


class DSCToBSConvU(SurgeryPass):
    """``dw KxK -> [norm/act] -> pw 1x1`` -> ``pw 1x1 -> dw KxK`` (BSConv-U, paper 4.1).

    The new weights start fresh (the reordered pair computes something else), unless the
    initialiser has a ``dsc`` method (``--init svd``, see ``initializers.py``). The new depthwise
    keeps the old one's stride, padding, dilation, padding mode and class (timm ``Conv2dSame``);
    the old pointwise bias moves to it. ``--kernel-sizes`` selects on the depthwise kernel,
    ``--include``/``--exclude`` on either conv name.
    """

    kind = "dsc->bsconv_u"
    preserves_computation = False  # the pair computes in the other order now

    def __init__(self, initializer: Optional[Callable] = None):
        self.initializer = initializer

    def match(self, model: nn.Module, ctx: SurgeryContext) -> Iterator[PairSite]:
        if not ctx.graphs():
            return
        modules = dict(model.named_modules())
        calls = module_call_counts(ctx.trace)
        for graph in ctx.graphs():
            for _, pw, chain, dw_node in pointwise_after_depthwise(graph, modules, allow_gates=False):
                dw = conv_info(dw_node)
                yield PairSite(dw.name, dw, pw, chain, modules, calls)

    def skip_record(self, site: PairSite, reason: str) -> SkipRecord:
        return SkipRecord(site.name, self.kind, f"{site.dw.name} -> {site.pw.name}: {reason}")

    def guard(self, model: nn.Module, site: PairSite, ctx: SurgeryContext) -> Optional[str]:
        dw, pw, chain, modules, calls = site.dw, site.pw, site.chain, site.modules, site.calls
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
        if not ctx.options.selects_kernel(dw.kernel_size):
            kernel = "x".join(map(str, dw.kernel_size))
            return f"not selected: depthwise kernel {kernel} is not in --kernel-sizes {ctx.options.kernel_sizes_label}"
        if not ctx.options.selects(dw.name, pw.name):
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
        if dw.dims != pw.dims:
            return f"a {dw.dims}-d depthwise conv feeds a {pw.dims}-d pointwise conv"
        if any(s != 1 for s in pw_mod.stride) or pw_mod.padding not in ((0,) * pw.dims, "valid"):
            return "the pointwise conv has a stride or padding"
        for name in site.removed:
            if calls.get(name, 0) != 1:
                return (f"'{name}' between them is called from {calls.get(name)} places; "
                        "replacing it by Identity would change the other calls")
        if not ctx.options.allow_growth:
            return dsc_growth_reason(modules[dw.name], pw_mod, site.removed_params, ctx.call_sizes(model, dw))
        return None

    def swap(self, model: nn.Module, site: PairSite, ctx: SurgeryContext) -> SiteRecord:
        dw, pw, chain, modules = site.dw, site.pw, site.chain, site.modules
        old_dw, old_pw = modules[dw.name], modules[pw.name]
        m, n = old_dw.in_channels, old_pw.out_channels
        kernel = list(old_dw.kernel_size)
        factory = {"device": old_dw.weight.device, "dtype": old_dw.weight.dtype}
        removed, removed_params = site.removed, site.removed_params
        before = param_count(old_dw) + removed_params + param_count(old_pw)

        new_pw = plain_conv_class(old_dw)(m, n, 1, bias=False, **factory)
        new_dw = make_depthwise(n, old_dw.kernel_size, old_dw.stride, old_dw.padding, old_dw.dilation,
                                old_pw.bias is not None, old_dw.padding_mode, depthwise_class_for(old_dw), factory)
        if old_pw.bias is not None:
            with torch.no_grad():
                new_dw.bias.copy_(old_pw.bias)
        init = getattr(self.initializer, "dsc", None)
        after = sole_reader(chain.end, modules, site.calls) if init else None
        init_extra = init(old_dw, [(name, modules[name]) for name in removed], old_pw, new_pw, new_dw,
                          after=after) if init else None
        if init_extra and init_extra.get("constant", "").startswith("the running mean"):
            # the site changed that BatchNorm too: sensitivity swaps it with the site
            init_extra["constant_module"] = next(n for n, m in modules.items() if m is after)
        swap_module(model, dw.name, new_pw)
        for name in removed:
            swap_module(model, name, nn.Identity())
        swap_module(model, pw.name, new_dw)
        return SiteRecord(dw.name, self.kind, dw.cls, m, n, kernel, list(dw.stride), before,
                          param_count(new_pw) + param_count(new_dw), 1, details={
                              "depthwise": dw.name,
                              "pointwise": pw.name,
                              "removed": removed,
                              "params_delta_formula": dsc_param_delta(m, n, tuple(kernel), None, removed_params, old_dw.bias is not None),
                              "modules": [dw.name, pw.name],
                              # an activation between them: the reorder cannot keep trained weights' function
                              "nonlinear_between": [f"{name} ({activation_of(modules[name])})" for name in removed
                                                    if activation_of(modules[name]) is not None],
                              **(init_extra or {}),
                          })
