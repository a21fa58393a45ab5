"""``compress`` end to end on a small trained model: the agreement rises, the held-out split is never
trained or calibrated on, a resumed run ends with the weights of an uninterrupted one, errors are messages."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import bsconv_surgery as bs
from bsconv_surgery.compression.data import split_data
from bsconv_surgery.data.calibration import Batch

pytestmark = pytest.mark.usefixtures("one_thread")


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


@pytest.fixture(scope="module")
def trained():
    """A small CNN trained on scikit-learn's digits for a few seconds, and 512 of its images (labelled)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 8 - 1
    y = torch.tensor(digits.target)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DigitsNet()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(120):
            index = torch.randint(len(x), (64,))
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
    data = bs.Labelled(list(zip(x[:512].split(32), y[:512].split(32))))
    return model.eval(), data


def run(trained, **kwargs):
    model, data = trained
    settings = dict(target_macs=0.3, steps=40, holdout=0.25, example_inputs=(1, 8, 8), speed_check=False,
                    batch_size=32, checkpoint_every=10)
    settings.update(kwargs)
    return bs.compress(copy.deepcopy(model), data, **settings)


def test_agreement_rises_and_the_saved_folder_loads(trained, tmp_path):
    result = run(trained, out=tmp_path / "run")
    zero, distilled = result.fidelity["zero_shot"], result.fidelity["distilled"]
    assert result.report.macs_after <= 0.3 * result.report.macs_before
    assert distilled["top1_agreement"] > zero["top1_agreement"]
    assert result.kept == "distilled" and result.final is distilled
    assert "top1_accuracy_converted" in distilled and distilled["samples"] == 128
    again = bs.load_converted(tmp_path / "run", model=DigitsNet())
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(again.model.eval()(x), result.model.eval()(x))
    saved = (tmp_path / "run" / "compress.json").read_text()
    assert '"kept": "distilled"' in saved
    assert not list((tmp_path / "run" / "state").glob("*.pt"))  # checkpoints dropped once saved


def test_the_held_out_split_is_never_trained_or_calibrated_on(trained):
    model, data = trained
    model = copy.deepcopy(model)
    seen = []  # (stage, training, sample keys)
    stage = {"now": None}

    def record(module, args):
        training = any(m.training for m in module.modules())
        seen.append((stage["now"], training, {x.numpy().tobytes() for x in args[0]}))

    model.register_forward_pre_hook(record)  # copied with the model: every student records too

    def log(event):
        if event["event"] == "start":
            stage["now"] = event["stage"]

    result = bs.compress(model, data, target_macs=0.3, steps=12, holdout=0.25, example_inputs=(1, 8, 8),
                         speed_check=False, batch_size=32, log=log)
    split = split_data(list(iter(data)), "data", 0.25, 0)
    held = {x.numpy().tobytes() for b in split.holdout for x in b.args[0]}
    train = {x.numpy().tobytes() for b in split.train for x in b.args[0]}
    assert len(held) == result.split["holdout"] == 128 and not held & train
    trained_on = set().union(*(keys for _, training, keys in seen if training))
    calibrated_on = set().union(*(keys for s, _, keys in seen if s == "sensitivity"))
    assert trained_on & train and calibrated_on & train  # (the other inputs are random example inputs)
    assert not trained_on & held and not calibrated_on & held
    assert any(keys & held for _, training, keys in seen if not training)  # it is evaluated on


class Kill(Exception):
    pass


@pytest.mark.parametrize("stages", [1, 2])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(trained, tmp_path, stages):
    whole = run(trained, progressive=stages, out=tmp_path / "whole")

    def kill_at(step):
        def log(event):
            if event["event"] == "step" and event.get("part") == stages and event["step"] >= step:
                raise Kill()
        return log

    with pytest.raises(Kill):
        run(trained, progressive=stages, out=tmp_path / "cut", log=kill_at(16 if stages == 2 else 26))
    assert (tmp_path / "cut" / "state" / f"distill-{stages}.pt").is_file()
    resumed = run(trained, progressive=stages, out=tmp_path / "cut", resume=True)
    assert resumed.resumed and resumed.stages[-1]["distill"]["resumed_from"] == (10 if stages == 2 else 20)
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = run(trained, progressive=stages, out=tmp_path / "cut", resume=True)  # finished: nothing runs again
    assert again.resumed and again.fidelity == resumed.fidelity


def test_progressive_groups_reach_the_target_at_the_last_stage(trained):
    result = run(trained, progressive=3, steps=9)
    groups = [s["sites"] for s in result.stages]
    assert 2 <= len(groups) <= 3 and all(groups)
    assert sorted(sum(groups, [])) == sorted(r.name for r in result.report.replaced)
    assert sum(s["steps"] for s in result.stages) == 9
    assert result.report.macs_after <= 0.3 * result.report.macs_before


@pytest.mark.parametrize("kwargs, message", [
    ({"target_macs": None}, "needs a budget"),
    ({"target_macs": "abc"}, "target_macs"),
    ({"target_macs": 0.01}, "cannot be reached"),
    ({"holdout": 510}, "too few"),
    ({"holdout": 1.5}, "holdout"),
    ({"progressive": 3, "steps": 2}, "at least one distillation step"),
    ({"distill_options": {"steps": 3}}, "may not set steps"),
    ({"export": "onnx"}, "run folder"),
])
def test_bad_arguments_are_messages(trained, kwargs, message):
    with pytest.raises(bs.SurgeryError, match=message):
        run(trained, **kwargs)


def test_an_existing_folder_needs_force_or_resume_with_the_same_settings(trained, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(bs.SurgeryError, match="already exists"):
        run(trained, out=out, steps=2)
    with pytest.raises(bs.SurgeryError, match="not a compress run folder"):
        run(trained, out=out, steps=2, resume=True)
    assert (out / "mine.txt").read_text() == "keep"
    run(trained, out=out, steps=2, force=True)
    assert not (out / "mine.txt").exists()
    with pytest.raises(bs.SurgeryError, match="steps was 2, now 3"):
        run(trained, out=out, steps=3, resume=True)


def test_split_by_batches_when_samples_cannot_be_stacked():
    batches = [Batch(([torch.randn(3, 8, 8)],)) for _ in range(20)]
    split = split_data(batches, "lists", 0.4, 0)
    assert split.unit == "batches" and len(split.holdout) == 8 and len(split.train) == 12
    assert not set(split.holdout_index) & set(split.train_index)
