"""``bsconv-surgery analyze``: the JSON, the terminal histograms and the PNG (paper Fig. 3)."""

import json

import pytest

from ..helpers import rank_one_cifar_resnet20


def test_cli_analyze_json_terminal_and_plot(cli, tmp_path):
    ckpt = tmp_path / "rank1.pt"
    rank_one_cifar_resnet20(ckpt)
    result = cli("analyze", "cifar_resnet20", "--checkpoint", ckpt, "--json")
    text = result.output
    assert result.exit_code == 0, text
    data = json.loads(result.stdout)
    assert data["checkpoint"] == str(ckpt)
    assert [s["name"] for s in data["stages"]] == ["stem", "stages.0", "stages.1", "stages.2"]
    assert all(s["pc1_mean"] == pytest.approx(1.0, abs=1e-9) for s in data["stages"])

    png = tmp_path / "fig3.png"
    result = cli("analyze", "cifar_resnet20", "--checkpoint", ckpt, "--plot", png)
    text = result.output
    assert result.exit_code == 0, text
    assert "stages.1: 6 convs, 192 filters, mean PC1 share 1.000" in text
    assert "0.9-1.0 │" in text and f"Wrote {png}" in text
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 300
    before = png.stat().st_mtime_ns
    result = cli("analyze", "cifar_resnet20", "--plot", png)
    text = result.output
    assert result.exit_code == 1 and "already exists; pass --force" in text and png.stat().st_mtime_ns == before
    result = cli("analyze", "cifar_resnet20", "--plot", png, "--force", "--json")
    text = result.output
    assert result.exit_code == 0, text
    assert json.loads(result.stdout)["plot"] == str(png)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    result = cli("analyze", "cifar_resnet20", "--plot", tmp_path / "fig.jpg")
    text = result.output
    assert result.exit_code == 1 and "must name a .png file" in text
