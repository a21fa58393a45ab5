"""``bsconv-surgery train`` end to end on tiny models: run folder, metrics, checkpoints, the
regulariser, distillation, converted folders, and clean errors for bad input."""

import json

import pytest
import timm
import torch

from bsconv_surgery import regularization_loss
from bsconv_surgery.training.recipe import load_recipe
from bsconv_surgery.training.student import build_model

from ..helpers import TINY, TINY_S, checkpoint, json_output, metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_run_writes_recipe_metrics_and_checkpoints(cli, tmp_path):
    out = tmp_path / "run"
    summary = json_output(cli("train", *TINY, "--out", out, "--json"))
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl", "recipe.yaml"]
    assert load_recipe(out / "recipe.yaml").model == "timm:test_resnet"  # the resolved recipe, overrides included
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"lr", "train_loss", "train_acc", "val_loss", "val_acc", "samples_per_s"} <= set(rows[0])
    assert "train_reg" not in rows[0]  # a model without BSConv-S sites has no regulariser column
    assert rows[0]["train_samples"] == 3 * 16 and rows[0]["val_samples"] == 360
    last = checkpoint(out / "last.pt")
    assert {"model", "optimizer", "scheduler", "epoch", "step", "rng", "recipe", "history"} <= set(last)
    assert (last["epoch"], last["step"], last["recipe"]["epochs"]) == (2, 0, 2)
    assert isinstance(last["rng"][0]["torch"], torch.Tensor)
    assert summary["epochs_done"] == 2 and summary["final"] == rows[-1] and summary["best_epoch"] in (1, 2)
    assert checkpoint(out / "best.pt")["epoch"] == summary["best_epoch"]


def test_the_summary_table_and_refusing_an_existing_run_folder(cli, tmp_path):
    out = tmp_path / "run"
    result = cli("train", *TINY, "--set", "epochs=1", "--out", out)
    text = result.output
    assert result.exit_code == 0, text
    assert "Training summary" in result.stdout and "best val accuracy" in result.stdout
    assert "epoch 1/1" in result.stderr and "Model: timm:test_resnet" in result.stderr
    result = cli("train", *TINY, "--out", out)
    text = result.output
    assert result.exit_code == 1 and "already exists; pass --resume to continue it or --force" in text
    result = cli("train", *TINY, "--set", "epochs=1", "--out", out, "--force")
    text = result.output
    assert result.exit_code == 0, text


def test_the_same_seed_gives_the_same_run_and_another_seed_does_not(cli, tmp_path):
    a = json_output(cli("train", *TINY, "--out", tmp_path / "a", "--json"))
    b = json_output(cli("train", *TINY, "--out", tmp_path / "b", "--json"))
    c = json_output(cli("train", *TINY, "--set", "seed=1", "--out", tmp_path / "c", "--json"))
    wa, wb, wc = (checkpoint(tmp_path / n / "last.pt")["model"] for n in "abc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert a["final"]["train_loss"] == b["final"]["train_loss"] != c["final"]["train_loss"]


def test_orthonormality_error_falls_during_training_with_the_regulariser(cli, tmp_path):
    args = [*TINY_S, "--set", "epochs=3", "--set", "max_steps_per_epoch=5", "--set", "schedule.name=constant",
            "--set", "optimizer.lr=0.01"]
    recipe = load_recipe("digits-demo", ["surgery.variant=s"], {"model": "timm:test_resnet", "data.image_size": 8})
    torch.manual_seed(0)
    initial = regularization_loss(build_model(recipe, 10).model).item()
    on = json_output(cli("train", *args, "--set", "ortho_alpha=0.5", "--out", tmp_path / "on", "--json"))
    off = json_output(cli("train", *args, "--set", "ortho_alpha=0", "--out", tmp_path / "off", "--json"))
    regs = [r["train_reg"] for r in metrics(tmp_path / "on")]
    assert on["bsconv_s_sites"] == 10
    assert regs[0] > regs[1] > regs[2] > on["ortho_error"]  # logged as its own column, falling every epoch
    assert on["ortho_error"] < 0.5 * initial
    assert on["ortho_error"] < 0.5 * off["ortho_error"]  # it is the regulariser that does it
    assert "train_reg" not in metrics(tmp_path / "off")[0]


def _convert(cli, tmp_path, *extra):
    out = tmp_path / "converted"
    result = cli("convert", "timm:test_resnet", "--variant", "u", "--input-size", "3,32,32", "--out", out, "--json", *extra)
    assert result.exit_code == 0, result.output
    return out, result


def test_convert_prints_the_train_command_on_stderr_and_train_takes_the_folder(cli, tmp_path):
    out, result = _convert(cli, tmp_path)
    json.loads(result.stdout)  # --json output stays one object
    assert f"\n  bsconv-surgery train finetune-short --model {out} --data " in result.stderr  # works from any folder
    summary = json_output(cli("train", "digits-demo", "--model", out, "--set", "data.image_size=8", "--set",
                              "data.batch_size=16", "--set", "max_steps_per_epoch=2", "--set", "epochs=1",
                              "--out", tmp_path / "run", "--json"))
    assert summary["model"].startswith(f"{out} (converted from timm:test_resnet, variant u)")
    result = cli("train", "digits-demo", "--model", out, "--set", "data.image_size=8", "--set", "epochs=1",
                 "--set", "max_steps_per_epoch=1", "--out", tmp_path / "run2")
    text = result.output
    assert "classifier replaced: 1000 -> 10 classes" in text


def test_distillation_needs_teacher_weights_and_logs_its_loss(cli, tmp_path):
    result = cli("train", *TINY, "--set", "distill.enabled=true", "--out", tmp_path / "none")
    text = result.output
    assert result.exit_code == 1 and "Distillation needs the trained weights of the source model timm:test_resnet" in text
    assert not (tmp_path / "none").exists()  # a failed start leaves no run folder
    teacher = tmp_path / "teacher.pt"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), teacher)
    summary = json_output(cli("train", *TINY_S, "--teacher-checkpoint", teacher, "--out", tmp_path / "kd", "--json"))
    assert summary["final"]["train_kd"] > 0 and "train_reg" in summary["final"]
    wrong = tmp_path / "wrong.pt"
    torch.save(timm.create_model("test_resnet", num_classes=5).state_dict(), wrong)
    result = cli("train", *TINY, "--teacher-checkpoint", wrong, "--out", tmp_path / "wrong")
    text = result.output
    assert result.exit_code == 1 and "Teacher timm:test_resnet for 10 classes" in text and "shape mismatch" in text
    # a folder converted with --checkpoint remembers the source weights: the default teacher
    converted, _ = _convert(cli, tmp_path, "--num-classes", "10", "--checkpoint", str(teacher))
    summary = json_output(cli("train", "digits-demo", "--model", converted, "--set", "distill.enabled=true",
                              "--set", "data.image_size=8", "--set", "max_steps_per_epoch=2", "--set", "epochs=1",
                              "--out", tmp_path / "kd2", "--json"))
    assert summary["final"]["train_kd"] > 0


