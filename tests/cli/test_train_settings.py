"""``train`` with a bundled recipe on a converted model follows the conversion and the model
(issue 23, item 2): input size and channels from ``surgery.json``, the model's normalisation,
augmentation by input size and workers from the machine, without any ``--set``; the resolved
``recipe.yaml`` shows each value and where it came from; a value the recipe gives wins."""

import pytest
import timm
import torch
import yaml
from PIL import Image

from bsconv_surgery.data.datasets import default_workers
from bsconv_surgery.training import load_recipe
from bsconv_surgery.training.data import resolve_data
from bsconv_surgery.training.recipe import recipe_from_dict
from bsconv_surgery.training.run import _check_same_recipe
from bsconv_surgery.core.errors import SurgeryError
from bsconv_surgery.models.data_config import DataSettings

from ..helpers import json_output, register_test_zoo

register_test_zoo()
pytestmark = pytest.mark.usefixtures("one_thread")
#: How long the runs are (not how their data is made): one epoch of two small steps.
SHORT = ["--set", "epochs=1", "--set", "max_steps_per_epoch=2", "--set", "data.batch_size=8"]


def _convert_16px(cli, tmp_path, model="cifar_resnet20", channels=3):
    weights = tmp_path / f"{model}.pt"
    torch.manual_seed(0)
    torch.save(timm.create_model(model).state_dict(), weights)
    out = tmp_path / f"{model}-16"
    result = cli("convert", f"timm:{model}", "--checkpoint", weights, "--input-size", f"{channels},16,16",
                 "--variant", "u", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def _resolved(run):
    return yaml.safe_load((run / "recipe.yaml").read_text())["data"]


def test_label_free_recipe_on_a_16px_conversion_needs_no_set(cli, tmp_path):
    converted = _convert_16px(cli, tmp_path)
    run = tmp_path / "run"
    summary = json_output(cli("train", "distill-label-free", "--model", converted, "--data", "digits", *SHORT,
                              "--out", run, "--json"))
    assert summary["epochs_done"] == 1 and "8x8 -> 16x16" in summary["data"]  # not resized to 224
    data = _resolved(run)
    assert (data["image_size"], data["channels"]) == (16, 3)
    assert data["augment"]["crop_padding"] == 2 and not data["augment"]["hflip"]  # 16 px digits: shifts, no flips
    assert not data["augment"]["random_resized_crop"]
    assert data["workers"] == default_workers()
    where = data["derived_from"]
    assert "the conversion" in where["image_size"] and "surgery.json" in where["channels"]
    assert where["mean"].startswith("digits") and "this machine" in where["workers"] and "16 px" in where["augment"]
    # resuming with the same command line: the auto keys match what the run derived
    result = cli("train", "distill-label-free", "--model", converted, "--data", "digits", *SHORT, "--out", run,
                 "--resume")
    assert result.exit_code == 0, result.output
    assert "had already finished" in result.output


def test_a_one_channel_conversion_gets_gray_photos_normalised_once(cli, tmp_path):
    converted = _convert_16px(cli, tmp_path, "toy_one_channel", channels=1)
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(20):
        Image.new("RGB", (30 + i, 24), (10 * i, 200, 90)).save(photos / f"{i}.png")
    run = tmp_path / "run"
    summary = json_output(cli("train", "distill-label-free", "--model", converted, "--data", f"images:{photos}",
                              *SHORT, "--set", "data.batch_size=4", "--out", run, "--json"))
    assert summary["epochs_done"] == 1
    data = _resolved(run)
    assert (data["image_size"], data["channels"]) == (16, 1) and len(data["mean"]) == len(data["std"]) == 1
    assert "ImageNet statistics" in data["derived_from"]["mean"]  # the toy model declares no mean


def test_an_explicit_recipe_value_wins_over_the_derived_one():
    settings = DataSettings((1, 16, 16), (0.5,), (0.5,), "bicubic", 0.9, {"input_size": "the conversion"})
    auto = resolve_data(load_recipe("distill-label-free", ["data.name=digits"]).data, settings)
    assert (auto.image_size, auto.channels, auto.interpolation, auto.crop_pct) == (16, 1, "bicubic", 0.9)
    given = load_recipe("distill-label-free", ["data.name=images:x", "data.image_size=24", "data.workers=1",
                                               "data.mean=[0.2]", "data.std=[0.3]", "data.augment.hflip=false"]).data
    resolved = resolve_data(given, settings)
    assert (resolved.image_size, resolved.workers, resolved.mean, resolved.std) == (24, 1, [0.2], [0.3])
    assert resolved.augment.hflip is False and resolved.augment.crop_padding == 0  # the section as given
    assert set(resolved.derived_from) == {"channels", "interpolation", "crop_pct"}
    assert resolve_data(resolved, None) is resolved  # nothing left to derive


def test_resume_compares_what_the_recipe_gives_not_what_was_derived(tmp_path):
    given = load_recipe("distill-label-free", ["data.name=digits"])
    saved = given.model_copy(update={"data": resolve_data(given.data, DataSettings((3, 16, 16)))})
    _check_same_recipe(given, recipe_from_dict(saved.dump()), tmp_path)
    changed = load_recipe("distill-label-free", ["data.name=digits", "data.image_size=32"])
    with pytest.raises(SurgeryError, match=r"data.image_size \(run: 16, now: 32\)"):
        _check_same_recipe(changed, recipe_from_dict(saved.dump()), tmp_path)


@pytest.mark.parametrize("override, message", [
    ("data.image_size=big", "data.image_size: Input should be a valid integer"),
    ("data.mean=[0.5]", "mean and std go together"),
    ("data.interpolation=lanczos", "data.interpolation: Input should be 'nearest', 'bilinear' or 'bicubic'"),
    ("data.workers=-1", "data.workers: Input should be greater than or equal to 0"),
])
def test_bad_data_values_are_refused_by_name(override, message):
    with pytest.raises(SurgeryError, match=message):
        load_recipe("distill-label-free", [override])
