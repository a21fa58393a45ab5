"""``train`` without labels: distillation from the source model alone, unlabelled image folders,
BatchNorm recalibration and the stale-momentum guard (issue 15)."""

import pytest
import timm
import torch
from PIL import Image
from torch import nn

from ..helpers import TINY, checkpoint, json_output, metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def teacher_weights(tmp_path):
    """Weights of timm's test_resnet (1000 classes) and of the paper's 10-class cifar_resnet20:
    the 'trained' source models."""
    torch.manual_seed(0)
    paths = {}
    for name in ("test_resnet", "cifar_resnet20"):
        paths[name] = tmp_path / f"{name}.pt"
        torch.save(timm.create_model(name).state_dict(), paths[name])
    return paths


def _label_free(weights, *more, model="test_resnet"):
    return [*TINY, "--model", model, "--checkpoint", weights[model], "--set", "surgery.init=svd", *more]


def test_label_free_distillation_on_labelled_data(cli, tmp_path, teacher_weights):
    out = tmp_path / "run"
    result = cli("train", *_label_free(teacher_weights, "--set", "distill.label_free=true", model="cifar_resnet20"),
                 "--out", out, "--json")
    summary = json_output(result)
    assert (f"Label-free distillation from timm:cifar_resnet20 with weights {teacher_weights['cifar_resnet20']} "
            "(distill.label_free)") in result.stderr
    rows = metrics(out)
    assert {"train_kd", "train_agree", "val_agree", "val_acc"} <= set(rows[0]) and "train_ce" not in rows[0]
    assert rows[0]["train_loss"] == pytest.approx(rows[0]["train_kd"])
    assert 0 <= rows[-1]["val_agree"] <= 1 and rows[-1]["val_loss"] is not None  # digits: 10 classes, scored
    assert summary["final"] == rows[-1]
    # the model's 1000 classes are not the data's 10: labels cannot be scored, agreement is
    result = cli("train", *_label_free(teacher_weights, "--set", "distill.label_free=true", "--set", "epochs=1"),
                 "--out", tmp_path / "other")
    assert result.exit_code == 0, result.output
    row = metrics(tmp_path / "other")[0]
    assert row["val_acc"] == row["val_agree"] and row["val_loss"] is None


def test_unlabelled_images_imply_label_free(cli, tmp_path, teacher_weights):
    images = tmp_path / "photos"
    for i in range(24):
        path = images / f"set{i % 3}" / "deeper" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (10 + i % 4, 9), (10 * i, 255 - 8 * i, 90)).save(path)
    out = tmp_path / "run"
    result = cli("train", *_label_free(teacher_weights, "--set", "data.batch_size=4", "--set", "data.augment.crop_padding=0"),
                 "--data", f"images:{images}", "--out", out)
    assert result.exit_code == 0, result.output
    assert "the data has no labels" in result.stderr and "val_acc is the agreement with the teacher" in result.stderr
    rows = metrics(out)
    assert rows[0]["val_samples"] == 3 and rows[0]["train_samples"] == 12  # every tenth file held out
    assert rows[0]["val_acc"] == rows[0]["val_agree"] and rows[0]["val_loss"] is None


def test_unlabelled_images_without_teacher_weights_are_refused(cli, tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    for i in range(4):
        Image.new("RGB", (9, 9)).save(images / f"{i}.png")
    result = cli("train", *TINY, "--data", f"images:{images}", "--out", tmp_path / "run")
    assert result.exit_code == 1 and "needs the trained weights" in result.output and "Traceback" not in result.output


def test_feature_distillation_and_recalibration_keys(cli, tmp_path, teacher_weights):
    out = tmp_path / "run"
    result = cli("train", *_label_free(teacher_weights, "--set", "distill.label_free=true", "--set", "distill.features=true",
                                       "--set", "recalibrate_bn=true", "--set", "epochs=1"), "--out", out)
    assert result.exit_code == 0, result.output
    assert "site-level feature loss on" in result.stderr and "Recalibrated" in result.stderr
    assert metrics(out)[0]["train_feat"] > 0
    result = cli("train", *TINY, "--set", "distill.features=true", "--out", tmp_path / "other")
    assert result.exit_code == 1 and "label_free" in result.output


@pytest.mark.parametrize("guard", [True, False])
def test_a_momentum_zero_model_trains_to_the_right_statistics(cli, tmp_path, monkeypatch, guard):
    """A source model that ships with momentum 0: training must still move the running statistics."""
    import bsconv_surgery.training.run as run

    def stale(recipe, num_classes):
        built = build(recipe, num_classes)
        for m in built.model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.0
                m.running_mean.fill_(3.0)
        return built

    build = run.build_model
    monkeypatch.setattr(run, "build_model", stale)
    out = tmp_path / "run"
    result = cli("train", *TINY, "--set", "epochs=1", *([] if guard else ["--set", "stale_bn_momentum=null"]), "--out", out)
    assert result.exit_code == 0, result.output
    means = [v for k, v in checkpoint(out / "last.pt")["model"].items() if k.endswith("running_mean")]
    moved = [not torch.allclose(m, torch.full_like(m, 3.0)) for m in means]
    assert all(moved) if guard else not any(moved)
    assert ("momentum 0 or a cumulative average" in result.stderr) == guard
