"""Compiler-friendly forms of the BSConv steps, for inference under ``torch.compile``.

A BSConv block is one or two pointwise convs and a depthwise conv. oneDNN runs each as its own
kernel, and at small batch sizes the fixed cost per call (weight reorder, thread start-up)
is a large part of the time of these small layers. The lowering pass (``passes/lowering.py``)
swaps the steps inside every ``BSConvU`` / ``BSConvS`` for these two ``nn.Conv2d`` subclasses,
which compute the same thing with plain tensor ops on the NHWC view of a channels_last tensor:

- ``PointwiseAsLinear``: the 1x1 conv is one matmul over the channel dimension
  (``F.linear`` on ``x.permute(0, 2, 3, 1)``, no copy for channels_last input);
- ``DepthwiseAsStencil``: the KxK depthwise conv is the sum of K*K shifted, per-channel scaled
  slices of the padded input (plus the bias).

Eagerly that is many small ops and no faster; under inductor the stencil, its bias, the
activation and a residual add after it fuse into one vectorised loop that reads the matmul's
output once. Parameters keep their names and shapes (the state dict does not change).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PointwiseAsLinear", "DepthwiseAsStencil"]


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
