"""Function-matching distillation: shared augmented views, mixup, the student's weight average (issue 23)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bsconv_surgery import SurgeryError, convert, distill, recalibrate_batchnorm
from bsconv_surgery.recovery.augment import Augmentation, SharedView, augmentation_for, mixup
from bsconv_surgery.recovery.distill import METHODS, distillation_loss, shared_view
from bsconv_surgery.recovery.ema import WeightAverage

from ..helpers import SmallNet, random_batches, randomize_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = (3, 12, 12)


def _pair(init="default"):
    torch.manual_seed(0)
    teacher = randomize_batchnorm(SmallNet(), 0).eval()
    return teacher, convert(copy.deepcopy(teacher), "u", init=init, example_inputs=SIZE, count=False).model


def _shifted(x, dx, dy, pad):
    """``x`` translated by (dx, dy) pixels, the border pixels repeating into the gap."""
    h, w = x.shape[-2:]
    padded = F.pad(x[None], (pad,) * 4, mode="replicate")[0]
    return padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


@pytest.mark.parametrize("size, shift, crop", [(12, 2, None), (16, 2, None), (24, 3, None), (48, 6, None),
                                               ((3, 96, 128), 0, (0.08, 1.0))])
def test_the_augmentation_follows_the_input_size_and_keeps_shape_and_dtype(size, shift, crop):
    aug = augmentation_for(size)
    assert (aug.shift, aug.crop_scale, aug.flip) == (shift, crop, True)
    shape = (4, 3, size, size) if isinstance(size, int) else (4, *size)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(shape, dtype=dtype)
        a, b = aug(x), aug(x)
        assert a.shape == x.shape and a.dtype == dtype and a.device == x.device
        assert not torch.equal(a, b) and not torch.equal(a, x)  # a fresh view every call


def test_translations_are_whole_pixels_and_flips_only_when_asked():
    torch.manual_seed(0)
    x = torch.randn(16, 3, 16, 16, dtype=torch.float64)
    out = Augmentation(shift=2, flip=False, brightness=0, contrast=0)(x)
    for i in range(len(x)):  # every image is the input moved by whole pixels within +-2
        assert any(torch.allclose(out[i], _shifted(x[i], dx, dy, 2), atol=1e-9)
                   for dx in range(-2, 3) for dy in range(-2, 3))
    flipped = Augmentation(shift=0, flip=True, brightness=0, contrast=0)(x)
    mirrored = [torch.allclose(flipped[i], x[i].flip(-1), atol=1e-9) for i in range(len(x))]
    assert all(m or torch.allclose(flipped[i], x[i], atol=1e-9) for i, m in enumerate(mirrored))
    assert 0 < sum(mirrored) < len(x)
    assert torch.equal(Augmentation(flip=False, brightness=0, contrast=0)(x), x)  # nothing asked, nothing done


@pytest.mark.parametrize("bad", ["large", 0, (3,), torch.zeros(3), 2.5, True])
def test_augmentation_for_refuses_what_is_not_a_size(bad):
    with pytest.raises(SurgeryError, match="augmentation_for"):
        augmentation_for(bad)


def test_mixup_mixes_images_of_the_batch_without_labels():
    x = torch.randn(6, 3, 8, 8)
    partner, weight = torch.tensor([1, 2, 3, 4, 5, 0]), torch.linspace(0.1, 0.9, 6)
    mixed = mixup(x, 1.0, partner, weight)
    assert torch.allclose(mixed[0], 0.1 * x[0] + 0.9 * x[1])
    view = SharedView(None, 1.0)
    ids = torch.arange(6.0)[:, None].expand(6, 4)  # a second input of the same batch: mixed with the same pairs
    a, b, c = view((x, ids, torch.arange(6)))
    assert a.shape == x.shape and not torch.allclose(a, x)
    assert torch.equal(c, torch.arange(6))  # not a float tensor: passed through
    w = (b[:, 0] - b[:, 1]).abs() < 1e-6
    assert bool(w.all())  # rows of the second input stay rows: one weight per sample


def test_teacher_and_student_see_the_identical_view():
    teacher, student = _pair()
    seen = {"teacher": [], "student": []}
    for name, model in (("teacher", teacher), ("student", student)):
        model.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0].detach().clone()))
    batches = random_batches(3, batch=8)
    result = distill(student, teacher, batches, steps=6, method="function_matching")
    assert len(seen["teacher"]) == len(seen["student"]) == 6
    for i, (t, s) in enumerate(zip(seen["teacher"], seen["student"])):
        assert torch.equal(t, s)
        assert not torch.allclose(t, batches[i % 3])  # augmented and mixed, not the raw batch
    assert result.settings["method"] == "function_matching" and result.settings["mixup"] == 1.0
    assert result.settings["augment"].startswith("Augmentation(shift=2")


def test_the_methods_presets_and_their_overrides():
    assert shared_view("plain") is None
    view = shared_view("function_matching")
    assert view.augment is True and view.mixup_alpha == METHODS["function_matching"]["mixup"]
    assert shared_view("function_matching", augment=False, mixup=0) is None
    own = augmentation_for(16, flip=False)
    assert shared_view("plain", augment=own).augment is own and shared_view("plain", augment=own).mixup_alpha is None
    assert shared_view("plain", mixup=0.4).mixup_alpha == 0.4


def test_the_weight_average_follows_its_rule_batchnorm_included():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    start = copy.deepcopy(model.state_dict())
    average = WeightAverage(model, 0.999)
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.add_(2.0)
        model[1].num_batches_tracked.add_(5)
    average.update(model)
    d = min(0.999, 2 / 11)
    kept = average.model.state_dict()
    assert torch.allclose(kept["0.weight"], d * start["0.weight"] + (1 - d) * model[0].weight)
    assert torch.allclose(kept["1.running_mean"], d * start["1.running_mean"] + (1 - d) * model[1].running_mean)
    assert int(kept["1.num_batches_tracked"]) == 5
    assert not torch.allclose(kept["0.weight"], model[0].weight)
    assert all(not p.requires_grad for p in average.model.parameters())
    average.copy_to(model)
    assert torch.equal(model[0].weight, kept["0.weight"])


def test_with_ema_the_student_is_left_with_the_average_that_was_evaluated():
    teacher, student = _pair()
    scored, current = [], {"student": student}

    def evaluate(model):
        scored.append((model is current["student"], copy.deepcopy(model.state_dict())))
        return {}

    distill(student, teacher, random_batches(2, batch=8), steps=8, method="function_matching", ema=0.99,
            log_every=4, evaluate=evaluate)
    assert [is_student for is_student, _ in scored] == [False, False, False]  # the average is what is scored
    for name, value in student.state_dict().items():
        assert torch.equal(value, scored[-1][1][name]), name
    current["student"] = raw = copy.deepcopy(student)
    distill(raw, teacher, random_batches(2, batch=8), steps=8, method="function_matching", ema=0, evaluate=evaluate)
    assert scored[-1][0] is True  # no average: the student itself


def _fidelity(student, teacher, batches):
    """Held-out KL (temperature 1) and top-1 agreement of ``student`` with ``teacher``."""
    student.eval()
    with torch.no_grad():
        kl = sum(float(distillation_loss(student(x), teacher(x), temperature=1.0)) for x in batches) / len(batches)
        agree = torch.cat([(student(x).argmax(1) == teacher(x).argmax(1)).float() for x in batches]).mean()
    return kl, float(agree)


def test_function_matching_end_to_end_brings_the_student_to_the_teacher_on_held_out_inputs():
    torch.manual_seed(0)
    teacher = SmallNet().eval()
    recalibrate_batchnorm(teacher, random_batches(8, batch=16, seed=3))  # statistics of the inputs it will see
    with torch.no_grad():
        teacher.head.weight.mul_(10)  # decisive logits
    student = convert(copy.deepcopy(teacher), "u", init="svd", example_inputs=SIZE, count=False).model
    held_out = random_batches(4, batch=32, seed=7)
    kl_before, agree_before = _fidelity(student, teacher, held_out)
    torch.manual_seed(0)
    run = distill(student, teacher, random_batches(8, batch=16), steps=80, lr=1e-2, method="function_matching")
    kl_after, agree_after = _fidelity(student, teacher, held_out)
    assert run.steps == 80 and run.final_loss < 0.7 * run.first_loss
    assert kl_after < 0.8 * kl_before and agree_after > agree_before + 0.2, (kl_before, kl_after, agree_before, agree_after)


@pytest.mark.parametrize("kwargs, argument", [
    ({"method": "fm"}, "method"),
    ({"mixup": -1.0}, "mixup"),
    ({"mixup": float("nan")}, "mixup"),
    ({"mixup": "1"}, "mixup"),
    ({"ema": 1.0}, "ema"),
    ({"ema": True}, "ema"),
    ({"augment": "crop"}, "augment"),
    ({"augment": 1}, "augment"),
])
def test_bad_function_matching_values_are_refused_by_name(kwargs, argument):
    teacher, student = _pair()
    with pytest.raises(SurgeryError, match=f"{argument}=") as info:
        distill(student, teacher, random_batches(1), steps=1, **kwargs)
    assert info.value.argument == argument


@pytest.mark.parametrize("method", ["plain", "function_matching"])
def test_a_run_resumed_from_its_checkpoint_ends_with_the_same_weights(method):
    """The state covers the optimizer, the schedule, the weight average and the RNG the shared
    views draw from: stopping after step 6 and resuming gives the uninterrupted run's weights."""
    teacher, start = _pair("svd")
    batches = random_batches(n=4, size=SIZE, batch=8)
    whole = copy.deepcopy(start)
    torch.manual_seed(3)
    distill(whole, teacher, batches, 12, method=method)

    states = []
    first = copy.deepcopy(start)
    torch.manual_seed(3)
    with pytest.raises(KeyboardInterrupt):
        def stop(state):
            states.append(state)
            raise KeyboardInterrupt
        distill(first, teacher, batches, 12, method=method, checkpoint=stop, checkpoint_every=6)
    (state,) = states
    assert state["step"] == 6 and (state["average"] is not None) == (method == "function_matching")
    torch.manual_seed(99)  # the state's RNG, not this one, drives the rest
    resumed = copy.deepcopy(start)
    distill(resumed, teacher, batches[2:] + batches[:2], 12, method=method, resume=state)  # the stream goes on at batch 7
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
