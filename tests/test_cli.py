import json
import subprocess
import sys

import pytest
import timm
import torch
from click.testing import CliRunner

from bsconv_surgery.cli import bsconv_surgery


def run(*args):
    result = CliRunner().invoke(bsconv_surgery, list(args))
    return result, result.output  # click >= 8.2: stdout and stderr interleaved


def assert_clean_error(result, text, message):
    assert result.exit_code != 0, text
    assert "Traceback" not in text
    assert message in text, text


def test_convert_json_is_one_object_with_the_promised_keys():
    result = CliRunner().invoke(
        bsconv_surgery, ["convert", "tv:resnet18", "--kernel-sizes", "3,5", "--input-size", "3,64,64", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # exactly one JSON document on stdout
    for key in ("model", "variant", "params_before", "params_after", "macs_before", "macs_after", "replaced", "skipped"):
        assert key in report, key
    assert report["model"] == "torchvision:resnet18" and report["variant"] == "u"
    assert report["params_after"] == 1_959_208
    assert report["macs_after"] < report["macs_before"]
    assert {r["kind"] for r in report["replaced"]} == {"conv->bsconv_u"}
    assert all(set(s) >= {"name", "reason"} for s in report["skipped"])


def test_convert_prints_tables_for_people():
    result, text = run("convert", "resnet18", "--input-size", "3,64,64")
    assert result.exit_code == 0, text
    assert "Converted sites" in text and "11,689,512" in text and "layer1.0.conv1" in text


def test_convert_out_then_refuse_existing(tmp_path):
    out = tmp_path / "conv"
    result, text = run("convert", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "--out", str(out))
    assert result.exit_code == 0, text
    assert (out / "model.safetensors").is_file() and (out / "surgery.json").is_file()
    result, text = run("convert", "resnet18", "--out", str(out))
    assert_clean_error(result, text, "already exists; pass --force")
    result, text = run("convert", "resnet18", "--num-classes", "10", "--input-size", "3,32,32", "--out", str(out), "--force")
    assert result.exit_code == 0, text


def test_convert_loads_a_checkpoint_into_the_source_model(tmp_path):
    source = timm.create_model("resnet18", num_classes=3)
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    out = tmp_path / "conv"
    result, text = run("convert", "timm:resnet18", "--num-classes", "3", "--checkpoint", str(path),
                       "--input-size", "3,32,32", "--out", str(out))
    assert result.exit_code == 0, text
    from bsconv_surgery import load_converted

    converted = load_converted(out).model
    assert torch.equal(converted.fc.weight, source.fc.weight)  # untouched layers keep the checkpoint
    assert torch.equal(converted.layer2[0].downsample[0].weight, source.layer2[0].downsample[0].weight)


BAD_INPUT = [
    (["convert", "resnet_18"], "Unknown model 'resnet_18'"),
    (["convert", "resnet_18"], "Close matches: resnet18"),
    (["convert", "hub:resnet18"], "Unknown model source 'hub'"),
    (["convert", "tv:efficientnet_b99"], "not a torchvision classification model"),
    (["convert", "resnet18", "--variant", "x"], "Invalid value for '--variant'"),
    (["convert", "resnet18", "--kernel-sizes", "3,abc"], "Bad kernel size 'abc'"),
    (["convert", "resnet18", "--kernel-sizes", "0"], "Bad kernel size '0'"),
    (["convert", "resnet18", "--input-size", "224,224"], "Bad input size '224,224'"),
    (["convert", "resnet18", "--variant", "s", "--p", "2"], "Bad p '2'"),
    (["convert", "resnet18", "--init", "magic"], "Unknown --init 'magic'"),
    (["convert", "resnet18", "--checkpoint", "/nonexistent/w.safetensors"], "does not exist"),
    (["convert", "tv:vit_b_16", "--input-size", "3,64,64"], "does not run on a 3x64x64 input before any surgery"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_gives_a_clear_error(args, message):
    result, text = run(*args)
    assert_clean_error(result, text, message)


@pytest.mark.parametrize("content,suffix", [(b"not a checkpoint at all", ".pth"), (b"\x00" * 64, ".safetensors")])
def test_corrupt_checkpoint_gives_a_clear_error(tmp_path, content, suffix):
    path = tmp_path / f"corrupt{suffix}"
    path.write_bytes(content)
    result, text = run("convert", "resnet18", "--checkpoint", str(path))
    assert_clean_error(result, text, "Could not read checkpoint")


def test_mismatched_checkpoint_names_keys_and_shapes(tmp_path):
    from safetensors.torch import save_file

    state = timm.create_model("resnet18", num_classes=10).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["layer1.0.bn1.running_mean"]
    path = tmp_path / "other.safetensors"
    save_file(state, str(path))
    result, text = run("convert", "resnet18", "--checkpoint", str(path))  # 1000 classes vs 10
    assert_clean_error(result, text, "does not match the model")
    assert "missing key(s): layer1.0.bn1.running_mean" in text
    assert "unexpected key(s): extra.weight" in text
    assert "fc.weight (10, 512) vs model (1000, 512)" in text


class Pickled:
    """An arbitrary Python object: loading it would need a full unpickler."""


def test_pickled_objects_are_not_loaded(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": Pickled()}, path)
    result, text = run("convert", "resnet18", "--checkpoint", str(path))
    assert_clean_error(result, text, "weights_only=True")


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "bsconv_surgery", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "convert" in proc.stdout
