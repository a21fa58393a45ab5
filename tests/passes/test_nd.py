"""The surgery on 1-D and 3-D convs: the conv, DSC and bottleneck passes, ``--init svd``, BatchNorm
folding, lowering (2-D only), save/load and ONNX export, on small ``nn.Conv1d``/``nn.Conv3d`` nets."""

import math

import pytest
import torch
from torch import nn

from bsconv_surgery import convert, fold_batchnorm, load_converted, regularization_loss
from bsconv_surgery.passes.lowering import lower_bsconv
from bsconv_surgery.inference.export import export_onnx, onnx_parity, relative_error
from bsconv_surgery.layers import (
    BSConvS1d,
    BSConvS3d,
    BSConvU1d,
    BSConvU3d,
    SubspaceProjection1d,
    SubspaceProjection3d,
    bsconv_s_params,
    bsconv_u_params,
    mid_channels_for,
    orthonormal_error,
)
from bsconv_surgery.core.records import count_by_kind
from tests.helpers import CONV, ToyNd, outputs, randomize_batchnorm, register_toy_models

pytestmark = pytest.mark.usefixtures("one_thread")

DIMS = [1, 3]
SIZE = {1: (3, 64), 3: (3, 4, 8, 8)}
U = {1: BSConvU1d, 3: BSConvU3d}
S = {1: BSConvS1d, 3: BSConvS3d}
PROJ = {1: SubspaceProjection1d, 3: SubspaceProjection3d}


def toy(dims, dtype=torch.float32):
    return randomize_batchnorm(ToyNd(dims)).to(dtype).eval()


def x_for(dims, dtype=torch.float32, batch=2):
    return torch.randn(batch, *SIZE[dims], generator=torch.Generator().manual_seed(1), dtype=dtype)


