"""BatchNorm folding (``passes/batchnorm.py``): exact on every conv kind, timm's fused activations
kept, frozen and sync BatchNorms, unsafe pairs left alone, the ``nn.Sequential`` fallback."""

import copy

import timm
import torch
from torch import nn

from bsconv_surgery import BSConvU, convert
from bsconv_surgery.fx.modules import swap_module
from bsconv_surgery.inference import relative_error
from bsconv_surgery.passes.batchnorm import fold_batchnorm

from ..helpers import Blocks, batchnorms, outputs, randomize_batchnorm


def assert_fold_is_exact(model, x, expect_folded=None):
    """Fold a copy; the outputs must match, and must *not* match with the BatchNorms dropped
    (so a fold that forgot the BatchNorm, or folded the wrong statistics, fails)."""
    model.eval()
    fused = copy.deepcopy(model)
    report = fold_batchnorm(fused)
    expected = outputs(model, x)
    assert relative_error(outputs(fused, x), expected) < 1e-5
    dropped = copy.deepcopy(model)
    for name in batchnorms(dropped):
        swap_module(dropped, name, nn.Identity())
    assert relative_error(outputs(dropped, x), expected) > 1e-2, "the BatchNorms do not matter here: weak test"
    if expect_folded is not None:
        assert len(report.folded) == expect_folded, report.as_dict()
    return fused, report


def test_fold_covers_standard_pointwise_depthwise_and_bsconv_inner_bn(rng):
    model = randomize_batchnorm(Blocks(), seed=1)
    x = torch.randn(2, 3, 16, 16, generator=rng)
    fused, report = assert_fold_is_exact(model, x, expect_folded=5)
    assert batchnorms(fused) == []
    pairs = {(r["conv"], r["bn"]): r["conv_kind"] for r in report.folded}
    assert pairs == {
        ("stem", "bn0"): "standard",
        ("pw", "bn1"): "pointwise",
        ("dw", "bn2"): "depthwise",
        ("bsconv.pw", "bsconv.bn"): "pointwise",  # BSConv-U with_bn: pw -> bn -> dw, folded into pw
        ("bsconv.dw", "bn3"): "depthwise",
    }
    assert fused.stem.bias is not None and fused.dw.groups == 16  # same conv, now with a bias
    assert isinstance(fused.bsconv, BSConvU) and isinstance(fused.bsconv.bn, nn.Identity)


def test_converted_timm_resnet18_with_bn_fuses_exactly(rng):
    model = convert("timm:resnet18", "u", kernel_sizes="3", with_bn=True, count=False).model
    randomize_batchnorm(model, seed=2)
    x = torch.randn(2, 3, 64, 64, generator=rng)
    fused, report = assert_fold_is_exact(model, x)
    assert batchnorms(fused) == []
    # stem conv, 16 BSConv pointwise steps + 3 downsample 1x1 convs, 16 depthwise steps
    assert report.by_kind() == {"standard": 1, "pointwise": 19, "depthwise": 16}
    assert report.skipped == []


def test_batchnorm_act_keeps_its_activation(rng):
    # timm's BatchNormAct2d carries the activation; folding must leave that activation in place
    model = timm.create_model("test_efficientnet")
    model = convert(model, "s", count=False).model
    randomize_batchnorm(model, seed=3)
    acts_before = [type(m.act).__name__ for m in model.modules() if type(m).__name__ == "BatchNormAct2d"]
    assert any(a != "Identity" for a in acts_before)
    x = torch.randn(2, 3, 64, 64, generator=rng)
    fused, report = assert_fold_is_exact(model, x)
    assert batchnorms(fused) == []
    kept = [r["kept"] for r in report.folded]
    assert sorted(k for k in kept if k) == sorted(a for a in acts_before if a != "Identity")


def test_fold_handles_frozen_and_sync_batchnorm(rng):
    from torchvision.ops.misc import FrozenBatchNorm2d

    frozen = FrozenBatchNorm2d(8)
    gen = torch.Generator().manual_seed(7)
    for name in ("weight", "bias", "running_mean"):
        getattr(frozen, name).copy_(torch.randn(8, generator=gen) * 0.3)
    frozen.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), frozen, nn.ReLU(), nn.Conv2d(8, 8, 1), nn.SyncBatchNorm(8))
    randomize_batchnorm(model, seed=8)
    x = torch.randn(2, 3, 8, 8, generator=rng)
    fused, report = assert_fold_is_exact(model, x, expect_folded=2)
    assert not any(isinstance(m, (FrozenBatchNorm2d, nn.SyncBatchNorm)) for m in fused.modules())


def test_fold_leaves_unsafe_batchnorms_alone(rng):
    class Unsafe(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Conv2d(4, 4, 3, padding=1)
            self.bn_shared = nn.BatchNorm2d(4)
            self.branch = nn.Conv2d(4, 4, 1)
            self.bn_branch = nn.BatchNorm2d(4)
            self.nostats = nn.Conv2d(4, 4, 1)
            self.bn_nostats = nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x):
            x = self.bn_shared(self.shared(x)) + self.shared(x)  # conv called twice
            y = self.branch(x)
            x = self.bn_branch(y) + y  # conv output also used without the BN
            return self.bn_nostats(self.nostats(x))

    model = randomize_batchnorm(Unsafe()).eval()
    x = torch.randn(2, 4, 8, 8, generator=rng)
    fused = copy.deepcopy(model)
    report = fold_batchnorm(fused)
    assert report.folded == []
    assert {s["bn"] for s in report.skipped} == {"bn_shared", "bn_branch", "bn_nostats"}
    assert relative_error(outputs(fused, x), outputs(model, x)) == 0.0

    train_model = randomize_batchnorm(Blocks()).train()
    report = fold_batchnorm(train_model)
    assert report.folded == [] and all("training mode" in s["reason"] for s in report.skipped)


class _FlipIfPositive(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: FX cannot trace this
            x = -x
        return x


def test_fold_uses_the_parts_that_trace_when_the_model_does_not(rng):
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.flip = _FlipIfPositive()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

        def forward(self, x):
            return self.body(self.flip(x))

    model = randomize_batchnorm(Untraceable())
    x = torch.randn(2, 3, 8, 8, generator=rng)
    fused, report = assert_fold_is_exact(model, x, expect_folded=1)
    assert report.trace_error and report.method.startswith("fx, 1 part(s)")


def test_fold_falls_back_to_sequential_pairs_when_nothing_traces(rng):
    # the Sequential itself does not trace (its last child cannot), and no child holding a conv does
    model = randomize_batchnorm(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), _FlipIfPositive()))
    x = torch.randn(2, 3, 8, 8, generator=rng)
    fused, report = assert_fold_is_exact(model, x, expect_folded=1)
    assert report.trace_error and "fallback" in report.method


