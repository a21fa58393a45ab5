"""``--init svd``: BSConv-U / BSConv-S / reordered pairs start from the weights they replace (issue 6)."""

import copy

import numpy as np
import pytest
import timm
import torch
from torch import nn

from bsconv_surgery import Dataset, load_model
from bsconv_surgery import BSConvS, BSConvU, convert
from bsconv_surgery.layers import orthonormal_error
from bsconv_surgery.passes.initializers import filter_rank1
from bsconv_surgery.core.registry import INITIALIZERS

from ..helpers import DSC, RankOneZoo, make_rank_one_, randomize_batchnorm


def _rel(a, b) -> float:
    return float(((a - b).norm() / b.norm()).detach())


def _bsconv_kernel(site: nn.Module) -> torch.Tensor:
    """The full ``(N, M, kh, kw)`` kernel a BSConv-U / BSConv-S (without BN) computes."""
    if isinstance(site, BSConvS):
        w = site.pw2.weight.detach().flatten(1).double() @ site.pw1.weight.detach().flatten(1).double()
    else:
        w = site.pw.weight.detach().flatten(1).double()
    return w[:, :, None, None] * site.dw.weight.detach().double()


def test_svd_is_registered_and_default_stays_fresh():
    assert set(INITIALIZERS) >= {"default", "svd"} and INITIALIZERS["default"] is None
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    (site,) = convert(model, "u", count=False).report.to_json()["replaced"]
    assert "init" not in site and "energy_kept" not in site


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_rank_one_filters_convert_exactly(rng, dtype, tol):
    """Every flavour of conv (stride, dilation, 'same', reflect/circular padding, bias, Conv2dSame,
    1x5) whose filters are rank-1 converts with --init svd to the same function."""
    model = RankOneZoo().double()
    for name in "abcde":
        make_rank_one_(getattr(model, name), rng)
    model = model.to(dtype)
    x = torch.randn(2, 3, 23, 21, generator=rng).to(dtype)
    expected = model(x)
    result = convert(model, "u", init="svd", example_inputs=(3, 23, 21), calibration=Dataset("random", limit=1))
    assert all(isinstance(getattr(model, n), BSConvU) for n in "abcde")
    assert _rel(model(x), expected) < tol
    fid = result.report.to_json()["fidelity"]
    assert fid["relative_logit_error"] < tol and fid["top1_agreement"] == 1.0
    for site in result.report.to_json()["replaced"]:
        assert site["init"] == "svd" and site["energy_kept"] == pytest.approx(1.0, abs=1e-6), site["name"]


def test_resnet18_with_rank_one_3x3_filters_keeps_its_outputs():
    """timm resnet18, BatchNorms randomised (timm zero-inits the last gamma of each block, which would
    make the check pass trivially), every 3x3 filter made rank-1: --init svd is exact; the fresh
    default init is far off, so the check can fail."""
    gen = torch.Generator().manual_seed(1)
    model = randomize_batchnorm(timm.create_model("resnet18", num_classes=10)).eval()
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            make_rank_one_(m, gen)
    fresh = copy.deepcopy(model)
    report = convert(model, "u", kernel_sizes="3", init="svd", example_inputs=(3, 64, 64), count=False,
                     calibration=Dataset("random", limit=1)).report.to_json()
    assert len(report["replaced"]) == 16
    assert report["fidelity"]["relative_logit_error"] < 1e-5
    assert report["fidelity"]["top1_agreement"] == 1.0 and report["fidelity"]["samples"] == 16
    wrong = convert(fresh, "u", kernel_sizes="3", example_inputs=(3, 64, 64), count=False,
                    calibration=Dataset("random", limit=1)).report.to_json()["fidelity"]
    assert wrong["relative_logit_error"] > 0.1


