"""Compiler-friendly forms of the BSConv steps, for inference under ``torch.compile``.

A BSConv block is one or two pointwise convs and a depthwise conv. oneDNN runs each as its own
kernel, and at small batch sizes the fixed cost per call (weight reorder, thread start-up)
is a large part of the time of these small layers. ``lower_bsconv`` swaps the steps inside
every ``BSConvU`` / ``BSConvS`` for two ``nn.Conv2d`` subclasses that compute the same thing
with plain tensor ops on the NHWC view of a channels_last tensor:

- ``PointwiseAsLinear``: the 1x1 conv is one matmul over the channel dimension
  (``F.linear`` on ``x.permute(0, 2, 3, 1)``, no copy for channels_last input);
- ``DepthwiseAsStencil``: the KxK depthwise conv is the sum of K*K shifted, per-channel scaled
  slices of the padded input (plus the bias).

Eagerly that is many small ops and no faster; under inductor the stencil, its bias, the
activation and a residual add after it fuse into one vectorised loop that reads the matmul's
output once. Parameters keep their names and shapes (the state dict does not change).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import BSConvS, BSConvU
from .passes.base import swap_module

__all__ = ["PointwiseAsLinear", "DepthwiseAsStencil", "LoweringReport", "lower_bsconv"]


def _copy_with_class(conv: nn.Conv2d, cls: type) -> nn.Conv2d:
    """A ``cls`` instance with ``conv``'s hyper-parameters that shares its parameters."""
    new = cls(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, conv.bias is not None, conv.padding_mode, device="meta", dtype=conv.weight.dtype,
    )
    new.weight = conv.weight
    new.bias = conv.bias
    return new.train(conv.training)


def _batched(x: torch.Tensor):
    return (x, False) if x.dim() == 4 else (x.unsqueeze(0), True)


class PointwiseAsLinear(nn.Conv2d):
    """A 1x1 conv (stride 1, no padding, one group) computed as ``F.linear`` over channels."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "PointwiseAsLinear":
        return _copy_with_class(conv, cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, unbatched = _batched(x)
        y = F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return y.squeeze(0) if unbatched else y


class DepthwiseAsStencil(nn.Conv2d):
    """A depthwise conv (groups = in = out channels, zero padding) computed as a sum of shifted
    slices: ``y[h, w, c] = b[c] + sum_ij x_pad[h*s + i*d, w*s + j*d, c] * W[c, i, j]``."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "DepthwiseAsStencil":
        return _copy_with_class(conv, cls)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, unbatched = _batched(x)
        h = x.permute(0, 2, 3, 1)  # N, H, W, C: the channels vectorise, the taps are offsets
        left, right, top, bottom = self._reversed_padding_repeated_twice
        if left or right or top or bottom:
            h = F.pad(h, (0, 0, left, right, top, bottom))
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        out_h = (h.shape[1] - dh * (kh - 1) - 1) // sh + 1
        out_w = (h.shape[2] - dw * (kw - 1) - 1) // sw + 1
        # (kh, kw, C) contiguous: each tap's per-channel scale is a dense vector (frozen weights
        # constant-fold this copy; indexing the (C, 1, kh, kw) weight directly makes strided loads)
        weight = self.weight[:, 0].permute(1, 2, 0).contiguous()
        acc: Optional[torch.Tensor] = None
        for i in range(kh):
            for j in range(kw):
                tap = h[:, i * dh: i * dh + sh * (out_h - 1) + 1: sh, j * dw: j * dw + sw * (out_w - 1) + 1: sw, :]
                tap = tap * weight[i, j]
                acc = tap if acc is None else acc + tap
        if self.bias is not None:
            acc = acc + self.bias
        y = acc.permute(0, 3, 1, 2)
        return y.squeeze(0) if unbatched else y


def _pointwise_unlowerable(conv: nn.Module) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
        return "not a 1x1, stride-1, single-group conv"
    if conv.padding not in ((0, 0), "valid"):
        return "padded"
    return None


def _depthwise_unlowerable(conv: nn.Module) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d (it may pad on the fly)"
    if not conv.groups == conv.in_channels == conv.out_channels:
        return "not depthwise with one filter per channel"
    if conv.padding_mode != "zeros":
        return f"padding mode {conv.padding_mode!r}"
    return None


@dataclass
class LoweringReport:
    """The BSConv steps ``lower_bsconv`` swapped, and the ones it left (with why)."""

    lowered: List[Dict[str, str]] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return {"lowered": list(self.lowered), "skipped": list(self.skipped)}


def lower_bsconv(model: nn.Module) -> LoweringReport:
    """Swap the pointwise and depthwise steps of every BSConv in ``model`` (in place) for
    ``PointwiseAsLinear`` / ``DepthwiseAsStencil``. Outputs stay the same up to float rounding;
    it pays under ``torch.compile`` with channels_last input (see ``prepare_for_inference``)."""
    report = LoweringReport()
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, (BSConvU, BSConvS))]
    for block_name, block in blocks:
        prefix = f"{block_name}." if block_name else ""
        for child_name, child in block.named_children():
            if child_name == "dw":
                cls, reason = DepthwiseAsStencil, _depthwise_unlowerable(child)
            elif child_name in ("pw", "pw1", "pw2"):
                cls, reason = PointwiseAsLinear, _pointwise_unlowerable(child)
            else:
                continue  # an unfolded inner BatchNorm stays as it is
            name = prefix + child_name
            if reason:
                report.skipped.append({"name": name, "reason": reason})
                continue
            swap_module(model, name, cls.from_conv(child))
            report.lowered.append({"name": name, "as": cls.__name__})
    return report
