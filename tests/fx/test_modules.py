"""``fx/modules.py``: the one BatchNorm affine map, module swaps by qualified name, parameter counts."""

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from bsconv_surgery.fx.modules import batchnorm_affine, param_count, swap_module

from ..helpers import randomize_batchnorm


def test_batchnorm_affine_is_the_eval_mode_batchnorm(rng):
    for bn in (nn.BatchNorm2d(6), nn.BatchNorm2d(6, affine=False), FrozenBatchNorm2d(6)):
        if isinstance(bn, FrozenBatchNorm2d):
            bn.running_var.copy_(torch.rand(6, generator=rng) + 0.5)
            bn.running_mean.copy_(torch.randn(6, generator=rng))
        randomize_batchnorm(bn).eval()
        x = torch.randn(2, 6, 3, 3, generator=rng, dtype=torch.float64)
        s, t = batchnorm_affine(bn)
        assert s.dtype == t.dtype == torch.float64
        expected = bn.double()(x)
        torch.testing.assert_close(s[:, None, None] * x + t[:, None, None], expected)


def test_batchnorm_affine_refuses_norms_without_running_statistics():
    assert batchnorm_affine(nn.GroupNorm(2, 6)) is None
    assert batchnorm_affine(nn.BatchNorm2d(6, track_running_stats=False)) is None
    assert batchnorm_affine(nn.InstanceNorm2d(6, track_running_stats=True)) is None
    assert batchnorm_affine(None) is None


def test_swap_module_replaces_every_alias_and_keeps_the_mode():
    shared = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(shared, nn.ReLU(), shared).eval()
    new = nn.Identity()
    assert swap_module(model, "0", new) == ["0", "2"]
    assert model[0] is new and model[2] is new and not new.training


def test_param_count_counts_shared_parameters_once():
    shared = nn.Linear(4, 4)
    assert param_count(nn.Sequential(shared, shared)) == 20 == param_count(shared)
