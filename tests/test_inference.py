import copy
import json

import pytest
import timm
import torch
from click.testing import CliRunner
from torch import nn

from bsconv_surgery import BSConvU, convert, prepare_for_inference
from bsconv_surgery.benchmark import PrepOptions, Timing, benchmark_pair, paired_speedup, time_interleaved
from bsconv_surgery.cli import bsconv_surgery
from bsconv_surgery.inference import fold_batchnorm, relative_error
from bsconv_surgery.fx.modules import swap_module

from .helpers import randomize_batchnorm

BN = nn.modules.batchnorm._BatchNorm


def batchnorms(model):
    return [n for n, m in model.named_modules() if isinstance(m, BN)]


def outputs(model, x):
    with torch.no_grad():
        return model(x)


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


class Blocks(nn.Module):
    """Every pattern the fold must handle: standard conv -> BN, pointwise -> BN, depthwise -> BN
    (with and without conv bias, affine and non-affine BN) and a BSConvU with its inner BN."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.pw = nn.Conv2d(8, 16, 1, bias=True)
        self.bn1 = nn.BatchNorm2d(16, affine=False)
        self.dw = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.bsconv = BSConvU(16, 24, 3, padding=1, with_bn=True)
        self.bn3 = nn.BatchNorm2d(24)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = self.bn1(self.pw(x))
        x = torch.relu(self.bn2(self.dw(x)))
        return self.bn3(self.bsconv(x))


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


def test_fold_falls_back_to_sequential_pairs_when_tracing_fails(rng):
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: FX cannot trace this
                x = -x
            return self.body(x)

    model = randomize_batchnorm(Untraceable())
    x = torch.randn(2, 3, 8, 8, generator=rng)
    fused, report = assert_fold_is_exact(model, x, expect_folded=1)
    assert report.trace_error and "fallback" in report.method


def test_prepare_for_inference_channels_last_matches(rng):
    model = convert("timm:resnet18", "u", kernel_sizes="3", count=False).model
    randomize_batchnorm(model, seed=4).eval()
    x = torch.randn(2, 3, 64, 64, generator=rng)
    expected = outputs(model, x)
    info = {}
    prepared = prepare_for_inference(copy.deepcopy(model).train(), channels_last=True, report=info)
    assert not prepared.training and len(info["fold"]["folded"]) == 20
    assert prepared.layer1[0].conv1.pw.weight.is_contiguous(memory_format=torch.channels_last)
    got = outputs(prepared, x.contiguous(memory_format=torch.channels_last))
    assert relative_error(got, expected) < 1e-5


@pytest.mark.slow
def test_prepare_for_inference_compile_matches(rng):
    model = randomize_batchnorm(Blocks()).eval()
    x = torch.randn(2, 3, 16, 16, generator=rng)
    expected = outputs(model, x)
    compiled = prepare_for_inference(copy.deepcopy(model), channels_last=True, compile=True)
    with torch.inference_mode():
        got = compiled(x.contiguous(memory_format=torch.channels_last))
    assert relative_error(got, expected) < 1e-4


def test_timing_quantiles_and_throughput():
    t = Timing("m", batch_size=4, times=[0.01 * i for i in range(1, 11)])
    assert t.p90 == pytest.approx(0.09) and t.median == pytest.approx(0.055)
    assert t.throughput == pytest.approx(4 / 0.055)


def test_paired_speedup_ignores_load_drift_between_rounds():
    # the machine slows down 3x halfway; each round the original takes 3x the converted
    original = Timing("o", 1, times=[0.03, 0.03, 0.03, 0.09, 0.09, 0.09, 0.09])
    converted = Timing("c", 1, times=[0.01, 0.01, 0.01, 0.03, 0.03, 0.03, 0.03])
    assert paired_speedup(original, converted) == pytest.approx(3.0)
    assert original.median / converted.median == pytest.approx(3.0)
    converted.times = [0.01, 0.01, 0.01, 0.01, 0.03, 0.03, 0.03]  # drift hits the rounds unevenly
    assert original.median / converted.median == pytest.approx(9.0), "the ratio of medians is fooled"
    assert paired_speedup(original, converted) == pytest.approx(3.0)


def test_time_interleaved_alternates_and_warms_up():
    calls = []
    models = {"a": lambda x: calls.append("a"), "b": lambda x: calls.append("b")}
    x = torch.zeros(2, 1)
    timings = time_interleaved(models, {"a": x, "b": x}, warmup=2, runs=4)
    assert calls == ["a", "b"] * 2 + ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert all(len(t.times) == 4 and t.batch_size == 2 for t in timings.values())


def test_benchmark_pair_prepares_copies_the_same_way():
    original = randomize_batchnorm(timm.create_model("test_resnet"))
    converted = convert(copy.deepcopy(original), "u", count=False).model
    r = benchmark_pair(original, converted, (3, 32, 32), batch_size=2, prep=PrepOptions(fuse=True, channels_last=True),
                       warmup=1, runs=3)
    assert r["prep"] == "fused+channels_last" and r["original"]["runs"] == 3
    assert r["fold"]["original"]["folded"] > 0 and r["fold"]["converted"]["folded"] > 0
    assert r["speedup_median"] > 0
    assert batchnorms(original) and batchnorms(converted)  # the caller's models are untouched


def test_benchmark_cli_spec_and_converted_dir(tmp_path):
    runner = CliRunner()
    args = ["--input-size", "3,32,32", "--warmup", "1", "--runs", "3", "--json"]
    result = runner.invoke(bsconv_surgery, ["benchmark", "timm:test_resnet", "--fuse", "--channels-last", *args])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["model"] == "timm:test_resnet" and out["variant"] == "u"
    assert out["timing"]["prep"] == "fused+channels_last" and out["timing"]["batch_size"] == 1
    assert out["mac_ratio"] == pytest.approx(out["macs"]["original"] / out["macs"]["converted"], rel=1e-3)
    assert out["speedup"] == out["timing"]["speedup_median"] and out["timing"]["speedup_paired"] > 0
    assert out["params"]["converted"] < out["params"]["original"]

    saved = tmp_path / "conv"
    result = runner.invoke(bsconv_surgery, ["convert", "timm:test_resnet", "--variant", "s", "--input-size", "3,32,32",
                                            "--out", str(saved)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(bsconv_surgery, ["benchmark", str(saved), "--batch-size", "2", *args])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["variant"] == "s" and out["source_dir"] == str(saved) and out["timing"]["batch_size"] == 2
    assert out["macs"]["original"] and out["macs"]["converted"]

    result = runner.invoke(bsconv_surgery, ["benchmark", "timm:test_resnet", "--device", "cuda"])
    if not torch.cuda.is_available():
        assert result.exit_code == 1 and "CUDA" in result.output and "Traceback" not in result.output