def test_random_filters_keep_exactly_the_energy_the_svd_predicts():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 20, (3, 5), padding=1).double()
    weight = conv.weight.detach().clone()
    model = nn.Sequential(conv)
    (site,) = convert(model, "u", init="svd", count=False).report.to_json()["replaced"]
    kernel = _bsconv_kernel(model[0])
    sigma = np.linalg.svd(weight.reshape(20, 12, 15).numpy(), compute_uv=False)  # independent of torch
    predicted = (sigma[:, 0] ** 2).sum() / (sigma ** 2).sum()
    kept = float(kernel.square().sum() / weight.square().sum())
    assert 0.1 < predicted < 0.9
    assert kept == pytest.approx(predicted, rel=1e-12) and site["energy_kept"] == pytest.approx(predicted, rel=1e-12)
    # least squares: the residual is orthogonal to the approximation, filter by filter
    resid = weight - kernel
    assert float((resid * kernel).sum((1, 2, 3)).abs().max()) < 1e-12
    # and no rank-1 filter does better: per filter the error is the rest of the spectrum
    err = resid.square().sum((1, 2, 3)).numpy()
    np.testing.assert_allclose(err, (sigma[:, 1:] ** 2).sum(1), rtol=1e-10)
    # the norm is split evenly between the weights and the blueprint
    np.testing.assert_allclose(model[0].pw.weight.flatten(1).norm(dim=1).detach().numpy() ** 2, sigma[:, 0], rtol=1e-10)
    np.testing.assert_allclose(model[0].dw.weight.flatten(1).norm(dim=1).detach().numpy() ** 2, sigma[:, 0], rtol=1e-10)


def test_bsconv_s_starts_from_the_truncated_svd_with_orthonormal_rows():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1, bias=False).double()
    weight = conv.weight.detach().clone()
    model = nn.Sequential(conv)
    (site,) = convert(model, "s", p="1/4", init="svd", count=False).report.to_json()["replaced"]
    s = model[0]
    assert s.mid_channels == 4 == site["subspace_rank"]
    assert float(orthonormal_error(s.pw1.weight.detach())) < 1e-12  # L_ortho = 0 at the start
    r = filter_rank1(weight)
    w_sv = np.linalg.svd((r.u * r.sigma[:, None]).numpy(), compute_uv=False)
    predicted = (w_sv[:4] ** 2).sum() / float(weight.square().sum())
    kept = float(_bsconv_kernel(s).square().sum() / weight.square().sum())
    assert kept == pytest.approx(predicted, rel=1e-10) and site["energy_kept"] == pytest.approx(predicted, rel=1e-10)
    assert site["energy_kept_rank1"] == pytest.approx(r.energy_kept) and site["energy_kept"] < site["energy_kept_rank1"]


def test_bsconv_s_is_exact_when_the_weight_matrix_fits_the_subspace(rng):
    """Rank-1 filters whose weight matrix W has rank <= M': BSConv-S reproduces the conv."""
    conv = nn.Conv2d(16, 24, 3, padding=1).double()
    w = torch.randn(24, 3, generator=rng, dtype=torch.float64) @ torch.randn(3, 16, generator=rng, dtype=torch.float64)
    b = torch.randn(24, 3, 3, generator=rng, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(w[:, :, None, None] * b[:, None])
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.randn(2, 16, 12, 12, generator=rng, dtype=torch.float64)
    expected = model(x)
    (site,) = convert(model, "s", p="1/4", init="svd", count=False).report.to_json()["replaced"]
    assert isinstance(model[0], BSConvS) and model[0].mid_channels == 4
    assert site["energy_kept"] == pytest.approx(1.0, abs=1e-12)
    assert _rel(model(x), expected) < 1e-12


@pytest.mark.parametrize("variant", ["u", "s"])
def test_with_bn_starts_as_identity_in_eval_mode(rng, variant):
    model = RankOneZoo().double()
    for name in "abcde":
        make_rank_one_(getattr(model, name), rng)
    model.eval()
    x = torch.randn(2, 3, 23, 21, generator=rng, dtype=torch.float64)
    expected = model(x)
    convert(model, variant, p=1, init="svd", with_bn=True, count=False)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == (5 if variant == "u" else 10)
    for bn in bns:
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0) and torch.all(bn.running_mean == 0)
        assert torch.allclose(bn.running_var + bn.eps, torch.ones_like(bn.running_var))
    assert _rel(model(x), expected) < 1e-12


def _blueprint_depthwise_(model: DSC, gen) -> None:
    """Make every depthwise kernel a multiple of one K x K blueprint, so the pair's equivalent
    per-filter kernel P[n, m] s[m] D[m] is exactly rank-1; randomise the BatchNorms."""
    m, _, kh, kw = model.dw.weight.shape
    with torch.no_grad():
        model.dw.weight.copy_(torch.randn(m, 1, 1, 1, generator=gen) * torch.randn(1, 1, kh, kw, generator=gen))
    randomize_batchnorm(model)


@pytest.mark.parametrize("norms,pw_bias,where", [(1, True, "the new depthwise's bias"),
                                                 (1, False, "the running mean of the BatchNorm after the pointwise"),
                                                 (2, True, "the new depthwise's bias")])