BAD_INPUT = [
    (["missing.yaml"], "Recipe file 'missing.yaml' does not exist. Bundled recipes: digits-demo"),
    (["missing"], "Recipe 'missing' not found: no such file and no bundled recipe of that name. Bundled recipes: digits-demo"),
    (["digits-demo", "--set", "lr"], "Bad --set 'lr': expected KEY=VALUE"),
    (["digits-demo", "--set", "optimizer.momentun=0.8"], "optimizer.momentun: unknown key. Did you mean 'momentum'?"),
    (["digits-demo", "--set", "optimizer.name=adam"], "optimizer.name: Input should be 'sgd' or 'adamw'"),
    (["digits-demo", "--set", "epochs=0"], "epochs: Input should be greater than or equal to 1"),
    (["digits-demo", "--set", "optimizer.lr=.inf"], "optimizer.lr: a finite number is needed (got inf)"),
    (["/no/such/dir/digits-demo.yaml"], "Recipe file '/no/such/dir/digits-demo.yaml' does not exist. A bundled recipe "
                                        "is called 'digits-demo': pass just that name to use it."),
    (["digits-demo", "--data", "mnist"], "Unknown dataset 'mnist'. Valid datasets: digits, cifar10, cifar100, imagefolder:PATH"),
    (["digits-demo", "--model", "timm:resnet_18"], "Unknown model 'resnet_18'"),
    (["digits-demo"], "No model: pass --model SPEC_OR_DIR"),
    (["digits-demo", "--model", "timm:test_resnet", "--data", "cifar10"], "cifar10 needs --data-dir DIR"),
    (["digits-demo", "--model", "timm:test_resnet", "--data", "imagefolder:/nonexistent"], "needs train/ and val/ folders"),
    ([], "Missing RECIPE"),
    (["--resume"], "--resume needs --out DIR"),
    (["digits-demo", "--resume", "--force"], "--resume and --force contradict each other"),
]


@pytest.mark.parametrize("args,message", BAD_INPUT, ids=[" ".join(a) or "no-args" for a, _ in BAD_INPUT])
def test_bad_input_is_a_clear_message_without_traceback(cli, tmp_path, args, message):
    result = cli("train", *args, "--out", tmp_path / "run") if "--resume" not in args else cli("train", *args)
    text = result.output
    assert result.exit_code == 1, text
    assert "Traceback" not in text and message in " ".join(text.split()), text


@pytest.mark.parametrize("content,message", [
    ("epochs: [1\n", "is not valid YAML at line 2"),
    ("- 1\n- 2\n", "must be a mapping of keys"),
    ("epochs: 2\nschedule:\n  name: step\n", "schedule.name: Input should be 'cosine', 'multistep', 'linear' or 'constant'"),
])
def test_malformed_recipe_files(cli, tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    result = cli("train", path, "--model", "timm:test_resnet")
    text = result.output
    assert result.exit_code == 1 and "Traceback" not in text and message in " ".join(text.split()), text
