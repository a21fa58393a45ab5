"""Standard conv -> BSConv-U / BSConv-S (paper 3.3): one conv module becomes one BSConv module of
the same spatial dimension (``nn.Conv1d`` -> ``BSConvU1d``, ``nn.Conv3d`` -> ``BSConvU3d``, ...)."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Dict, Iterator, Optional

import torch
from torch import nn

from ..fx.discovery import ConvInfo, depthwise_class_for
from ..fx.modules import param_count, swap_module
from ..layers import (BSConvS, bsconv_class, bsconv_macs, bsconv_s_params, bsconv_u_params, conv_dims, conv_macs,
                      mid_channels_for)
from ..core.options import SurgeryOptions
from ..core.records import SiteRecord
from .base import SurgeryContext, SurgeryPass, conv_record

__all__ = ["ConvToBSConv", "CONV_BUILDERS", "auto_p", "replacement_mid_channels", "growth_reason"]


def _build_bsconv_u(conv: nn.Module, options: SurgeryOptions) -> nn.Module:
    return bsconv_class("u", conv_dims(conv))(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        with_bn=options.with_bn, depthwise_cls=depthwise_class_for(conv),
        device=conv.weight.device, dtype=conv.weight.dtype,
    )


def auto_p(conv: nn.Module, options: SurgeryOptions) -> Fraction:
    """``--p auto``: the ``p = M'/M`` whose BSConv-S parameter count (``bsconv_s_params``, with
    ``--with-bn`` and the bias) is closest to the conv's own; ties go to the smaller ``M'``.

    The count grows with ``M'``; for a 3x3 (or larger) conv it stays below ``M*N*K^2`` even at
    ``M' = M`` (``M^2 + M*N + N*K^2 < M*N*K^2`` once ``M >= 2``), so the pick is ``p = 1``.
    """
    m, n = conv.in_channels, conv.out_channels
    kernel = tuple(conv.kernel_size)
    bias = conv.bias is not None
    target = param_count(conv)
    lowest = min(m, options.min_mid_channels)
    mid = min(range(lowest, m + 1),
              key=lambda k: (abs(bsconv_s_params(m, n, kernel, None, k, bias, options.with_bn) - target), k))
    return Fraction(mid, m)


def _build_bsconv_s(conv: nn.Module, options: SurgeryOptions, p=None) -> nn.Module:
    if p is None and options.p == "auto":
        p = auto_p(conv, options)
    return bsconv_class("s", conv_dims(conv))(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
        p=options.p if p is None else p, min_mid_channels=options.min_mid_channels,
        with_bn=options.with_bn, depthwise_cls=depthwise_class_for(conv),
        device=conv.weight.device, dtype=conv.weight.dtype,
    )


def replacement_mid_channels(conv: nn.Module, variant: str, options: SurgeryOptions) -> Optional[int]:
    """``M'`` of the BSConv-S that would replace ``conv`` (``None`` for BSConv-U)."""
    if variant != "s":
        return None
    p = auto_p(conv, options) if options.p == "auto" else options.p
    return mid_channels_for(conv.in_channels, p, options.min_mid_channels)


def growth_reason(conv: nn.Module, variant: str, options: SurgeryOptions, call_sizes: Optional[list]) -> Optional[str]:
    """Why converting ``conv`` would not pay: its replacement's parameters (closed form, with
    bias and ``--with-bn``) or MACs (over every call of ``call_sizes``: the pointwise steps at the
    input's resolution, the depthwise at the output's) would not be fewer than the conv's own;
    ``None`` when both shrink (MACs unknown: parameters alone)."""
    m, n, kernel = conv.in_channels, conv.out_channels, tuple(conv.kernel_size)
    mid = replacement_mid_channels(conv, variant, options)
    bias = conv.bias is not None
    params = (param_count(conv), bsconv_u_params(m, n, kernel, None, bias, options.with_bn) if mid is None
              else bsconv_s_params(m, n, kernel, None, mid, bias, options.with_bn))
    grows = []
    if params[1] >= params[0]:
        grows.append(("parameters", params))
    if call_sizes:
        volume = lambda size: math.prod(size)  # noqa: E731
        macs = (sum(conv_macs(m, n, kernel, volume(out)) for _, out in call_sizes),
                sum(bsconv_macs(m, n, kernel, volume(inp), volume(out), mid) for inp, out in call_sizes))
        if macs[1] >= macs[0]:
            grows.append(("MACs", macs))
    if not grows:
        return None
    said, verb = [], None
    for what, (before, after) in grows:
        this = "grow" if after > before else "not reduce"
        said.append(f"{this + ' ' if this != verb else ''}the {what} ({before:,} -> {after:,})")
        verb = this
    return f"converting it would {' and '.join(said)}; --allow-growth converts it anyway"


