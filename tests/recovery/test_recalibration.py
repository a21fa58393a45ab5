"""BatchNorm recalibration and the stale-statistics trap (``recalibration.py``, issue 15)."""

import copy

import pytest
import torch
from torch import nn

from bsconv_surgery import Labelled, recalibrate_batchnorm
from bsconv_surgery.recovery.recalibration import stale_batchnorms
from bsconv_surgery.recovery.recalibration import fresh_momentum

from ..helpers import SmallNet, randomize_batchnorm


def _uneven_batches(seed=0):
    gen = torch.Generator().manual_seed(seed)
    # batches of unequal size, with different means: torch's momentum=None average gets both wrong
    return [torch.randn(n, 3, 10, 10, generator=gen) * s + o for n, s, o in ((5, 1.0, 0.0), (17, 2.0, 1.0), (9, 0.5, -1.0))]


@pytest.mark.parametrize("momentum", [0.1, 0.0, None])
def test_recalibrated_statistics_equal_the_ones_computed_directly(momentum):
    model = randomize_batchnorm(SmallNet())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    model.train()
    model.features[1].eval()  # a user's own mode per module is kept
    batches = _uneven_batches()
    x = torch.cat(batches)
    # directly: the first BatchNorm's input is the first conv's output on every sample
    with torch.no_grad():
        y = model.features[0](x).double()
    mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=True)
    done = recalibrate_batchnorm(model, batches)
    bn = model.features[1]
    assert done.batchnorms == 4 and done.batches == 3 and done.samples == 31
    assert torch.allclose(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 3
    assert all(m.momentum == momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.training and not model.features[1].training and model.features[4].training


def test_torch_cumulative_average_is_not_exact_but_ours_is():
    """What the exact merge buys: torch's momentum=None averages per-batch means and variances."""
    model = SmallNet()
    batches = _uneven_batches(1)
    ours = copy.deepcopy(model)
    recalibrate_batchnorm(ours, batches)
    torch.optim.swa_utils.update_bn(batches, model)
    with torch.no_grad():
        y = model.features[0](torch.cat(batches)).double()
    direct = y.var((0, 2, 3), unbiased=True)
    assert torch.allclose(ours.features[1].running_var.double(), direct, rtol=1e-5)
    assert not torch.allclose(model.features[1].running_var.double(), direct, rtol=1e-2)


def test_deeper_batchnorms_see_batch_normalised_inputs():
    """Every BatchNorm is estimated in one pass with the ones before it normalising by batch
    statistics (as in training): for equal batches the result is torch's update_bn means."""
    model = randomize_batchnorm(SmallNet())
    gen = torch.Generator().manual_seed(3)
    batches = [torch.randn(16, 3, 10, 10, generator=gen) for _ in range(4)]
    reference = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, reference)
    recalibrate_batchnorm(model, batches)
    for a, b in zip(model.modules(), reference.modules()):
        if isinstance(a, nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean, atol=1e-5)


def test_any_batches_and_models_without_batchnorm():
    model = SmallNet()
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randn(4, 3, 8, 8, generator=gen), torch.zeros(4, dtype=torch.long)) for _ in range(2)]
    assert recalibrate_batchnorm(model, Labelled(pairs)).samples == 8  # labels ignored
    assert recalibrate_batchnorm(model, [p[0] for p in pairs], max_batches=1).batches == 1
    assert recalibrate_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3)), [pairs[0][0]]).batchnorms == 0


@pytest.mark.parametrize("momentum, tracked, stale", [(0.1, 0, False), (0.1, 500, False), (0.0, 0, True),
                                                      (None, 0, False), (None, 880, True)])
def test_stale_batchnorms(momentum, tracked, stale):
    model = SmallNet()
    bn = model.features[4]
    bn.momentum = momentum
    bn.num_batches_tracked.fill_(tracked)
    assert stale_batchnorms(model) == (["features.4"] if stale else [])


def test_fresh_momentum_is_restored():
    model = SmallNet()
    model.features[1].momentum = 0.0
    with fresh_momentum(model, ["features.1"]) as names:
        assert names == ["features.1"] and model.features[1].momentum == 0.1
    assert model.features[1].momentum == 0.0
