"""Settings follow the model and the data (issue 23, item 2): ``data_settings_for`` reads a model's
own data config, ``normalization`` is the one place a set's mean/std is decided, and
``augmentation_for`` / ``default_workers`` pick what a recipe leaves ``auto``."""

import pytest
import timm
import torch
import torchvision
from PIL import Image

from bsconv_surgery import Dataset, ExampleInputs, load_model
from bsconv_surgery.conversion.stages import resolve
from bsconv_surgery.data.datasets import (IMAGENET_STATS, augmentation_for, build_datasets, default_workers,
                                          normalization)
from bsconv_surgery.models.data_config import DataSettings, data_settings_for

from ..helpers import SmallNet


@pytest.fixture
def photos(tmp_path):
    """Four flat-colour photos: after resizing, every pixel is the colour, so the normalised value
    says which mean and std were used."""
    for i in range(4):
        Image.new("RGB", (20, 14), (255, 128, 0)).save(tmp_path / f"{i}.png")
    return tmp_path


def _pixel(batches):
    return batches[0].args[0][0, :, 4, 4]


def test_a_timm_tf_model_is_fed_photos_with_its_own_mean_and_std(photos):
    model = timm.create_model("tf_mobilenetv3_small_minimal_100", pretrained=False)  # random init: cfg still there
    settings = data_settings_for(model, (3, 16, 16))
    assert settings.mean == settings.std == (0.5, 0.5, 0.5) and "pretrained_cfg" in settings.sources["mean"]
    inputs = ExampleInputs.of("classification", (3, 16, 16))
    ours = Dataset(f"images:{photos}").batches_for(model, inputs)
    # (1, 128/255, 0) normalised with mean = std = 0.5: (1, 0.0039, -1), not ImageNet's (2.25, 0.21, -1.80)
    assert torch.allclose(_pixel(ours), torch.tensor([1.0, 1 / 255, -1.0]), atol=1e-3)
    imagenet = Dataset(f"images:{photos}").batches(inputs)  # no model known: ImageNet statistics
    mean, std = map(torch.tensor, IMAGENET_STATS)
    assert torch.allclose(_pixel(imagenet), (torch.tensor([1.0, 128 / 255, 0.0]) - mean) / std, atol=1e-3)


def test_convert_calibrates_photos_with_the_models_statistics(photos):
    model = timm.create_model("tf_mobilenetv3_small_minimal_100", pretrained=False)
    inputs = ExampleInputs.of("classification", (3, 16, 16))
    job = resolve(model, "u", {}, inputs, Dataset(f"images:{photos}", limit=1), None, False, None, False, False)
    assert torch.allclose(_pixel(job.data), torch.tensor([1.0, 1 / 255, -1.0]), atol=1e-3)


def test_torchvision_settings_come_from_the_weights_transforms_without_downloading():
    weights = torchvision.models.ResNet50_Weights.IMAGENET1K_V2
    model = load_model("tv:resnet50")  # random init: torchvision's DEFAULT weights' transforms
    settings = data_settings_for(model, (3, 32, 32))
    transforms = weights.transforms()
    assert settings.mean == tuple(transforms.mean) and settings.std == tuple(transforms.std)
    assert settings.crop_pct == pytest.approx(224 / 232) and settings.interpolation == "bilinear"
    assert "ResNet50_Weights.IMAGENET1K_V2" in settings.sources["mean"]
    detector = data_settings_for(load_model("tv:fasterrcnn_mobilenet_v3_large_320_fpn"), (3, 64, 64))
    assert detector.mean == (0.0,) * 3 and detector.std == (1.0,) * 3  # it normalises inside


def test_a_model_that_declares_nothing_leaves_the_decision_to_the_data():
    settings = data_settings_for(SmallNet(), (3, 16, 16))
    assert settings.mean is None and settings.sources["mean"] == "none declared by the model"
    assert normalization("images:x", settings).stats == IMAGENET_STATS
    assert "declares none" in normalization("images:x", settings).source
    gray = normalization("images:x", DataSettings((1, 16, 16)))  # ImageNet's, made gray as the images are
    assert gray.mean == pytest.approx((sum(IMAGENET_STATS[0]) / 3,))


@pytest.mark.parametrize("model_mean", [None, (0.5, 0.5, 0.5)])
def test_digits_keep_their_own_statistics(model_mean):
    settings = DataSettings((1, 16, 16), model_mean, model_mean)
    norm = normalization("digits", settings)
    assert len(norm.mean) == 1 and 0.1 < norm.mean[0] < 0.4 and norm.source.startswith("digits")
    bundle = build_datasets("digits", 16, settings=settings)
    x, _ = bundle.train[0]
    assert x.shape == (1, 16, 16)  # the model's channels


@pytest.mark.parametrize("name, side, expected", [
    ("digits", 8, {"crop_padding": 1, "hflip": False}),
    ("digits", 16, {"crop_padding": 2, "hflip": False}),
    ("images:x", 32, {"crop_padding": 4, "hflip": True}),
    ("images:x", 64, {"crop_padding": 8, "hflip": True}),
    ("images:x", 224, {"random_resized_crop": True, "scale": (0.35, 1.0), "hflip": True}),
    ("digits", 96, {"random_resized_crop": True, "scale": (0.35, 1.0), "hflip": False}),
])
def test_augmentation_suits_the_input_size(name, side, expected):
    assert augmentation_for(name, side)[0] == expected


@pytest.mark.parametrize("cores, workers", [(1, 0), (2, 0), (3, 2), (4, 3), (8, 7), (64, 7)])
def test_workers_follow_the_machine_and_stay_bounded(cores, workers):
    assert default_workers(cores) == workers
    assert 0 <= default_workers() <= 7
