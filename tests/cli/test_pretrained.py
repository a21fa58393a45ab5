"""The pretrained workflow from the command line, offline: convert --pretrained from caches the
tests fill (a Hugging Face cache for timm, TORCH_HOME for torchvision), the error without a cached
copy, provenance in surgery.json, and train distilling from the pretrained source."""

import json

import pytest
import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

import bsconv_surgery as bs
from bsconv_surgery.models.checkpoints import file_sha256

from ..helpers import (HF_REVISION, bsconv_kernel, fill_hf_cache, fill_torch_cache, json_output, make_rank_one_, metrics,
                       random_state, register_test_zoo)

pytestmark = pytest.mark.usefixtures("one_thread")

register_test_zoo()

TIMM = "test_resnet.r160_in1k"
TV = "mobilenet_v3_small"


def _rank_one(state: dict, key: str, seed: int = 0) -> None:
    """Make the conv weight ``state[key]`` rank-1 per filter (a BSConv-U filter), in place."""
    conv = nn.Conv2d(state[key].shape[1], state[key].shape[0], state[key].shape[2], bias=False)
    make_rank_one_(conv, torch.Generator().manual_seed(seed))
    state[key] = conv.weight.detach().clone()


def _flat(result) -> str:
    """The output with the console's line wrapping undone."""
    return " ".join(result.output.split())


def _saved(folder):
    return load_file(str(folder / "model.safetensors")), json.loads((folder / "surgery.json").read_text())


