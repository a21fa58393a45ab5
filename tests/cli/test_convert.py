"""``bsconv-surgery convert``: the JSON and the tables, --out, --checkpoint, --init svd with
--calib, and a clear message for every kind of bad input."""

import json
import subprocess
import sys

import pytest
import timm
import torch
from rich.console import Console

from bsconv_surgery import load_converted
from bsconv_surgery.cli.format import render_conversion
from bsconv_surgery.core.records import ConversionReport

from ..helpers import rank_one_cifar_resnet20


def assert_clean_error(result, text, message):
    assert result.exit_code != 0, text
    assert "Traceback" not in text
    assert message in text, text


def test_convert_json_is_one_object_with_the_promised_keys(cli):
    result = cli("convert", "tv:resnet18", "--kernel-sizes", "3,5", "--input-size", "3,64,64", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # exactly one JSON document on stdout
    for key in ("model", "variant", "params_before", "params_after", "macs_before", "macs_after", "replaced", "skipped"):
        assert key in report, key
    assert report["model"] == "torchvision:resnet18" and report["variant"] == "u"
    assert report["params_after"] == 1_959_208
    assert report["macs_after"] < report["macs_before"]
    assert {r["kind"] for r in report["replaced"]} == {"conv->bsconv_u"}
    assert all(set(s) >= {"name", "reason"} for s in report["skipped"])


def test_convert_prints_tables_for_people(cli):
    result = cli("convert", "resnet18", "--input-size", "3,64,64")
    text = result.output
    assert result.exit_code == 0, text
    assert "Converted sites" in text and "11,689,512" in text and "layer1.0.conv1" in text


def test_convert_out_then_refuse_existing(cli, tmp_path):
    out = tmp_path / "conv"
    result = cli("convert", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "--out", str(out))
    text = result.output
    assert result.exit_code == 0, text
    assert (out / "model.safetensors").is_file() and (out / "surgery.json").is_file()
    result = cli("convert", "resnet18", "--out", str(out))
    text = result.output
    assert_clean_error(result, text, "already exists; pass --force")
    result = cli("convert", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "--out", str(out), "--force")
    text = result.output
    assert result.exit_code == 0, text


def test_convert_loads_a_checkpoint_into_the_source_model(cli, tmp_path):
    source = timm.create_model("resnet18", num_classes=3)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    out = tmp_path / "conv"
    result = cli("convert", "timm:resnet18", "--num-classes", "3", "--checkpoint", str(path),
                       "--input-size", "3,32,32", "--out", str(out))
    text = result.output
    assert result.exit_code == 0, text
    converted = load_converted(out).model
    assert torch.equal(converted.fc.weight, source.fc.weight)  # untouched layers keep the checkpoint
    assert torch.equal(converted.layer2[0].downsample[0].weight, source.layer2[0].downsample[0].weight)


BAD_INPUT = [
    (["convert", "resnet_18"], "Unknown model 'resnet_18'"),
    (["convert", "resnet_18"], "Close matches: resnet18"),
    (["convert", "hub:resnet18"], "Unknown model source 'hub'"),
    (["convert", "tv:efficientnet_b99"], "not in torchvision"),
    (["convert", "resnet18", "--variant", "x"], "Invalid value for '--variant'"),
    (["convert", "resnet18", "--kernel-sizes", "3,abc"], "Bad kernel size 'abc'"),
    (["convert", "resnet18", "--kernel-sizes", "0"], "Bad kernel size '0'"),
    (["convert", "resnet18", "--input-size", "224,224"], "Bad input size '224,224'"),
    (["convert", "resnet18", "--variant", "s", "--p", "2"], "Bad --p '2'"),
    (["convert", "resnet18", "--init", "magic"], "Unknown --init 'magic'"),
    (["convert", "resnet18", "--checkpoint", "/nonexistent/w.safetensors"], "does not exist"),
    (["convert", "tv:vit_b_16", "--input-size", "3,64,64"], "does not run on a 3x64x64 input before any surgery"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_gives_a_clear_error(cli, args, message):
    result = cli(*args)
    text = result.output
    assert_clean_error(result, text, message)


@pytest.mark.parametrize("content,suffix", [(b"not a checkpoint at all", ".pth"), (b"\x00" * 64, ".safetensors")])
def test_corrupt_checkpoint_gives_a_clear_error(cli, tmp_path, content, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(content)
    result = cli("convert", "resnet18", "--checkpoint", str(path))
    text = result.output
    assert_clean_error(result, text, "Could not read checkpoint")


def test_mismatched_checkpoint_names_keys_and_shapes(cli, tmp_path):
    from safetensors.torch import save_file

    state = timm.create_model("resnet18", num_classes=10).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer1.0.bn1.running_mean"]
    path = tmp_path / "other.safetensors"
    save_file(state, str(path))
    result = cli("convert", "resnet18", "--checkpoint", str(path))  # 1000 classes vs 10
    text = result.output
    assert_clean_error(result, text, "does not match the model")
    assert "missing key(s): layer1.0.bn1.running_mean" in text
    assert "unexpected key(s): extra.weight" in text
    assert "fc.weight (10, 512) vs model (1000, 512)" in text


def test_integer_and_bool_tensors_where_the_model_has_floats_are_named_not_cast(cli, tmp_path):
    from safetensors.torch import save_file

    state = timm.create_model("test_resnet").state_dict()
    state["fc.bias"] = state["fc.bias"].to(torch.int32)
    state["bn1.weight"] = state["bn1.weight"] > 0
    path = tmp_path / "ints.safetensors"
    save_file(state, str(path))
    result = cli("convert", "timm:test_resnet", "--checkpoint", str(path))
    assert_clean_error(result, result.output, "does not match the model")
    assert ("2 dtype mismatch(es) (would be cast silently): bn1.weight bool vs model float32, fc.bias int32 vs "
            "model float32.") in " ".join(result.output.split())


class Pickled:
    """An arbitrary Python object: loading it would need a full unpickler."""


def test_pickled_objects_are_not_loaded(cli, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Pickled()}, path)
    result = cli("convert", "resnet18", "--checkpoint", str(path))
    text = result.output
    assert_clean_error(result, text, "weights_only=True")


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "bsconv_surgery", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "convert" in proc.stdout


def test_init_svd_with_calibration(cli, tmp_path):
    ckpt = tmp_path / "rank1.pt"
    rank_one_cifar_resnet20(ckpt)
    args = ["convert", "cifar_resnet20", "--checkpoint", str(ckpt), "--init", "svd", "--calib", "random",
            "--calib-batches", "1", "--input-size", "3,16,16"]
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fidelity"]["relative_logit_error"] < 1e-5 and report["fidelity"]["top1_agreement"] == 1.0
    assert all(r["energy_kept"] == pytest.approx(1.0, abs=1e-6) for r in report["replaced"])
    out = Console(record=True, width=200)
    render_conversion(ConversionReport.from_json(report), out)  # what the command prints without --json
    text = out.export_text()
    assert "Fidelity on random (16 samples" in text and "top-1 agreement 100.0%" in text
    assert "kept" in text and "100.0%" in text
    result = cli("convert", "cifar_resnet20", "--calib", "mnist")
    assert result.exit_code == 1 and "Unknown calibration set 'mnist'" in result.output


def test_convert_bare_cifar_name_defaults_to_32x32(cli):
    """``bsconv-surgery convert cifar_resnet110 --variant u``: timm first, input 3x32x32."""
    result = cli("convert", "cifar_resnet110", "--variant", "u", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["model"] == "timm:cifar_resnet110"
    assert report["input_size"] == [3, 32, 32]
    assert report["params_after"] == 238_960  # NOTES.md: ResNet-110 + BSConv-U
    assert {r["kind"] for r in report["replaced"]} == {"conv->bsconv_u"}
    assert len(report["replaced"]) == 109  # stem + 54 blocks x 2; the 1x1 shortcuts stay
