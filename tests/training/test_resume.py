"""Ctrl-C saves ``last.pt``; ``--resume`` ends with exactly the weights of an uninterrupted run."""

import signal

import pytest
import torch

from bsconv_surgery.training import run as run_module

from ..helpers import TINY_S, checkpoint, json_output, metrics

pytestmark = pytest.mark.usefixtures("one_thread")

#: 3 epochs of 4 steps, random shifts on (so the RNG states matter), 10 regularised BSConv-S sites.
ARGS = [*TINY_S, "--set", "epochs=3", "--set", "max_steps_per_epoch=4"]


def _ctrl_c_after(monkeypatch, steps):
    """Deliver a real SIGINT to this process right after the ``steps``-th optimizer step."""
    real, done = run_module.train_one_epoch, [0]

    def interrupting(*args):
        *args, should_stop = args

        def stop_check():
            done[0] += 1
            if done[0] == steps:
                signal.raise_signal(signal.SIGINT)
            return should_stop()

        return real(*args, stop_check)

    monkeypatch.setattr(run_module, "train_one_epoch", interrupting)


@pytest.mark.parametrize("stop_after,position,message", [
    (6, (1, 2), "Interrupted at epoch 2, step 2/4"),  # mid-epoch
    (4, (1, 0), "Interrupted after epoch 1"),  # at an epoch boundary
])
def test_interrupted_then_resumed_run_ends_with_the_uninterrupted_weights(cli, tmp_path, monkeypatch, stop_after,
                                                                           position, message):
    json_output(cli("train", *ARGS, "--out", tmp_path / "full", "--json"))

    with monkeypatch.context() as patch:
        _ctrl_c_after(patch, stop_after)
        result = cli("train", *ARGS, "--out", tmp_path / "cut")
        text = result.output
    assert result.exit_code == 130, text
    assert "Traceback" not in text and message in text and "bsconv-surgery train --resume --out" in text
    saved = checkpoint(tmp_path / "cut" / "last.pt")
    assert (saved["epoch"], saved["step"]) == position

    result = cli("train", "--resume", "--out", tmp_path / "cut")
    text = result.output
    assert result.exit_code == 0, text
    assert "Resuming" in text

    full, cut = checkpoint(tmp_path / "full" / "last.pt"), checkpoint(tmp_path / "cut" / "last.pt")
    assert full["model"].keys() == cut["model"].keys()
    for key, value in full["model"].items():
        assert torch.equal(value, cut["model"][key]), key
    for a, b in zip(full["optimizer"]["state"].values(), cut["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["scheduler"] == cut["scheduler"]
    strip = lambda rows: [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in rows]  # noqa: E731
    assert strip(metrics(tmp_path / "cut")) == strip(metrics(tmp_path / "full"))


def test_resume_refuses_a_changed_recipe_and_a_finished_run_just_reports(cli, tmp_path):
    out = tmp_path / "run"
    json_output(cli("train", *TINY_S, "--out", out, "--json"))
    result = cli("train", *TINY_S, "--set", "optimizer.lr=0.1", "--out", out, "--resume")
    text = result.output
    assert result.exit_code == 1 and "optimizer.lr (run: 0.01, now: 0.1)" in " ".join(text.split())
    result = cli("train", "--resume", "--out", out, "--set", "epochs=3")
    text = result.output
    assert result.exit_code == 1 and "--resume without RECIPE continues with the saved recipe" in " ".join(text.split())
    result = cli("train", *TINY_S, "--out", out, "--resume")  # the same command again: nothing left to do
    text = result.output
    assert result.exit_code == 0 and "had already finished all 2 epochs" in text
    assert len(metrics(out)) == 2
