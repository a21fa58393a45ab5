"""Label-free distillation (``bsconv_surgery.distill``; issue 15)."""

import copy

import pytest
import torch
from torch import nn

from bsconv_surgery import Labelled, SurgeryError, convert, distill, recalibrate_batchnorm
from bsconv_surgery.recovery.distill import distillation_loss, site_outputs

from ..helpers import SmallNet, TwoHeads, random_batches, randomize_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = (3, 12, 12)


def _pair(seed=0, init="svd"):
    torch.manual_seed(seed)
    teacher = randomize_batchnorm(SmallNet(), seed).eval()
    result = convert(copy.deepcopy(teacher), "u", init=init, example_inputs=SIZE, count=False)
    return teacher, result


@pytest.mark.parametrize("init", ["svd", "default"])
def test_distillation_lowers_the_loss_on_a_tiny_model(init):
    teacher, result = _pair(init=init)
    student = result.model.train()
    run = distill(student, teacher, random_batches(8, batch=16), steps=60, lr=1e-2, log_every=20)
    assert run.steps == 60 and len(run.losses) == 60 and run.seconds > 0
    assert run.final_loss < 0.5 * run.first_loss
    assert student.training and teacher.training is False  # modes restored
    assert [h["step"] for h in run.history] == [20, 40, 60]


def test_a_detector_with_two_heads_and_the_automatic_loss():
    teacher = TwoHeads().eval()
    student = convert(copy.deepcopy(teacher), "u", example_inputs=SIZE, count=False).model
    batches = random_batches(4, batch=16)
    with torch.no_grad():
        s_out, t_out = student(batches[0]), teacher(batches[0])
    auto = distillation_loss(s_out, t_out, temperature=1.0)
    box = nn.functional.mse_loss(s_out[0], t_out[0]) / t_out[0].square().mean()
    kl = (t_out[1] * (t_out[1].log() - s_out[1].log())).sum(1).mean()
    assert float(auto) == pytest.approx(float(box + kl), rel=1e-4)
    assert float(distillation_loss(s_out, t_out, loss="mse")) > 0
    assert float(distillation_loss(s_out, t_out, loss=lambda s, t: s[0].sum() * 0)) == 0
    run = distill(student, teacher, batches, steps=40, lr=1e-2)
    assert run.final_loss < run.first_loss


def test_site_level_feature_distillation():
    teacher, result = _pair()
    names = site_outputs(result.report)
    assert names == [r.name for r in result.report.replaced]
    run = distill(result.model, teacher, random_batches(4, batch=16), steps=30, lr=1e-2, features=True)
    assert run.features == names and "feature_loss" in run.history[-1]
    assert run.history[-1]["loss"] >= run.history[-1]["output_loss"]
    with pytest.raises(SurgeryError, match="no module of that name"):
        distill(result.model, teacher, random_batches(1), steps=1, features=["nope"])


def test_labels_are_ignored_and_batches_are_reread():
    teacher, result = _pair()
    pairs = [(x, torch.zeros(len(x), dtype=torch.long)) for x in random_batches(2)]
    assert distill(result.model, teacher, Labelled(pairs), steps=5).steps == 5  # 2 batches, read again
    with pytest.raises(SurgeryError, match="ran out after 2 of 5"):
        distill(result.model, teacher, (x for x in random_batches(2)), steps=5)


def _stale(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.0
            m.running_mean.fill_(5.0)
            m.running_var.fill_(100.0)


@pytest.mark.parametrize("guard", [True, False])
def test_a_momentum_zero_batchnorm_model_trains_to_the_right_statistics(guard):
    """Some converted models ship with momentum 0: without the guard their running statistics
    never move in training, and evaluation uses the stale ones."""
    teacher, result = _pair()
    student = result.model
    _stale(student)
    batches = random_batches(8, batch=16, seed=1)
    messages = []
    distill(student, teacher, batches, steps=80, lr=3e-3, stale_bn_momentum=0.1 if guard else None,
            log=messages.append)
    bn = student.features[1]
    assert bn.momentum == 0.0  # the model's own setting is kept
    right = copy.deepcopy(student)
    recalibrate_batchnorm(right, batches)  # the statistics of the trained model on this data
    if guard:
        assert any("stale" in m.get("warning", "") for m in messages)
        for a, b in zip(student.modules(), right.modules()):
            if isinstance(a, nn.BatchNorm2d):
                assert torch.allclose(a.running_mean, b.running_mean, rtol=0.1, atol=0.05)
                assert torch.allclose(a.running_var, b.running_var, rtol=0.15, atol=0.05)
    else:
        assert torch.all(bn.running_mean == 5.0) and not any("warning" in m for m in messages)


def test_bad_arguments():
    teacher, result = _pair()
    with pytest.raises(SurgeryError, match="steps=0: input should be greater than or equal to 1"):
        distill(result.model, teacher, random_batches(1), steps=0)
    with pytest.raises(SurgeryError, match="schedule"):
        distill(result.model, teacher, random_batches(1), steps=1, schedule="linear")
    with pytest.raises(SurgeryError, match="Unknown distillation loss"):
        distill(result.model, teacher, random_batches(1), steps=1, loss="l1")
