"""Fidelity of a conversion on a calibration set: ``convert --calib``, ``--calib-batches`` (issue 6)."""

import copy

import pytest
import torch
from torch import nn

from bsconv_surgery import Dataset
from bsconv_surgery import SurgeryError, convert
from bsconv_surgery.data.dataset import calibration_batches, parse_calib
from bsconv_surgery.recovery.fidelity import measure_fidelity


def _small():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def test_calibration_sets_and_their_errors(tmp_path):
    assert str(parse_calib("digits")) == "digits" and str(parse_calib("random")) == "random"
    with pytest.raises(SurgeryError, match="Valid sets: digits, random, imagefolder:PATH"):
        parse_calib("cifar10")
    with pytest.raises(SurgeryError, match="does not exist"):
        parse_calib(f"imagefolder:{tmp_path / 'nope'}")
    with pytest.raises(SurgeryError, match="Unknown calibration set"):
        convert(_small(), "u", calibration="imagenet")  # fails before any work

    batches = list(calibration_batches(parse_calib("digits"), (3, 16, 12), batches=3, batch_size=8))
    assert [(tuple(x.shape), tuple(y.shape)) for x, y in batches] == [((8, 3, 16, 12), (8,))] * 3
    # the training normalisation: about zero mean, unit spread over the held-out split
    pairs = list(calibration_batches(parse_calib("digits"), (1, 16, 16), batches=100, batch_size=64))
    everything, labels = torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])
    assert everything.shape == (360, 1, 16, 16)  # the 20% validation split of 1,797 images
    assert abs(float(everything.mean())) < 0.2 and 0.7 < float(everything.std()) < 1.3
    assert torch.bincount(labels).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]  # stratified
    r1 = list(calibration_batches(parse_calib("random"), (3, 8, 8), batches=2))
    r2 = list(calibration_batches(parse_calib("random"), (3, 8, 8), batches=2))
    assert len(r1) == 2 and all(torch.equal(a, b) and y is None for (a, y), (b, _) in zip(r1, r2))  # a fixed seed


def test_imagefolder_calibration(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (20 + i, 18), (40 * i, 200, 90)).save(tmp_path / "val" / cls / f"{i}.png")
    batches = list(calibration_batches(parse_calib(f"imagefolder:{tmp_path}"), (3, 16, 16), batches=5, batch_size=4))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 3, 16, 16), (2, 3, 16, 16)]
    assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 0, 1, 1, 1]  # class folders a, b
    model = _small()
    fid = measure_fidelity(model, copy.deepcopy(model), Dataset(f"imagefolder:{tmp_path}", limit=5), (3, 16, 16))
    assert fid["samples"] == 6 and fid["relative_logit_error"] == 0.0 and fid["top1_agreement"] == 1.0
    assert fid["top1_accuracy_original"] == fid["top1_accuracy_converted"]


def test_fidelity_compares_in_eval_mode_and_restores_modes():
    model = _small().train()
    other = copy.deepcopy(model).train()
    with torch.no_grad():
        other[5].bias.add_(torch.linspace(-1, 1, 10))
    fid = measure_fidelity(model, other, Dataset("random", limit=2, batch_size=5), (3, 8, 8))
    assert model.training and other.training and model[1].training
    assert fid["batches"] == 2 and fid["samples"] == 10
    x = torch.cat([x for x, _ in calibration_batches(parse_calib("random"), (3, 8, 8), batches=2, batch_size=5)])
    with torch.no_grad():
        a, b = model.eval()(x), other.eval()(x)
    assert fid["relative_logit_error"] == pytest.approx(float((b - a).norm() / a.norm()), rel=1e-6)
    assert fid["top1_agreement"] == pytest.approx(float((a.argmax(1) == b.argmax(1)).float().mean()))
    assert fid["max_sample_relative_error"] >= fid["relative_logit_error"] * 0.99
    assert "top1_accuracy_original" not in fid  # random inputs have no labels


def test_convert_report_gets_fidelity_only_when_asked():
    model = _small()
    assert "fidelity" not in convert(copy.deepcopy(model), "u", example_inputs=(3, 16, 16), count=False).report.to_json()
    report = convert(model, "u", example_inputs=(3, 16, 16), count=False, calibration=Dataset("digits", limit=2)).report.to_json()
    assert report["fidelity"]["calib"] == "digits" and report["fidelity"]["samples"] == 32
    assert report["fidelity"]["relative_logit_error"] > 0.01  # a fresh init is not the original
    assert 0 <= report["fidelity"]["top1_accuracy_converted"] <= 1  # digits are labelled


