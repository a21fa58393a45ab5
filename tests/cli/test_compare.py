"""``bsconv-surgery compare``: the tables, one JSON object, --input-size / --num-classes, --csv, and
clear errors."""

import csv
import json

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_table_default_variants(cli):
    result = cli("compare", "cifar_resnet20")
    assert result.exit_code == 0, result.output
    out = result.output
    for text in ("timm:cifar_resnet20", "input 3x32x32", "272,480", "40,720", "Per stage", "stages.2",
                 "fvcore", "FlopCounterMode", "agree for every variant", "19 conv->bsconv_u", "19 conv->bsconv_s"):
        assert text in out, text
    assert "Traceback" not in out


def test_cli_json_is_one_object(cli):
    result = cli("compare", "cifar_resnet20", "--variant", "orig", "--variant", "u:kernel-sizes=3", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"] == "timm:cifar_resnet20" and data["input_size"] == [3, 32, 32]
    assert data["counter"]["name"] == "fvcore" and data["counter"]["version"]
    assert [v["spec"] for v in data["variants"]] == ["orig", "u:kernel-sizes=3"]
    orig, u = data["variants"]
    assert orig["params"] == 272_480 and orig["macs"] == data["original"]["macs"]
    assert u["params"] == 40_720 and u["macs"] < orig["macs"]
    assert u["params_ratio"] == pytest.approx(40_720 / 272_480)
    assert u["conv_check"]["agree"] is True
    assert [s["name"] for s in u["stages"]] == ["stem", "stages.0", "stages.1", "stages.2", "head"]
    assert sum(s["params"] for s in u["stages"]) == u["params"]
    assert sum(s["macs"] for s in u["stages"]) == u["macs"]


def test_cli_input_size_and_num_classes(cli):
    result = cli("compare", "cifar_resnet20", "--variant", "orig", "--input-size", "3,64,64", "--num-classes", "100",
                     "--json", "--no-cross-check")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["input_size"] == [3, 64, 64] and data["num_classes"] == 100
    v = data["variants"][0]
    assert v["params"] == 278_330
    assert 4 * 40.8e6 < v["conv_macs"] < 4 * 40.9e6  # four times the 32x32 conv MACs
    assert "conv_check" not in v


def test_cli_csv(cli, tmp_path):
    path = tmp_path / "budgets.csv"
    args = ["cifar_resnet20", "--variant", "orig,u", "--csv", str(path), "--no-cross-check"]
    result = cli("compare", *args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(path.open()))
    totals = {r["variant"]: r for r in rows if r["stage"] == "total"}
    assert totals["orig"]["params"] == "272480" and totals["u"]["params"] == "40720"
    assert float(totals["orig"]["macs_ratio"]) == 1.0
    assert {r["stage"] for r in rows} == {"total", "stem", "stages.0", "stages.1", "stages.2", "head"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["budgets.csv"]  # no temporary file left

    path.write_text("keep me")
    refused = cli("compare", *args)
    assert refused.exit_code == 1 and "already exists" in refused.output and "--force" in refused.output
    assert path.read_text() == "keep me"
    assert cli("compare", *args, "--force").exit_code == 0
    assert path.read_text().startswith("model,input_size,variant,stage,params,macs")


@pytest.mark.parametrize("args,needle", [
    (["cifar_resnet20", "--variant", "w"], "Unknown variant 'w'"),
    (["cifar_resnet20", "--variant", "s:p=7"], "Bad p '7'"),
    (["cifar_resnet20", "--input-size", "3,32"], "Bad input size"),
    (["no_such_model_xyz"], "Unknown model"),
])
def test_cli_bad_input_is_a_clear_error(cli, args, needle):
    result = cli("compare", *args)
    assert result.exit_code == 1
    assert needle in result.output
    assert "Traceback" not in result.output