def test_convert_pretrained_timm_reads_the_hugging_face_cache(cli, zoo_caches, tmp_path):
    hf_home, _ = zoo_caches
    state = random_state(timm.create_model(TIMM))
    _rank_one(state, "conv1.0.weight")  # the 3x3 stem conv: --init svd reproduces it exactly
    path = fill_hf_cache(hf_home, f"timm/{TIMM}", state)
    result = cli("convert", f"timm:{TIMM}", "--pretrained", "--init", "svd", "--input-size", "3,32,32",
                 "--out", tmp_path / "r", "--json")
    assert result.exit_code == 0, result.output
    assert "distill.enabled=true" in result.stderr  # the handoff distils from the pretrained source
    weights, meta = _saved(tmp_path / "r")
    assert torch.equal(weights["fc.weight"], state["fc.weight"]) and torch.equal(weights["fc.bias"], state["fc.bias"])
    model = bs.load_converted(tmp_path / "r").model
    assert isinstance(model.conv1[0], bs.BSConvU)
    assert torch.allclose(bsconv_kernel(model.conv1[0]), state["conv1.0.weight"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(bsconv_kernel(model.layer1[0].conv1), state["layer1.0.conv1.weight"], atol=1e-3)
    source = meta["source"]
    assert source["spec"] == f"timm:{TIMM}" and source["weights"] == TIMM
    assert source["pretrained"] == {"zoo": "timm", "name": TIMM, "file": "model.safetensors", "sha256": file_sha256(path),
                                    "num_classes": 1000, "hub_id": f"timm/{TIMM}", "revision": HF_REVISION,
                                    "path": str(path)}
    assert json_output(result)["pretrained"]["revision"] == HF_REVISION


def test_convert_pretrained_torchvision_reads_torch_home(cli, zoo_caches, tmp_path):
    _, torch_home = zoo_caches
    entry = torchvision.models.get_model_weights(TV).IMAGENET1K_V1
    state = random_state(torchvision.models.get_model(TV))
    _rank_one(state, "features.0.0.weight", seed=1)
    path = fill_torch_cache(torch_home, entry.url, state)
    result = cli("convert", f"tv:{TV}", "--weights", "IMAGENET1K_V1", "--init", "svd", "--input-size", "3,32,32",
                 "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert f"Pretrained weights: MobileNet_V3_Small_Weights.IMAGENET1K_V1 ({entry.url}), {path.name}" in _flat(result)
    weights, meta = _saved(tmp_path / "m")
    assert torch.equal(weights["classifier.3.weight"], state["classifier.3.weight"])
    model = bs.load_converted(tmp_path / "m").model
    assert torch.allclose(bsconv_kernel(model.features[0][0]), state["features.0.0.weight"], rtol=1e-5, atol=1e-6)
    assert meta["source"]["pretrained"]["name"] == "MobileNet_V3_Small_Weights.IMAGENET1K_V1"
    assert meta["source"]["pretrained"]["sha256"] == file_sha256(path) and meta["source"]["pretrained"]["file"] == path.name


def test_num_classes_with_pretrained_weights_says_the_head_is_new(cli, zoo_caches, tmp_path):
    _, torch_home = zoo_caches
    state = random_state(torchvision.models.get_model(TV))
    fill_torch_cache(torch_home, torchvision.models.get_model_weights(TV).DEFAULT.url, state)
    result = cli("convert", f"tv:{TV}", "--pretrained", "--num-classes", "10", "--input-size", "3,32,32",
                 "--out", tmp_path / "h")
    assert result.exit_code == 0, result.output
    assert "Classifier replaced: 1000 -> 10 classes; the new head starts random" in _flat(result)
    weights, meta = _saved(tmp_path / "h")
    assert meta["source"]["head_replaced"] == [1000, 10] and meta["source"]["num_classes"] == 10
    assert weights["classifier.3.weight"].shape == (10, 1024)
    assert torch.equal(weights["classifier.0.weight"], state["classifier.0.weight"])
    loaded = bs.load_converted(tmp_path / "h")  # rebuilt without the cache's weights
    assert loaded.model.classifier[3].out_features == 10


def test_pretrained_without_network_or_cache_is_one_paragraph_and_exit_1(cli, zoo_caches):
    hf_home, torch_home = zoo_caches
    result = cli("convert", "resnet50", "--pretrained")
    assert result.exit_code == 1 and "Traceback" not in result.output
    folder = hf_home / "hub" / "models--timm--resnet50.a1_in1k"
    assert result.output.startswith("Error: The pretrained weights of timm:resnet50.a1_in1k are not cached here and "
                                    "cannot be downloaded: HF_HUB_OFFLINE is set. Looked for model.safetensors or "
                                    "pytorch_model.bin of timm/resnet50.a1_in1k in the Hugging Face cache, "
                                    f"{folder}/snapshots/<revision>/")
    assert ("python -c \"import timm; timm.create_model('resnet50.a1_in1k', pretrained=True)\" (or: hf download "
            "timm/resnet50.a1_in1k model.safetensors), then copy the folder models--timm--resnet50.a1_in1k") in result.output
    assert result.output.count("\n") == 1  # one paragraph
    tv = cli("convert", "tv:resnet50", "--weights", "IMAGENET1K_V2")
    assert tv.exit_code == 1 and f"Looked for {torch_home / 'hub' / 'checkpoints' / 'resnet50-11ad3fa6.pth'}" in tv.output
    assert "download.pytorch.org cannot be reached" in tv.output


@pytest.mark.parametrize("args, message", [
    (["convert", "timm:resnet50.zzz", "--pretrained"], "Valid tags: a1_in1k"),
    (["convert", "tv:resnet50", "--weights", "V3"], "Valid --weights: DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"),
    (["analyze", "tv:resnet18", "--pretrained", "--checkpoint", "x.pt"], "pass one of them"),
    (["compare", "cifar_resnet20", "--pretrained"], "has no pretrained weights"),
    (["benchmark", "timm:resnet18", "--weights", "IMAGENET1K_V1"], "a timm model takes its pretrained tag"),
])
def test_bad_pretrained_requests(cli, zoo_caches, args, message):
    result = cli(*args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_analyze_and_compare_use_the_pretrained_weights(cli, zoo_caches):
    hf_home, _ = zoo_caches
    model = timm.create_model(TIMM)
    state = random_state(model)
    _rank_one(state, "conv1.0.weight")
    fill_hf_cache(hf_home, f"timm/{TIMM}", state)
    out = json_output(cli("analyze", f"timm:{TIMM}", "--pretrained", "--json"))
    stem = next(c for c in out["convs"] if c["name"] == "conv1.0")
    assert stem["svd_energy_kept"] == pytest.approx(1.0) and out["pretrained"]["hub_id"] == f"timm/{TIMM}"
    table = json_output(cli("compare", f"timm:{TIMM}", "--pretrained", "--variant", "orig,u:init=svd", "--input-size",
                            "3,32,32", "--no-cross-check", "--json"))
    assert table["model"] == f"timm:{TIMM}" and len(table["variants"]) == 2


def _digits_cache(hf_home, seed=0):
    """Weights for timm:digits_resnet20_test.digits (a zoo model whose published weights predict the
    10 digit classes), in the Hugging Face cache."""
    state = random_state(timm.create_model("digits_resnet20_test.digits"), seed)
    return state, fill_hf_cache(hf_home, "timm/digits_resnet20_test.digits", state)


TRAIN = ["--set", "data.image_size=8", "--set", "data.batch_size=16", "--set", "max_steps_per_epoch=2",
         "--set", "epochs=1"]


def test_train_distils_from_the_pretrained_source_without_a_teacher_option(cli, zoo_caches, tmp_path, monkeypatch):
    hf_home, _ = zoo_caches
    state, _ = _digits_cache(hf_home)
    converted = tmp_path / "conv"
    result = cli("convert", "timm:digits_resnet20_test.digits", "--pretrained", "--init", "svd", "--out", converted)
    assert result.exit_code == 0, result.output
    teachers = []
    build = bs.training.student.model_from_source

    def spy(source, load_weights=False):
        model = build(source, load_weights)
        teachers.append((source.pretrained.name, load_weights, model))
        return model

    monkeypatch.setattr(bs.training.student, "model_from_source", spy)
    run = cli("train", "digits-demo", "--model", converted, "--set", "distill.enabled=true", *TRAIN,
              "--out", tmp_path / "kd", "--json")
    assert run.exit_code == 0, run.output
    assert "--teacher-checkpoint" not in " ".join(map(str, run.output))
    (name, loaded, teacher), = [t for t in teachers if t[1]]
    assert name == "digits_resnet20_test.digits"
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in state.items())  # the cached weights teach
    rows = metrics(tmp_path / "kd")
    assert rows[-1]["train_kd"] > 0


def test_train_pretrained_spec_converted_on_the_fly_distils_too(cli, zoo_caches, tmp_path):
    hf_home, _ = zoo_caches
    _digits_cache(hf_home)
    run = cli("train", "digits-demo", "--model", "timm:digits_resnet20_test.digits", "--pretrained",
              "--set", "surgery.variant=u", "--set", "surgery.init=svd", "--set", "distill.enabled=true", *TRAIN,
              "--out", tmp_path / "fly", "--json")
    assert run.exit_code == 0, run.output
    assert metrics(tmp_path / "fly")[-1]["train_kd"] > 0


def test_train_refuses_teachers_that_cannot_teach(cli, zoo_caches, tmp_path):
    hf_home, _ = zoo_caches
    _digits_cache(hf_home)
    fill_hf_cache(hf_home, f"timm/{TIMM}", random_state(timm.create_model(TIMM)))
    # a fresh head: the published model would teach through random weights
    assert cli("convert", "timm:digits_resnet20_test.digits", "--pretrained", "--num-classes", "5",
               "--out", tmp_path / "five").exit_code == 0
    run = cli("train", "digits-demo", "--model", tmp_path / "five", "--set", "distill.enabled=true", *TRAIN,
              "--out", tmp_path / "a")
    assert run.exit_code == 1 and "fresh 5-class head in place of the 10-class head" in run.output
    # 1000 ImageNet classes against the 10 digits
    assert cli("convert", f"timm:{TIMM}", "--pretrained", "--input-size", "3,32,32", "--out", tmp_path / "in1k").exit_code == 0
    run = cli("train", "digits-demo", "--model", tmp_path / "in1k", "--set", "distill.enabled=true", *TRAIN,
              "--out", tmp_path / "b")
    assert run.exit_code == 1 and "predicts 1000 classes and the data has 10" in run.output
    # random init: refused as before
    run = cli("train", "digits-demo", "--model", "timm:test_resnet", "--set", "distill.enabled=true", *TRAIN,
              "--out", tmp_path / "c")
    assert run.exit_code == 1 and "would be a random network" in run.output


def test_benchmark_times_the_pretrained_model_and_its_conversion(cli, zoo_caches):
    _, torch_home = zoo_caches
    fill_torch_cache(torch_home, torchvision.models.get_model_weights(TV).DEFAULT.url,
                     random_state(torchvision.models.get_model(TV)))
    out = json_output(cli("benchmark", f"tv:{TV}", "--pretrained", "--input-size", "3,32,32", "--prep", "eager",
                          "--warmup", "0",
                          "--runs", "2", "--json"))
    assert out["model"] == f"torchvision:{TV}" and out["params"]["converted"] < out["params"]["original"]


def test_pretrained_weights_start_svd_teach_without_labels_and_are_measured_site_by_site(cli, zoo_caches, tmp_path):
    """--init auto is svd for published weights, label-free training distils from the pretrained
    source, and sensitivity measures the pretrained model."""
    hf_home, _ = zoo_caches
    _digits_cache(hf_home)
    converted = tmp_path / "conv"
    result = cli("convert", "timm:digits_resnet20_test.digits", "--pretrained", "--out", converted, "--json")
    assert result.exit_code == 0, result.output
    assert _saved(converted)[1]["options"]["init"] == "svd"
    assert "train distill-label-free" in result.stderr  # the handoff offers distillation without labels
    run = cli("train", "digits-demo", "--model", converted, "--set", "distill.label_free=true", *TRAIN,
              "--out", tmp_path / "lf", "--json")
    assert run.exit_code == 0, run.output
    assert "Label-free distillation from timm:digits_resnet20_test.digits with its pretrained weights" in _flat(run)
    assert "val_agree" in metrics(tmp_path / "lf")[-1]
    sens = cli("sensitivity", "timm:digits_resnet20_test.digits", "--pretrained", "--calib", "random", "--json")
    assert sens.exit_code == 0, sens.output
    data = json_output(sens)
    assert data["pretrained"]["name"] == "digits_resnet20_test.digits"
    assert data["sites"] and all(row["loss"] is not None for row in data["sites"])
