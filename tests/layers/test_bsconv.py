import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bsconv_surgery.layers import (
    BSConvS,
    BSConvU,
    SubspaceProjection,
    bsconv_s_params,
    bsconv_u_params,
    mid_channels_for,
    orthonormal_error,
)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(
    "m,n,k,bias,with_bn",
    [(16, 32, 3, False, False), (64, 64, 3, True, False), (24, 48, 5, False, True), (3, 8, 7, True, True)],
)
def test_bsconv_u_param_count_matches_formula(m, n, k, bias, with_bn):
    layer = BSConvU(m, n, k, bias=bias, with_bn=with_bn)
    expected = m * n + n * k * k + (n if bias else 0) + (2 * n if with_bn else 0)
    assert n_params(layer) == expected == bsconv_u_params(m, n, k, k, bias, with_bn)


@pytest.mark.parametrize(
    "m,n,k,p,min_mid,with_bn",
    [(64, 64, 3, 0.25, 4, False), (64, 128, 3, Fraction(1, 6), 4, True), (8, 16, 3, 0.25, 4, False), (3, 16, 3, 0.5, 4, False)],
)
def test_bsconv_s_param_count_matches_formula(m, n, k, p, min_mid, with_bn):
    layer = BSConvS(m, n, k, bias=False, p=p, min_mid_channels=min_mid, with_bn=with_bn)
    mid = min(m, max(min_mid, math.ceil(Fraction(p) * m)))
    assert layer.mid_channels == mid
    expected = m * mid + mid * n + n * k * k + (2 * (mid + n) if with_bn else 0)
    assert n_params(layer) == expected == bsconv_s_params(m, n, k, k, mid, False, with_bn)


def test_mid_channels_uses_exact_ceiling():
    assert mid_channels_for(10, 0.7, 1) == 7  # float 0.7 * 10 = 7.000000000000001
    assert mid_channels_for(96, Fraction(1, 6)) == 16
    assert mid_channels_for(8, 0.1) == 4  # min_mid_channels floor
    assert mid_channels_for(3, 0.5) == 3  # never above M
    with pytest.raises(ValueError):
        mid_channels_for(8, 1.5)


CONFIGS = [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=5, stride=1, padding=4, dilation=2),
    dict(kernel_size=3, stride=1, padding="same"),
    dict(kernel_size=3, stride=1, padding="valid"),
    dict(kernel_size=3, stride=1, padding=1, padding_mode="reflect"),
    dict(kernel_size=(1, 7), stride=1, padding=(0, 3)),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("bias", [False, True])
def test_bsconv_u_equals_full_conv_with_blueprint_filters(cfg, bias):
    torch.manual_seed(0)
    m, n = 6, 10
    layer = BSConvU(m, n, bias=bias, dtype=torch.float64, **cfg)
    w = layer.pw.weight[:, :, 0, 0]  # (N, M)
    blueprints = layer.dw.weight[:, 0]  # (N, KH, KW)
    full = w[:, :, None, None] * blueprints[:, None]  # F[n, m] = w[n, m] * B[n]  (paper eq. 2)
    x = torch.randn(2, m, 17, 19, dtype=torch.float64)
    if cfg.get("padding_mode", "zeros") != "zeros":
        pad = cfg["padding"]
        ref = F.conv2d(F.pad(x, (pad, pad, pad, pad), mode=cfg["padding_mode"]), full, layer.dw.bias, cfg["stride"])
    else:
        ref = F.conv2d(x, full, layer.dw.bias, cfg["stride"], cfg["padding"], cfg.get("dilation", 1))
    torch.testing.assert_close(layer(x), ref)


def test_bsconv_s_equals_full_conv_with_factored_weights():
    torch.manual_seed(0)
    layer = BSConvS(12, 8, 3, padding=1, p=0.25, dtype=torch.float64)
    w = layer.pw2.weight[:, :, 0, 0] @ layer.pw1.weight[:, :, 0, 0]  # W = W_A W_B (eq. 8)
    full = w[:, :, None, None] * layer.dw.weight[:, 0][:, None]
    x = torch.randn(2, 12, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.conv2d(x, full, layer.dw.bias, 1, 1))


def test_layers_honour_device_dtype_and_with_bn_layout():
    layer = BSConvU(4, 8, 3, with_bn=True, dtype=torch.float64)
    assert [name for name, _ in layer.named_children()] == ["pw", "bn", "dw"]
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    s = BSConvS(16, 8, 3, with_bn=True, dtype=torch.bfloat16)
    assert [name for name, _ in s.named_children()] == ["pw1", "bn1", "pw2", "bn2", "dw"]
    assert s.dw.groups == 8 and s.pw1.bias is None and s.pw2.bias is None


def test_orthonormal_error_hand_computed():
    w = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 0.0]])
    # W W^T = [[2, 2], [2, 4]]; minus I = [[1, 2], [2, 3]]; Frobenius = sqrt(1 + 4 + 4 + 9)
    assert orthonormal_error(w).item() == pytest.approx(math.sqrt(18))
    q, _ = torch.linalg.qr(torch.randn(16, 5, dtype=torch.float64))
    assert orthonormal_error(q.t()).item() < 1e-6  # orthonormal rows


def test_subspace_projection_is_the_same_conv():
    conv = nn.Conv2d(24, 8, 1, bias=False)
    proj = SubspaceProjection.from_conv(conv)
    x = torch.randn(2, 24, 5, 5)
    torch.testing.assert_close(proj(x), conv(x))
    assert set(proj.state_dict()) == set(conv.state_dict())
    with pytest.raises(ValueError):
        SubspaceProjection.from_conv(nn.Conv2d(8, 8, 3))


@pytest.mark.parametrize("layer", [BSConvU(6, 10, 5, stride=2, padding=2, dilation=1),
                                   BSConvS(6, 10, 5, stride=2, padding=2, with_bn=True)])
def test_bsconv_exposes_the_conv_attributes_model_code_reads(layer):
    conv = nn.Conv2d(6, 10, 5, stride=2, padding=2)
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "padding_mode"):
        assert getattr(layer, attr) == getattr(conv, attr), attr
