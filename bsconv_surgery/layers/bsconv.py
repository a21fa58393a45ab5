"""Blueprint separable convolutions (Haase & Amthor, CVPR 2020, section 3.3).

``BSConvU``: pointwise 1x1 (M -> N, no bias) then depthwise KxK on N channels (eq. 6-7).
``BSConvS``: pointwise M -> M' (``W_B``), pointwise M' -> N (``W_A``), depthwise KxK (eq. 12-14).
``SubspaceProjection``: a plain 1x1 conv that is the ``W_B`` of a linear bottleneck read as a
BSConv-S (section 4.2); it computes exactly what the conv it replaces computed.

All three are ordinary modules built from ``nn.Conv2d`` so FX, fvcore, ONNX and
``torch.compile`` see standard layers. One implementation serves every spatial dimension: the
class attribute ``dims`` (1, 2 or 3) picks ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` and the
BatchNorm of that dimension. ``BSConvU``, ``BSConvS`` and ``SubspaceProjection`` are the 2-D
layers; ``BSConvU1d``/``BSConvU3d``, ``BSConvS1d``/``BSConvS3d`` and ``SubspaceProjection1d``/
``SubspaceProjection3d`` the others (``bsconv_class(kind, dims)`` looks them up). The 1-D and
3-D BSConv classes subclass the 2-D ones, so ``isinstance(m, BSConvU)`` finds every BSConv-U.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Dict, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

_Size2 = Union[int, Tuple[int, int]]
_Padding = Union[int, Tuple[int, int], str]

__all__ = [
    "BSConvU",
    "BSConvS",
    "SubspaceProjection",
    "orthonormal_error",
    "mid_channels_for",
    "bsconv_u_params",
    "bsconv_s_params",
    "conv_macs",
    "bsconv_macs",
    "make_depthwise",
    "BSConvU1d",
    "BSConvU3d",
    "BSConvS1d",
    "BSConvS3d",
    "SubspaceProjection1d",
    "SubspaceProjection3d",
    "CONV_CLASSES",
    "NORM_CLASSES",
    "REGULARIZED_TYPES",
    "bsconv_class",
    "conv_dims",
    "kernel_volume",
]

#: The plain conv and BatchNorm class of each spatial dimension.
CONV_CLASSES: Dict[int, Type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM_CLASSES: Dict[int, Type[nn.Module]] = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def conv_dims(conv: nn.Module) -> int:
    """The spatial dimension (1, 2 or 3) of a convolution module, from its kernel."""
    return len(conv.kernel_size)


def kernel_volume(kernel: Union[int, Sequence[int]], kw: Optional[int] = None) -> int:
    """``prod(kernel)``: ``K^2`` of a square 2-D kernel, ``K`` in 1-D, ``K^3`` of a cube.
    ``kernel`` is a kernel tuple, or ``kh`` with ``kw`` (``kw=None``: square)."""
    if isinstance(kernel, (tuple, list)):
        if kw is not None:
            raise ValueError("give either a kernel tuple or kh and kw, not both")
        return math.prod(int(k) for k in kernel)
    return int(kernel) * int(kernel if kw is None else kw)


def orthonormal_error(weight: torch.Tensor) -> torch.Tensor:
    """``|| W W^T - I ||_F`` (paper eq. 9, plain Frobenius norm, not squared).

    ``weight`` is a conv weight ``(M', M, 1, 1)`` or a matrix ``(M', M)``; its rows are the basis.
    """
    w = weight.reshape(weight.shape[0], -1)
    gram = w @ w.t()
    eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
    return torch.linalg.matrix_norm(gram - eye, ord="fro")


def mid_channels_for(in_channels: int, p: Union[float, Fraction], min_mid_channels: int = 4) -> int:
    """``M' = min(M, max(min_mid_channels, ceil(p * M)))`` as in the reference implementation.

    ``ceil`` is taken on the exact fraction (``p = 0.7, M = 10`` gives 7, not 8 from float noise).
    """
    if not 0.0 < float(p) <= 1.0:
        raise ValueError(f"p must be in (0, 1], got {p}")
    exact = Fraction(p).limit_denominator(1_000_000) * in_channels
    return min(in_channels, max(min_mid_channels, math.ceil(exact)))


def bsconv_u_params(m: int, n: int, kh: Union[int, Sequence[int]], kw: Optional[int] = None, bias: bool = False,
                    with_bn: bool = False) -> int:
    """Closed-form parameter count of a ``BSConvU``: ``M*N + N*prod(kernel)`` (+N bias, +2N BN
    affine). ``kh, kw`` of a 2-D kernel, or the kernel tuple of any dimension as ``kh``."""
    return m * n + n * kernel_volume(kh, kw) + (n if bias else 0) + (2 * n if with_bn else 0)


def bsconv_s_params(
    m: int, n: int, kh: Union[int, Sequence[int]], kw: Optional[int], mid: int, bias: bool = False,
    with_bn: bool = False,
) -> int:
    """Closed-form parameter count of a ``BSConvS``: ``M*M' + M'*N + N*prod(kernel)`` (+bias, +BN
    affine). ``kh, kw`` of a 2-D kernel, or the kernel tuple as ``kh`` and ``kw=None``."""
    bn = 2 * (mid + n) if with_bn else 0
    return m * mid + mid * n + n * kernel_volume(kh, kw) + (n if bias else 0) + bn


def conv_macs(m: int, n: int, kernel: Sequence[int], out_volume: int, groups: int = 1) -> int:
    """Closed-form MACs of one call of a conv ``M -> N`` with ``kernel``: one multiply-add per weight
    per output position (``out_volume`` = the output's spatial size, e.g. ``H_out * W_out``)."""
    return out_volume * n * (m // groups) * kernel_volume(kernel)


def bsconv_macs(m: int, n: int, kernel: Sequence[int], in_volume: int, out_volume: int,
                mid: Optional[int] = None) -> int:
    """Closed-form MACs of one call of a ``BSConvU`` (``mid=None``: ``M*N`` at the input's resolution,
    then ``N*prod(kernel)`` at the output's) or a ``BSConvS`` (``M*M' + M'*N`` at the input's
    resolution, then the depthwise). The pointwise steps run before the stride, so a conv whose
    kernel equals its stride (patchify stems) gains MACs."""
    pointwise = m * n if mid is None else m * mid + mid * n
    return in_volume * pointwise + out_volume * n * kernel_volume(kernel)


def make_depthwise(
    channels: int,
    kernel_size: _Size2,
    stride: _Size2,
    padding: _Padding,
    dilation: _Size2,
    bias: bool,
    padding_mode: str,
    conv_cls: Type[nn.Module],
    factory: dict,
) -> nn.Module:
    """The depthwise step of a BSConv (``groups = channels``): it carries the geometry and bias of
    the conv it stands for. ``conv_cls`` is ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``, or a
    padding-only ``nn.Conv2d`` subclass (timm ``Conv2dSame``), which takes no ``padding_mode``;
    ``factory`` holds ``device``/``dtype``."""
    if conv_cls in CONV_CLASSES.values():
        return conv_cls(
            channels, channels, kernel_size, stride, padding, dilation,
            groups=channels, bias=bias, padding_mode=padding_mode, **factory,
        )
    return conv_cls(
        channels, channels, kernel_size, stride, padding, dilation,
        groups=channels, bias=bias, **factory,
    )


class _ConvAttributes:
    """The attributes of the ``nn.Conv2d`` a BSConv stands for, so model code that reads
    ``self.conv.kernel_size`` or ``.stride`` (timm DaViT's ``Downsample`` pads with them) keeps
    working after the swap. ``in_channels`` comes from the first step, the rest from ``dw``."""

    @property
    def in_channels(self) -> int:
        return self[0].in_channels

    @property
    def out_channels(self) -> int:
        return self.dw.out_channels

    kernel_size = property(lambda self: self.dw.kernel_size)
    stride = property(lambda self: self.dw.stride)
    padding = property(lambda self: self.dw.padding)
    dilation = property(lambda self: self.dw.dilation)
    padding_mode = property(lambda self: self.dw.padding_mode)


class _BlueprintConv(_ConvAttributes, nn.Sequential):
    """What ``BSConvU`` and ``BSConvS`` share: one or more 1x1 steps without bias (each followed by
    a BatchNorm with ``with_bn``), then the depthwise step that carries the replaced conv's
    geometry and bias. ``dims`` (1, 2, 3) picks the conv and norm layers of that dimension."""

    dims = 2

    @property
    def conv_cls(self) -> Type[nn.Module]:
        return CONV_CLASSES[self.dims]

    @property
    def norm_cls(self) -> Type[nn.Module]:
        return NORM_CLASSES[self.dims]

    def _build(self, widths: Sequence[int], names: Sequence[Tuple[str, str]], geometry: tuple, bias: bool,
               padding_mode: str, with_bn: bool, bn_kwargs: Optional[dict], depthwise_cls: Optional[Type[nn.Module]],
               factory: dict) -> None:
        """``widths``: channels from the input through each 1x1 step; ``names``: (conv, norm) per
        step; ``geometry``: (kernel_size, stride, padding, dilation) of the depthwise step."""
        for (conv_name, norm_name), cin, cout in zip(names, widths, widths[1:]):
            self.add_module(conv_name, self.conv_cls(cin, cout, 1, bias=False, **factory))
            if with_bn:
                self.add_module(norm_name, self.norm_cls(cout, **(bn_kwargs or {}), **factory))
        dw_cls = depthwise_cls or self.conv_cls
        self.add_module("dw", make_depthwise(widths[-1], *geometry, bias, padding_mode, dw_cls, factory))


class BSConvU(_BlueprintConv):
    """Unconstrained BSConv: ``pw`` (M -> N, 1x1, no bias) [-> ``bn``] -> ``dw`` (KxK, groups N).

    The depthwise step carries the stride, padding (ints or ``'same'``/``'valid'``), dilation,
    padding mode and bias of the convolution it stands for. ``depthwise_cls`` lets a
    padding-only ``nn.Conv2d`` subclass (timm ``Conv2dSame``) keep its dynamic padding
    (default: the plain conv of ``dims``).

    >>> import torch, bsconv_surgery as bs
    >>> layer = bs.BSConvU(32, 64, kernel_size=3, padding=1)
    >>> sum(p.numel() for p in layer.parameters())  # M*N + N*K*K + N (bias): 2048 + 576 + 64
    2688
    >>> layer(torch.randn(1, 32, 8, 8)).shape
    torch.Size([1, 64, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Size2 = 3, stride: _Size2 = 1,
                 padding: _Padding = 0, dilation: _Size2 = 1, bias: bool = True, padding_mode: str = "zeros",
                 with_bn: bool = False, bn_kwargs: Optional[dict] = None,
                 depthwise_cls: Optional[Type[nn.Module]] = None, device=None, dtype=None):
        super().__init__()
        self._build((in_channels, out_channels), [("pw", "bn")], (kernel_size, stride, padding, dilation), bias,
                    padding_mode, with_bn, bn_kwargs, depthwise_cls, {"device": device, "dtype": dtype})


class BSConvS(_BlueprintConv):
    """Subspace BSConv: ``pw1`` (M -> M', ``W_B``) [-> ``bn1``] -> ``pw2`` (M' -> N, ``W_A``)
    [-> ``bn2``] -> ``dw`` (KxK, groups N), with ``M' = min(M, max(min_mid_channels, ceil(p*M)))``.

    ``orthonormal_loss()`` is ``||W_B W_B^T - I||_F`` (paper eq. 9).

    >>> import torch, bsconv_surgery as bs
    >>> layer = bs.BSConvS(32, 64, kernel_size=3, padding=1, p=0.25)
    >>> layer.mid_channels  # M' = min(32, max(4, ceil(0.25 * 32)))
    8
    >>> sum(p.numel() for p in layer.parameters())  # M*M' + M'*N + N*K*K + N: 256 + 512 + 576 + 64
    1408
    >>> layer(torch.randn(1, 32, 8, 8)).shape
    torch.Size([1, 64, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: _Size2 = 3, stride: _Size2 = 1,
                 padding: _Padding = 0, dilation: _Size2 = 1, bias: bool = True, padding_mode: str = "zeros",
                 p: Union[float, Fraction] = 0.25, min_mid_channels: int = 4, with_bn: bool = False,
                 bn_kwargs: Optional[dict] = None, depthwise_cls: Optional[Type[nn.Module]] = None, device=None,
                 dtype=None):
        super().__init__()
        mid = mid_channels_for(in_channels, p, min_mid_channels)
        self._build((in_channels, mid, out_channels), [("pw1", "bn1"), ("pw2", "bn2")],
                    (kernel_size, stride, padding, dilation), bias, padding_mode, with_bn, bn_kwargs,
                    depthwise_cls, {"device": device, "dtype": dtype})

    @property
    def mid_channels(self) -> int:
        return self.pw1.out_channels

    def orthonormal_loss(self) -> torch.Tensor:
        """``||W_B W_B^T - I||_F`` of the subspace projection ``pw1``."""
        return orthonormal_error(self.pw1.weight)


class _Projection:
    """What the subspace projections of every dimension share (mixed into ``nn.ConvNd``)."""

    def orthonormal_loss(self) -> torch.Tensor:
        """``||W_B W_B^T - I||_F`` with ``W_B`` the ``(out, in)`` projection matrix."""
        return orthonormal_error(self.weight)

    @classmethod
    def from_conv(cls, conv: nn.Module) -> "_Projection":
        """A projection carrying ``conv``'s weights (``conv`` must be 1x1, stride 1, groups 1, of
        this class's dimension)."""
        ones = (1,) * len(conv.kernel_size)
        if conv.kernel_size != ones or conv.stride != ones or conv.groups != 1:
            raise ValueError("a subspace projection must be a 1x1, stride-1, groups-1 convolution")
        if not isinstance(conv, CONV_CLASSES[len(ones)]) or not issubclass(cls, CONV_CLASSES[len(ones)]):
            raise ValueError(f"{cls.__name__} cannot stand for a {type(conv).__name__}")
        new = cls(
            conv.in_channels, conv.out_channels, 1, bias=conv.bias is not None,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            new.weight.copy_(conv.weight)
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        new.train(conv.training)
        return new


class SubspaceProjection(_Projection, nn.Conv2d):
    """The linear projection of an inverted-residual block, read as the ``W_B`` of a BSConv-S.

    A 1x1, stride-1, groups-1 convolution, numerically the conv it replaces (same parameter
    names, so checkpoints load unchanged). Its class marks it for ``regularization_loss``.

    >>> import torch, bsconv_surgery as bs
    >>> conv = torch.nn.Conv2d(64, 16, 1)
    >>> projection = bs.SubspaceProjection.from_conv(conv)
    >>> x = torch.randn(1, 64, 4, 4)
    >>> torch.equal(projection(x), conv(x)), isinstance(projection, torch.nn.Conv2d)
    (True, True)
    >>> projection.load_state_dict(conv.state_dict())  # the conv's parameter names
    <All keys matched successfully>
    """


class SubspaceProjection1d(_Projection, nn.Conv1d):
    """``SubspaceProjection`` for ``nn.Conv1d``."""


class SubspaceProjection3d(_Projection, nn.Conv3d):
    """``SubspaceProjection`` for ``nn.Conv3d``."""


class BSConvU1d(BSConvU):
    """``BSConvU`` of ``nn.Conv1d`` steps (BatchNorm1d with ``with_bn``)."""

    dims = 1


class BSConvU3d(BSConvU):
    """``BSConvU`` of ``nn.Conv3d`` steps (BatchNorm3d with ``with_bn``)."""

    dims = 3


class BSConvS1d(BSConvS):
    """``BSConvS`` of ``nn.Conv1d`` steps."""

    dims = 1


class BSConvS3d(BSConvS):
    """``BSConvS`` of ``nn.Conv3d`` steps."""

    dims = 3


_CLASSES: Dict[Tuple[str, int], type] = {
    ("u", 1): BSConvU1d, ("u", 2): BSConvU, ("u", 3): BSConvU3d,
    ("s", 1): BSConvS1d, ("s", 2): BSConvS, ("s", 3): BSConvS3d,
    ("projection", 1): SubspaceProjection1d, ("projection", 2): SubspaceProjection, ("projection", 3): SubspaceProjection3d,
}

#: Every class that carries the orthonormal regulariser (``regularization.py`` finds sites by these).
REGULARIZED_TYPES: Tuple[type, ...] = (BSConvS, _Projection)


def bsconv_class(kind: str, dims: int) -> type:
    """The layer of ``kind`` (``u``, ``s``, ``projection``) for ``dims`` (1, 2, 3)."""
    try:
        return _CLASSES[(kind, dims)]
    except KeyError:
        raise ValueError(f"no {kind!r} layer for {dims}-d convolutions (1, 2 and 3 exist)") from None
