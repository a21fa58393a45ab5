"""``train`` with label-free function matching: ``distill.method`` / ``augment`` / ``mixup`` (issue 23)."""

import pytest
import timm
import torch

from bsconv_surgery.recovery.augment import SharedView

from ..helpers import TINY, metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "test_resnet.pt"
    torch.save(timm.create_model("test_resnet").state_dict(), path)
    return path


def _train(weights, *more):
    return ["train", *TINY, "--model", "test_resnet", "--checkpoint", weights, "--set", "surgery.init=svd",
            "--set", "epochs=1", *more]


def test_function_matching_in_a_label_free_recipe(cli, tmp_path, weights, monkeypatch):
    views = []
    real = SharedView.__call__

    def recorded(self, args):
        out = real(self, args)
        views.append((args[0].shape, out[0].shape, torch.equal(out[0], args[0])))
        return out

    monkeypatch.setattr(SharedView, "__call__", recorded)
    out = tmp_path / "run"
    result = cli(*_train(weights, "--set", "distill.label_free=true", "--set", "distill.method=function_matching"),
                 "--out", out)
    assert result.exit_code == 0, result.output
    assert "function matching: teacher and student see the same view of each batch (augment suited to the input " \
           "size, mixup 1.0)" in result.stderr
    assert len(views) == 3 and all(a == b and not same for a, b, same in views)  # every step, a new view
    assert {"train_kd", "val_agree"} <= set(metrics(out)[0])


@pytest.mark.parametrize("setting, message", [
    (["--set", "distill.method=function_matching"], "runs with label-free distillation"),
    (["--set", "distill.label_free=true", "--set", "distill.mixup=-1"], "distill.mixup"),
    (["--set", "distill.label_free=true", "--set", "distill.method=fm"], "distill.method"),
])
def test_function_matching_settings_are_checked(cli, tmp_path, weights, setting, message):
    result = cli(*_train(weights, *setting), "--out", tmp_path / "run")
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