#: Builders of the replacement for one standard conv, by variant.
CONV_BUILDERS: Dict[str, Callable[..., nn.Module]] = {"u": _build_bsconv_u, "s": _build_bsconv_s}


_SKIP_MATHS = {
    "weight-standardised": "{cls} standardises each whole MxKxK filter before the conv; "
    "a blueprint factorisation cannot carry that exactly, so it is left as it is",
    "custom": "{cls} overrides nn.Conv2d.forward with maths this tool does not know; left as it is",
}


class ConvToBSConv(SurgeryPass):
    """Standard conv (groups 1, kernel > 1; 1-D, 2-D or 3-D) -> ``BSConvU`` or ``BSConvS`` of its
    dimension.

    Stride, padding (dynamic 'same' too), dilation, padding mode, bias (its values are
    copied into the depthwise step), dtype and device carry over; the factorised weights start
    fresh unless an initialiser is given. A conv called from several places stays shared: the
    one replacement serves every call, which is what sharing it meant.
    """

    preserves_computation = False  # the factorised weights are new (or a best fit, --init svd)

    def __init__(self, variant: str, initializer: Optional[Callable] = None):
        self.variant = variant
        self.kind = f"conv->bsconv_{variant}"
        self.build = CONV_BUILDERS[variant]
        self.initializer = initializer

    def match(self, model: nn.Module, ctx: SurgeryContext) -> Iterator[ConvInfo]:
        """Standard convs not claimed by an earlier pass (the ``ConvInfo`` is the site)."""
        for info in ctx.discovery.convs.values():
            if info.kind == "standard" and info.name not in ctx.claimed:
                yield info

    def guard(self, model: nn.Module, info: ConvInfo, ctx: SurgeryContext) -> Optional[str]:
        options = ctx.options
        if not options.selects_kernel(info.kernel_size):
            kernel = "x".join(map(str, info.kernel_size))
            return f"not selected: kernel {kernel} is not in --kernel-sizes {options.kernel_sizes_label}"
        if not options.selects(info.name):
            return "not selected by --include/--exclude"
        if info.maths in _SKIP_MATHS:
            return _SKIP_MATHS[info.maths].format(cls=info.cls)
        if info.hidden:
            return f"hidden from the graph: {info.hidden_reason}"
        if not options.allow_growth:
            return growth_reason(model.get_submodule(info.name), self.variant, options, ctx.call_sizes(model, info))
        return None

    def swap(self, model: nn.Module, info: ConvInfo, ctx: SurgeryContext) -> SiteRecord:
        conv = model.get_submodule(info.name)
        new = self.build(conv, ctx.options)
        init_note = self._initialise(conv, new)
        swap_module(model, info.name, new)
        details = {"calls_note": f"called from {info.calls} places; one shared replacement"} if (info.calls or 0) > 1 else {}
        if isinstance(new, BSConvS):
            details["mid_channels"] = new.mid_channels
            auto = ctx.options.p == "auto"
            details["p"] = str(Fraction(new.mid_channels, info.in_channels)) if auto else str(ctx.options.p)
        if init_note:
            details.update(init_note)
        return conv_record(self.kind, info, param_count(conv), param_count(new), **details)

    def _initialise(self, conv: nn.Module, new: nn.Module) -> Optional[dict]:
        with torch.no_grad():
            if conv.bias is not None:
                new.dw.bias.copy_(conv.bias)
        if self.initializer is not None:
            return self.initializer(conv, new)
        return None