def make_rank_one_(conv, gen):
    n, m, *k = conv.weight.shape
    w = torch.randn(n, m, generator=gen, dtype=torch.float64)
    b = torch.randn(n, *k, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(w.reshape(n, m, *([1] * len(k))) * b[:, None])


@pytest.mark.parametrize("dims", DIMS)
def test_variant_u_converts_the_stem_and_reorders_the_pairs(dims):
    model = toy(dims)
    before = {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_children()}
    result = convert(model, "u", allow_growth=True, example_inputs=SIZE[dims])
    report = result.report
    assert report.input_family == "tensor" and list(report.input_size) == list(SIZE[dims])
    assert report.tracing.method == "fx"
    assert count_by_kind(report.replaced) == {"dsc->bsconv_u": 2, "conv->bsconv_u": 1}
    k = 3 ** dims
    # the stem: BSConvU of its dimension, closed-form count
    assert type(model.stem) is U[dims] and model.stem.dw.kernel_size == (5,) * dims
    stem = next(r for r in report.replaced if r.name == "stem")
    assert stem.params_before == before["stem"] == 3 * 16 * 5 ** dims + 16
    assert stem.params_after == bsconv_u_params(3, 16, (5,) * dims, None, bias=True) == 3 * 16 + 16 * 5 ** dims + 16
    # the pair dw1 -> bn1 -> act1 -> pw1 became pw (16 -> 24) -> dw (k^d on 24), bn1/act1 removed
    assert type(model.dw1) is CONV[dims] and model.dw1.kernel_size == (1,) * dims and model.dw1.out_channels == 24
    assert model.pw1.groups == 24 and model.pw1.kernel_size == (3,) * dims
    assert isinstance(model.bn1, nn.Identity) and isinstance(model.act1, nn.Identity)
    pair = next(r for r in report.replaced if r.name == "dw1")
    assert pair.params_after - pair.params_before == pair.details["params_delta_formula"] == k * (24 - 16) - 2 * 16
    assert pair.kernel == [3] * dims
    assert report.params_after == sum(p.numel() for p in model.parameters())
    out = model.train()(x_for(dims))
    assert out.shape == (2, 5)
    out.sum().backward()
    assert model.stem.pw.weight.grad is not None


@pytest.mark.parametrize("dims", DIMS)
def test_variant_s_finds_the_bottleneck_and_keeps_the_function(dims):
    model = toy(dims)
    x = x_for(dims)
    reference = outputs(model, x)
    result = convert(model, "s", example_inputs=SIZE[dims], exclude=["stem"])
    kinds = count_by_kind(result.report.replaced)
    assert kinds == {"bottleneck->bsconv_s": 1}
    site = result.report.replaced[0]
    assert site.name == "project" and site.details["next_expansion"] == "next" and site.details["p"] == "1/3"
    assert type(model.project) is PROJ[dims]
    assert torch.equal(outputs(model, x), reference)  # the layers stay: same function
    torch.testing.assert_close(regularization_loss(model), orthonormal_error(model.project.weight))
    skipped = {s.name: s.reason for s in result.report.skipped}
    assert "not an inverted residual" in skipped["pw1"]  # dw1 follows the stem: a DSC block, not a bottleneck
    # without the exclude, the stem becomes a BSConv-S of its dimension with the closed-form count
    model = toy(dims)
    result = convert(model, "s", example_inputs=SIZE[dims], p="1/4")
    mid = mid_channels_for(3, 0.25)
    assert type(model.stem) is S[dims] and model.stem.mid_channels == mid == 3
    stem = next(r for r in result.report.replaced if r.name == "stem")
    assert stem.params_after == bsconv_s_params(3, 16, (5,) * dims, None, mid, bias=True)


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("variant", ["u", "s"])
def test_svd_init_is_exact_on_rank_one_filters(dims, variant):
    """Filters ``w[n, m] * B[n]`` are exactly a BSConv-U (and a BSConv-S with ``M' = M``)."""
    gen = torch.Generator().manual_seed(0)
    model = toy(dims, torch.float64)
    make_rank_one_(model.stem, gen)
    x = x_for(dims, torch.float64)
    reference = outputs(model, x)
    result = convert(model, variant, example_inputs=SIZE[dims], init="svd", include=["stem"])
    (record,) = result.report.replaced
    assert record.name == "stem" and record.details["energy_kept"] == pytest.approx(1.0, abs=1e-12)
    assert relative_error(outputs(model, x), reference) < 1e-12
    # random (not rank-1) filters keep exactly sum sigma_1^2 / sum sigma^2, below 1: the init is not exact
    model = toy(dims, torch.float64)
    weight = model.stem.weight.detach().reshape(16, 3, -1)
    s = torch.linalg.svdvals(weight)
    reference = outputs(model, x)
    result = convert(model, "u", example_inputs=SIZE[dims], init="svd", include=["stem"])
    kept = result.report.replaced[0].details["energy_kept"]
    assert kept == pytest.approx(float(s[:, 0].square().sum() / s.square().sum()), rel=1e-9) and kept < 0.99
    assert relative_error(outputs(model, x), reference) > 1e-3


@pytest.mark.parametrize("dims", DIMS)
def test_batchnorm_folds_into_nd_convs(dims):
    model = toy(dims)
    x = x_for(dims)
    reference = outputs(model, x)
    report = fold_batchnorm(model)
    assert len(report.folded) == 7 and report.skipped == []
    assert all(isinstance(getattr(model, f"bn{i}"), nn.Identity) for i in range(7))
    assert relative_error(outputs(model, x), reference) < 1e-5
    # after the surgery too: the BatchNorms after the BSConv steps fold as well
    model = toy(dims)
    convert(model, "u", example_inputs=SIZE[dims], with_bn=True)
    reference = outputs(model, x)
    report = fold_batchnorm(model)
    assert "stem.dw" in [f["conv"] for f in report.folded] and "stem.pw" in [f["conv"] for f in report.folded]
    assert relative_error(outputs(model, x), reference) < 1e-5


@pytest.mark.parametrize("dims", DIMS)
def test_lowering_leaves_nd_steps_with_a_reason(dims):
    model = toy(dims)
    convert(model, "u", example_inputs=SIZE[dims])
    report = lower_bsconv(model)
    assert report.lowered == [] and report.skipped
    assert all("2-D" in s["reason"] for s in report.skipped)


@pytest.mark.parametrize("dims", DIMS)
def test_kernel_sizes_select_nd_kernels(dims):
    model = toy(dims)
    result = convert(model, "u", allow_growth=True, example_inputs=SIZE[dims], kernel_sizes="3")  # 3 selects 3, 3x3, 3x3x3
    assert count_by_kind(result.report.replaced) == {"dsc->bsconv_u": 2}
    (skip,) = [s for s in result.report.skipped if s.name == "stem"]
    assert f"kernel {'x'.join(['5'] * dims)} is not in --kernel-sizes 3x3" in skip.reason
    model = toy(dims)
    result = convert(model, "u", allow_growth=True, example_inputs=SIZE[dims], kernel_sizes="x".join(["5"] * max(dims, 2)))
    assert [r.name for r in result.report.replaced] == ["stem"]


@pytest.mark.parametrize("dims", DIMS)
def test_save_and_load_round_trip(dims, tmp_path):
    register_toy_models()
    result = convert(f"timm:toy_bsconv_{dims}d", "u", with_bn=True)
    model = randomize_batchnorm(result.model).eval()
    result.save(tmp_path / "out")
    loaded = load_converted(tmp_path / "out")
    x = torch.randn(2, 3, 16, 16)
    assert type(loaded.model.stem) is U[dims]
    assert torch.equal(outputs(loaded.model.eval(), x), outputs(model, x))
    assert loaded.input_family == "classification" and loaded.report.replaced


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("variant", ["u", "s"])
def test_onnx_export_parity(dims, variant, tmp_path):
    model = toy(dims)
    convert(model, variant, example_inputs=SIZE[dims])
    path = export_onnx(model, tmp_path / "model.onnx", x_for(dims, batch=1))
    assert onnx_parity(model, path, [x_for(dims, batch=1), x_for(dims, batch=3)]) < 1e-5


def test_one_input_channel_conv1d_grows_and_the_record_says_so():
    """NOTES.md trap: BSConv-U of a 1-channel audio front end adds ``N`` weights. It is skipped with
    both counts in the reason; with allow_growth the record carries them."""
    model = nn.Sequential(nn.Conv1d(1, 8, 7, padding=3, bias=False), nn.ReLU())
    skipped = convert(model, "u", example_inputs=(1, 100)).report
    assert not skipped.replaced and "grow the parameters (56 -> 64)" in skipped.skipped[0].reason
    result = convert(model, "u", example_inputs=(1, 100), allow_growth=True)
    (record,) = result.report.replaced
    assert (record.params_before, record.params_after) == (8 * 7, 8 + 8 * 7)
    assert result.report.params_after - result.report.params_before == 8


def test_a_conv3d_model_needs_no_family_and_any_rank_works():
    model = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.Flatten())
    result = convert(model, "u", example_inputs=(2, 3, 5, 5))
    assert result.report.output_shape == [1, 4 * 3 * 5 * 5]
    assert type(model[0]) is BSConvU3d and model[0].dw.bias is not None
    assert math.prod(model[0].dw.kernel_size) == 27


