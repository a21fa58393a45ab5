"""BSConv-U / BSConv-S / subspace projection for 1-D and 3-D convolutions (and 2-D, the same code):
closed-form parameter counts and equality with a full conv whose filters are ``w[n, m] * B[n]``."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bsconv_surgery.layers import (
    CONV_CLASSES,
    BSConvS,
    BSConvS1d,
    BSConvS3d,
    BSConvU,
    BSConvU1d,
    BSConvU3d,
    SubspaceProjection,
    SubspaceProjection1d,
    SubspaceProjection3d,
    bsconv_class,
    bsconv_s_params,
    bsconv_u_params,
    kernel_volume,
    mid_channels_for,
)
from bsconv_surgery.layers.regularization import regularization_loss, regularization_sites

U = {1: BSConvU1d, 2: BSConvU, 3: BSConvU3d}
S = {1: BSConvS1d, 2: BSConvS, 3: BSConvS3d}
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
SPATIAL = {1: (23,), 2: (11, 13), 3: (5, 7, 9)}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def kernel(dims, k):
    return (k,) * dims


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("m,n,k,bias,with_bn", [(16, 32, 3, False, False), (8, 8, 5, True, False), (1, 24, 7, True, True)])
def test_bsconv_u_params_closed_form(dims, m, n, k, bias, with_bn):
    layer = U[dims](m, n, k, bias=bias, with_bn=with_bn)
    expected = m * n + n * k ** dims + (n if bias else 0) + (2 * n if with_bn else 0)
    assert n_params(layer) == expected == bsconv_u_params(m, n, kernel(dims, k), None, bias, with_bn)
    conv = CONV_CLASSES[dims](m, n, k, bias=bias)
    assert n_params(conv) == m * n * k ** dims + (n if bias else 0)
    assert layer.dw.kernel_size == kernel(dims, k) and type(layer.pw) is CONV_CLASSES[dims]
    if with_bn:
        assert type(layer.bn).__name__ == f"BatchNorm{dims}d"


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("m,n,k,p,with_bn", [(64, 32, 3, 0.25, False), (12, 20, 3, 0.5, True), (3, 16, 5, 0.25, False)])
def test_bsconv_s_params_closed_form(dims, m, n, k, p, with_bn):
    layer = S[dims](m, n, k, bias=False, p=p, with_bn=with_bn)
    mid = mid_channels_for(m, p)
    assert layer.mid_channels == mid
    expected = m * mid + mid * n + n * k ** dims + (2 * (mid + n) if with_bn else 0)
    assert n_params(layer) == expected == bsconv_s_params(m, n, kernel(dims, k), None, mid, False, with_bn)


def test_kernel_volume_and_two_d_signature_unchanged():
    assert kernel_volume((3, 3, 3)) == 27 and kernel_volume((7,)) == 7 and kernel_volume(3) == 9
    assert kernel_volume(1, 7) == 7
    assert bsconv_u_params(4, 8, 3, 3) == bsconv_u_params(4, 8, (3, 3)) == 4 * 8 + 8 * 9
    with pytest.raises(ValueError):
        kernel_volume((3, 3), 3)


GEOMETRY = [
    dict(k=3, stride=1, padding=1),
    dict(k=3, stride=2, padding=1),
    dict(k=3, stride=1, padding=2, dilation=2),
    dict(k=3, stride=1, padding="same"),
    dict(k=3, stride=1, padding=1, padding_mode="reflect"),
    dict(k=3, stride=1, padding=1, padding_mode="circular"),
]


def _reference(dims, x, full, bias, cfg):
    """The full conv with filters ``full`` (padding modes applied by hand, as nn.ConvNd does)."""
    mode = cfg.get("padding_mode", "zeros")
    if mode != "zeros":
        x = F.pad(x, (cfg["padding"],) * (2 * dims), mode=mode)
        return CONV_FN[dims](x, full, bias, cfg["stride"], 0, cfg.get("dilation", 1))
    return CONV_FN[dims](x, full, bias, cfg["stride"], cfg["padding"], cfg.get("dilation", 1))


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("cfg", GEOMETRY, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("bias", [False, True])
def test_bsconv_u_equals_full_conv_with_blueprint_filters(dims, cfg, bias):
    """Paper eq. 2: ``F[n, m] = w[n, m] * B[n]``, in float64, for every dimension."""
    torch.manual_seed(0)
    m, n = 5, 7
    args = {key: v for key, v in cfg.items() if key != "k"}
    layer = U[dims](m, n, cfg["k"], bias=bias, dtype=torch.float64, **args)
    w = layer.pw.weight.reshape(n, m)
    blueprints = layer.dw.weight[:, 0]  # (N, *K)
    full = w.reshape(n, m, *([1] * dims)) * blueprints[:, None]
    x = torch.randn(2, m, *SPATIAL[dims], dtype=torch.float64)
    torch.testing.assert_close(layer(x), _reference(dims, x, full, layer.dw.bias, cfg))
    # a wrong blueprint (another filter's) must not pass
    wrong = w.reshape(n, m, *([1] * dims)) * blueprints.roll(1, 0)[:, None]
    assert not torch.allclose(layer(x), _reference(dims, x, wrong, layer.dw.bias, cfg))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_bsconv_s_equals_full_conv_with_factored_weights(dims):
    torch.manual_seed(0)
    layer = S[dims](12, 8, 3, padding=1, p=0.25, dtype=torch.float64)
    w = layer.pw2.weight.reshape(8, -1) @ layer.pw1.weight.reshape(-1, 12)  # W = W_A W_B (eq. 8)
    full = w.reshape(8, 12, *([1] * dims)) * layer.dw.weight[:, 0][:, None]
    x = torch.randn(2, 12, *SPATIAL[dims], dtype=torch.float64)
    torch.testing.assert_close(layer(x), CONV_FN[dims](x, full, layer.dw.bias, 1, 1))


@pytest.mark.parametrize("dims", [1, 3])
def test_conv_attributes_match_the_conv_they_stand_for(dims):
    conv = CONV_CLASSES[dims](6, 10, 5, stride=2, padding=2, padding_mode="reflect")
    for layer in (U[dims](6, 10, 5, stride=2, padding=2, padding_mode="reflect"),
                  S[dims](6, 10, 5, stride=2, padding=2, padding_mode="reflect", with_bn=True)):
        for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode"):
            assert getattr(layer, attr) == getattr(conv, attr), attr
        assert isinstance(layer, (BSConvU, BSConvS))  # one class family: isinstance finds every dimension


@pytest.mark.parametrize("dims,cls", [(1, SubspaceProjection1d), (2, SubspaceProjection), (3, SubspaceProjection3d)])
def test_subspace_projection_every_dimension(dims, cls):
    conv = CONV_CLASSES[dims](24, 8, 1, bias=True)
    proj = cls.from_conv(conv)
    assert isinstance(proj, CONV_CLASSES[dims]) and bsconv_class("projection", dims) is cls
    x = torch.randn(2, 24, *SPATIAL[dims])
    torch.testing.assert_close(proj(x), conv(x))
    assert set(proj.state_dict()) == set(conv.state_dict())
    model = nn.Sequential(proj, S[dims](8, 8, 3))
    assert [name for name, _ in regularization_sites(model)] == ["0", "1"]
    w = proj.weight.detach().reshape(8, 24)
    expected = torch.linalg.matrix_norm(w @ w.t() - torch.eye(8)) + model[1].orthonormal_loss()
    torch.testing.assert_close(regularization_loss(model), expected)
    with pytest.raises(ValueError):
        cls.from_conv(CONV_CLASSES[dims](8, 8, 3))
    other = CONV_CLASSES[1 if dims != 1 else 3](8, 8, 1)
    with pytest.raises(ValueError):
        cls.from_conv(other)


def test_bsconv_class_lookup_and_errors():
    assert bsconv_class("u", 3) is BSConvU3d and bsconv_class("s", 1) is BSConvS1d
    with pytest.raises(ValueError, match="4-d"):
        bsconv_class("u", 4)
    assert math.prod(BSConvU3d(2, 4, (1, 3, 3)).dw.kernel_size) == 9
