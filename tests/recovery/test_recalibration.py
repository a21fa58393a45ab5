"""BatchNorm recalibration and the stale-statistics trap (``recalibration.py``, issue 15)."""

import copy

import pytest
import torch
from torch import nn

import bsconv_surgery as bs
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


# -- kept only where it lowers the measured loss (issue 23 item 7) ----------------------------------

class Scaled(nn.Module):
    """conv -> BatchNorm -> ReLU -> mean -> linear, with filters whose rank-1 fit (what BSConv-U
    keeps) answers grey images with a fixed fraction of the full filter's answer, per channel:
    a conversion that only rescales what each BatchNorm sees, which recalibration undoes."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.conv.weight.zero_()
            for n in range(8):
                self.conv.weight[n, n % 3, 1, 1] = 1.0 + 0.1 * n  # the rank-1 part: one channel, the centre
                self.conv.weight[n, (n + 1) % 3] = 0.1  # dropped by the fit: another channel, the ring
                self.conv.weight[n, (n + 1) % 3, 1, 1] = 0.0
            self.head.weight.copy_(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)))
            self.head.bias.zero_()

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _grey(batches=4, n=16, mean=0.0, std=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        z = torch.randn(n, 1, 1, 1, generator=gen) * std + mean
        out.append(z.expand(n, 3, 8, 8) + 0.01 * torch.randn(n, 3, 8, 8, generator=gen))
    return out


def _trained_scaled():
    """Its BatchNorm statistics are those of its own data (grey images, z ~ N(0, 1)), as training
    leaves them; the same draw as the calibration data of the tests, so sampling noise in the
    statistics does not blur what recalibration recovers."""
    model = Scaled().eval()
    recalibrate_batchnorm(model, _grey(seed=2))
    return model


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith("bn.")}


def test_recalibration_that_lowers_the_loss_is_kept():
    model = _trained_scaled()
    data = _grey(seed=2)  # the model's own distribution
    result = bs.convert(copy.deepcopy(model), "u", init="svd", example_inputs=(3, 8, 8), calibration=data,
                        recalibrate_bn=True)
    rec, fid = result.report.recalibration, result.report.fidelity
    assert rec["kept"] and "reverted" not in rec
    assert fid["loss"] < 0.05 * rec["fidelity_before"]["loss"]
    assert not torch.equal(result.model.bn.running_var, model.bn.running_var)
    assert result.report.selection is None and fid == bs.measure_fidelity(model, result.model, data)


def test_recalibration_that_raises_the_loss_is_reverted_with_both_numbers():
    model = _trained_scaled()
    data = _grey(mean=3.0, std=0.5, seed=2)  # another distribution than the statistics describe
    converted = bs.convert(copy.deepcopy(model), "u", init="svd", example_inputs=(3, 8, 8), calibration=data)
    before = _bn_state(converted.model)
    result = bs.convert(copy.deepcopy(model), "u", init="svd", example_inputs=(3, 8, 8), calibration=data,
                        recalibrate_bn=True)
    rec, fid = result.report.recalibration, result.report.fidelity
    assert not rec["kept"]
    worse, kept = rec["fidelity_recalibrated"]["loss"], rec["fidelity_before"]["loss"]
    assert worse > 2 * kept and fid["loss"] == kept == converted.report.fidelity["loss"]
    assert f"{kept:.4g} before, {worse:.4g} after" in rec["reverted"]
    after = _bn_state(result.model)
    assert all(torch.equal(after[k], v) for k, v in before.items())  # the statistics were restored
    # and what it measured is that data: the reference is the original on it
    assert fid == bs.measure_fidelity(model, result.model, data)


@pytest.mark.parametrize("data, helps", [(_grey(seed=2), True), (_grey(mean=3.0, std=0.5, seed=2), False)])
def test_sensitivity_keeps_a_sites_recalibration_only_where_it_helps(data, helps):
    model = _trained_scaled()
    row = bs.measure_sensitivity(model, data, example_inputs=(3, 8, 8), recalibrate_bn=True).rows[0]
    assert row.recalibrated is helps
    assert (row.loss < row.loss_without_recalibration) if helps else row.loss == row.loss_without_recalibration
    assert row.to_json()["recalibrated_bn"] is helps