@pytest.mark.parametrize("dims", DIMS)
def test_svd_init_of_reordered_nd_pairs_folds_the_batchnorm_and_linearises_the_act(dims):
    """A pair without an activation between dw and pw starts as the best rank-1 fit of
    ``F[n, m] = P[n, m] s[m] D[m]``: the record's ``energy_kept`` is that fit's share, computed here
    independently from the folded kernel."""
    model = toy(dims, torch.float64)
    model.act1 = nn.Identity()  # dw1 -> bn1 -> pw1: linear between the two
    dw, bn, pw = model.dw1, model.bn1, model.pw1
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    kernel = pw.weight.detach().reshape(24, 16)[:, :, None] * s[None, :, None] * dw.weight.detach().reshape(16, -1)[None]
    sv = torch.linalg.svdvals(kernel)
    expected = float(sv[:, 0].square().sum() / sv.square().sum())
    result = convert(model, "u", allow_growth=True, example_inputs=SIZE[dims], init="svd", exclude=["stem"])
    pair = next(r for r in result.report.replaced if r.name == "dw1")
    assert pair.details["energy_kept"] == pytest.approx(expected, rel=1e-9)
    assert pair.details["folded"] == ["bn1"] and "linearised" not in pair.details
    other = next(r for r in result.report.replaced if r.name == "dw2")
    assert other.details["linearised"] == ["act4 (ReLU6)"] and other.details["fold_exact"] is False