def test_dsc_pair_with_batchnorms_between_converts_exactly(rng, norms, pw_bias, where):
    model = DSC(m=6, n=10, k=(3, 3), stride=2, between=[nn.BatchNorm2d(6) for _ in range(norms)], pw_bias=pw_bias)
    _blueprint_depthwise_(model, rng)
    model.eval()
    x = torch.randn(3, 6, 15, 13, generator=rng)
    expected = model(x)
    report = convert(model, "u", allow_growth=True, init="svd", example_inputs=(6, 15, 13), calibration=Dataset("random", limit=2)).report.to_json()
    (site,) = report["replaced"]
    assert site["kind"] == "dsc->bsconv_u" and site["init"] == "svd"
    assert site["folded"] == [f"between.{i}" for i in range(norms)] and "linearised" not in site
    assert site["fold_exact"] is True
    assert site["constant"] == where and site["energy_kept"] == pytest.approx(1.0, abs=1e-6)
    assert _rel(model(x), expected) < 1e-5
    assert report["fidelity"]["relative_logit_error"] < 1e-5


def test_dsc_activation_between_is_linearised_and_reported(rng):
    """The reorder drops the ReLU: the start is the pair with the ReLU read as identity, which is
    exact on inputs that keep it in its identity region, and the record says so."""
    model = DSC(m=6, n=10, k=(3, 3), stride=1, between=[nn.BatchNorm2d(6), nn.ReLU()], dw_bias=True)
    _blueprint_depthwise_(model, rng)
    model.eval()
    linear = copy.deepcopy(model)
    linear.between[1] = nn.Identity()
    x = torch.randn(2, 6, 12, 12, generator=rng)
    report = convert(model, "u", allow_growth=True, init="svd", example_inputs=(6, 12, 12), calibration=Dataset("random", limit=1)).report.to_json()
    (site,) = report["replaced"]
    assert site["linearised"] == ["between.1 (ReLU)"] and site["folded"] == ["between.0"]
    assert site["fold_exact"] is False
    assert _rel(model(x), linear(x)) < 1e-5  # exactly the pair with its activation linearised
    assert report["fidelity"]["relative_logit_error"] > 1e-3  # ... which is not the original


def test_dsc_unfoldable_norm_and_plain_initialisers():
    model = DSC(m=4, n=8, k=(3, 3), between=[nn.GroupNorm(2, 4), nn.SiLU()])
    (site,) = convert(copy.deepcopy(model), "u", allow_growth=True, init="svd", example_inputs=(4, 9, 9), count=False).report.to_json()["replaced"]
    assert site["treated_as_identity"] == ["between.0"] and site["linearised"] == ["between.1 (SiLU)"] and not site["fold_exact"]
    # an initialiser without a ``dsc`` method leaves reordered pairs fresh (backward compatible)
    from bsconv_surgery.passes import DSCToBSConvU

    assert DSCToBSConvU().initializer is None and DSCToBSConvU(lambda conv, new: None).initializer is not None
    (site,) = convert(model, "u", allow_growth=True, example_inputs=(4, 9, 9), count=False).report.to_json()["replaced"]
    assert "init" not in site


def test_mobilenetv1_pairs_fold_their_batchnorm_and_linearise_the_activation():
    model = randomize_batchnorm(timm.create_model("mobilenetv1_100"))
    report = convert(model, "u", allow_growth=True, init="svd", exclude=("conv_stem",), example_inputs=(3, 64, 64), count=False).report.to_json()
    sites = report["replaced"]
    assert len(sites) == 13 and all(r["kind"] == "dsc->bsconv_u" for r in sites)
    for r in sites:
        bn = r["name"].replace("conv_dw", "bn1")
        assert r["folded"] == [bn] and r["linearised"] == [f"{bn} (ReLU6)"], r
        assert r["constant"] == "the running mean of the BatchNorm after the pointwise"
        assert 0 < r["energy_kept"] <= 1 + 1e-9


def test_auto_is_svd_for_trained_weights_and_default_otherwise(tmp_path):
    path = tmp_path / "weights.pt"
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten())
    torch.save(model.state_dict(), path)
    fresh = convert(copy.deepcopy(model), "u", init="auto", example_inputs=(3, 8, 8), count=False)
    trained = convert(load_model(copy.deepcopy(model), checkpoint=path), "u", init="auto", example_inputs=(3, 8, 8), count=False)
    assert fresh.options.init == "default" and "energy_kept" not in fresh.report.replaced[0].details
    assert trained.options.init == "svd" and trained.report.to_json()["options"]["init"] == "svd"
    assert "energy_kept" in trained.report.replaced[0].details
