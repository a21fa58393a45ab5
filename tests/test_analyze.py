"""``analyze``: per-filter PCA over the M slices, PC1 share per stage (paper 3.1, Fig. 3; issue 6)."""

import json

import pytest
import timm
import torch
from click.testing import CliRunner
from torch import nn

from bsconv_surgery.analyze import analyze, pc1_shares
from bsconv_surgery.cli import bsconv_surgery

from .test_convert import _make_rank_one_
from .test_fidelity import rank_one_cifar_resnet20


def run(*args):
    result = CliRunner().invoke(bsconv_surgery, [str(a) for a in args])
    return result, result.output


def test_pc1_share_matches_sklearn_pca(rng):
    from sklearn.decomposition import PCA

    weight = torch.randn(5, 12, 3, 3, generator=rng, dtype=torch.float64)
    ours = pc1_shares(weight)
    for n in range(5):
        ref = PCA().fit(weight[n].reshape(12, 9).numpy()).explained_variance_ratio_[0]
        assert float(ours[n]) == pytest.approx(ref, rel=1e-10)


def test_pc1_share_is_one_for_rank_one_filters_and_undefined_without_variance(rng):
    conv = nn.Conv2d(7, 4, 3)
    _make_rank_one_(conv, rng)
    assert torch.allclose(pc1_shares(conv.weight), torch.ones(4, dtype=torch.float64), atol=1e-9)
    same = torch.randn(3, 1, 3, 3, generator=rng).expand(3, 5, 3, 3)  # every slice equal: no variance
    assert pc1_shares(same).isnan().all()


def test_resnet18_stages_and_rank_one_filters():
    gen = torch.Generator().manual_seed(0)
    model = timm.create_model("resnet18")
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            _make_rank_one_(m, gen)
    result = analyze(model, "resnet18").to_json()
    stages = {s["name"]: s for s in result["stages"]}
    assert list(stages) == ["act1", "layer1", "layer2", "layer3", "layer4"]  # timm feature stages
    assert [stages[n]["filters"] for n in stages] == [64, 256, 512, 1024, 2048]
    for name in ("layer1", "layer2", "layer3", "layer4"):
        assert stages[name]["pc1_mean"] == pytest.approx(1.0, abs=1e-9), name
        assert stages[name]["histogram"]["counts"][-1] == stages[name]["filters"]
        assert stages[name]["svd_energy_kept"] == pytest.approx(1.0, abs=1e-9)
    assert stages["act1"]["pc1_mean"] < 0.95  # the 7x7 stem was left random
    assert sum(c["filters"] for c in result["convs"]) == result["overall"]["filters"] == 3904


def test_top_level_children_when_there_are_no_feature_stages():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)))
    result = analyze(model).to_json()
    assert [(s["name"], s["convs"]) for s in result["stages"]] == [("0", 1), ("2", 1)]  # the 1x1 is no site


def test_cli_analyze_json_terminal_and_plot(tmp_path):
    ckpt = tmp_path / "rank1.pt"
    rank_one_cifar_resnet20(ckpt)
    result, text = run("analyze", "cifar_resnet20", "--checkpoint", ckpt, "--json")
    assert result.exit_code == 0, text
    data = json.loads(result.stdout)
    assert data["checkpoint"] == str(ckpt)
    assert [s["name"] for s in data["stages"]] == ["stem", "stages.0", "stages.1", "stages.2"]
    assert all(s["pc1_mean"] == pytest.approx(1.0, abs=1e-9) for s in data["stages"])

    png = tmp_path / "fig3.png"
    result, text = run("analyze", "cifar_resnet20", "--checkpoint", ckpt, "--plot", png)
    assert result.exit_code == 0, text
    assert "stages.1: 6 convs, 192 filters, mean PC1 share 1.000" in text
    assert "0.9-1.0 │" in text and f"Wrote {png}" in text
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
    before = png.stat().st_mtime_ns
    result, text = run("analyze", "cifar_resnet20", "--plot", png)
    assert result.exit_code == 1 and "already exists; pass --force" in text and png.stat().st_mtime_ns == before
    result, text = run("analyze", "cifar_resnet20", "--plot", png, "--force", "--json")
    assert result.exit_code == 0, text
    assert json.loads(result.stdout)["plot"] == str(png)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    result, text = run("analyze", "cifar_resnet20", "--plot", tmp_path / "fig.jpg")
    assert result.exit_code == 1 and "must name a .png file" in text
