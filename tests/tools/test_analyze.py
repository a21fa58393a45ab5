"""``analyze``: per-filter PCA over the M slices, PC1 share per stage (paper 3.1, Fig. 3; issue 6)."""

import pytest
import timm
import torch
from torch import nn

from bsconv_surgery.tools.analyze import analyze, pc1_shares

from ..helpers import make_rank_one_


def test_pc1_share_matches_sklearn_pca(rng):
    from sklearn.decomposition import PCA

    weight = torch.randn(5, 12, 3, 3, generator=rng, dtype=torch.float64)
    ours = pc1_shares(weight)
    for n in range(5):
        ref = PCA().fit(weight[n].reshape(12, 9).numpy()).explained_variance_ratio_[0]
        assert float(ours[n]) == pytest.approx(ref, rel=1e-10)


def test_pc1_share_is_one_for_rank_one_filters_and_undefined_without_variance(rng):
    conv = nn.Conv2d(7, 4, 3)
    make_rank_one_(conv, rng)
    assert torch.allclose(pc1_shares(conv.weight), torch.ones(4, dtype=torch.float64), atol=1e-9)
    same = torch.randn(3, 1, 3, 3, generator=rng).expand(3, 5, 3, 3)  # every slice equal: no variance
    assert pc1_shares(same).isnan().all()


def test_resnet18_stages_and_rank_one_filters():
    gen = torch.Generator().manual_seed(0)
    model = timm.create_model("resnet18")
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            make_rank_one_(m, gen)
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


