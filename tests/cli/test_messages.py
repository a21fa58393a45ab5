"""What commands say when something goes wrong: user text is never read as rich markup, failures
the user or the environment cause exit 1 with a message naming the file or value (70 is kept for
bugs), and Ctrl-C while the command starts ends it quietly with 130."""

import importlib
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import timm
import torch


from ..helpers import TINY, json_output

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["timm:test_resnet", "--input-size", "3,32,32"]


def flat(result) -> str:
    return " ".join(result.output.split())


# -- 1. user text is never markup -----------------------------------------------------------------

def test_a_model_name_with_a_closing_tag_is_an_error_message_not_a_markup_crash(cli):
    result = cli("convert", "timm:res[/x]net")
    assert result.exit_code == 1, result.output
    assert "Unknown model 'res[/x]net'" in flat(result) and "Traceback" not in result.output
    assert "MarkupError" not in result.output


def test_brackets_in_a_checkpoint_path_are_kept(cli, tmp_path):
    result = cli("convert", *SMALL, "--checkpoint", tmp_path / "ckpt[v2].pt")
    assert result.exit_code == 1
    assert f"Checkpoint '{tmp_path / 'ckpt[v2].pt'}' does not exist" in flat(result)


def test_the_plot_install_hint_keeps_its_extra(cli, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = cli("analyze", "timm:test_resnet", "--plot", tmp_path / "a.png")
    assert result.exit_code == 1
    assert "pip install 'bsconv-surgery[plot]'" in result.output


@pytest.mark.parametrize("command", ["convert", "compare", "train"])
def test_outputs_named_with_brackets_succeed_and_are_reported(cli, tmp_path, monkeypatch, command):
    """The run succeeded and wrote its output: the success message must not crash afterwards."""
    monkeypatch.chdir(tmp_path)  # short paths: the summary table shows them whole
    target = Path("out[/x][v2]")
    if command == "convert":
        result = cli("convert", *SMALL, "--out", target)
        assert (target / "model.safetensors").is_file()
        assert f"Saved to {target}/" in flat(result)
    elif command == "compare":
        target = Path("c[/x][v2].csv")
        target.parent.mkdir(parents=True)
        result = cli("compare", *SMALL, "--variant", "orig", "--csv", target, "--no-cross-check")
        assert target.is_file() and f"Wrote {target}." in flat(result)
    else:
        result = cli("train", *TINY, "--set", "epochs=1", "--out", target)
        assert (target / "last.pt").is_file()
        assert str(target) in "".join(result.stdout.split())  # the summary's run folder, whole
    assert result.exit_code == 0, result.output


# -- 2. the user's and the environment's failures are exit 1, not "a bug" ------------------------

def test_a_huge_input_size_is_refused_with_the_estimate(cli, monkeypatch):
    monkeypatch.setattr("bsconv_surgery.analysis.memory.available_memory", lambda device=None: 64 * 2**20)  # 64 MiB free
    result = cli("convert", "timm:test_resnet", "--input-size", "3,1024,1024")
    assert result.exit_code == 1, result.output
    text = flat(result)
    assert "A forward pass at input 3x1024x1024 (batch 1) needs about" in text and "64 MiB of memory available" in text
    assert "--no-memory-check" in text
    result = cli("compare", "timm:test_resnet", "--input-size", "3,1024,1024")
    assert result.exit_code == 1 and "needs about" in flat(result)
    result = cli("benchmark", "timm:test_resnet", "--input-size", "3,256,256", "--batch-size", "64")
    assert result.exit_code == 1 and "(batch 64) needs about" in flat(result)


def test_the_memory_check_can_be_skipped(cli, monkeypatch):
    monkeypatch.setattr("bsconv_surgery.analysis.memory.available_memory", lambda device=None: 2**16)
    assert cli("convert", *SMALL).exit_code == 1
    json_output(cli("convert", *SMALL, "--no-memory-check", "--json"))


def test_the_estimate_bounds_what_a_forward_pass_allocates():
    """At least the outputs of every conv, norm and linear layer of a real forward pass, at most a
    few times all leaf outputs; four times the pixels, about four times the bytes."""
    model = timm.create_model("test_resnet").eval()
    sizes = {"layers": 0, "leaves": 0}

    def hook(module, args, out):
        sizes["leaves"] += out.numel() * out.element_size()
        if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.Linear)):
            sizes["layers"] += out.numel() * out.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(1, 3, 64, 64))
    for h in handles:
        h.remove()
    memory = importlib.import_module("bsconv_surgery.analysis.memory")
    estimate = memory.estimate_forward_bytes(model, (3, 64, 64))
    assert sizes["layers"] <= estimate <= 3 * sizes["leaves"]
    assert memory.estimate_forward_bytes(model, (3, 128, 128)) == pytest.approx(4 * estimate, rel=0.05)


@pytest.fixture
def nan_checkpoint(tmp_path):
    state = timm.create_model("test_resnet").state_dict()
    state["layer1.0.conv1.weight"].view(-1)[3] = float("nan")
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("args", [["convert", "--init", "svd"], ["analyze"]], ids=["convert-svd", "analyze"])
def test_nan_weights_name_the_checkpoint_and_the_tensor(cli, nan_checkpoint, args):
    result = cli(args[0], "timm:test_resnet", "--checkpoint", nan_checkpoint, *args[1:])
    assert result.exit_code == 1, result.output
    assert f"Checkpoint '{nan_checkpoint}' holds non-finite values" in flat(result)
    assert "layer1.0.conv1.weight (1 NaN" in flat(result)


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_work(cli, tmp_path, monkeypatch):
    import bsconv_surgery.io.files as files

    locked = tmp_path / "locked"
    locked.mkdir()
    real = files.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):  # what a read-only folder does (tests may run as root)
        if Path(dir) == locked:
            raise PermissionError(13, "Permission denied", str(locked))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr("bsconv_surgery.surgery.convert", lambda *a, **k: pytest.fail("converted before the check"))
    result = cli("convert", *SMALL, "--out", locked / "r18")
    assert result.exit_code == 1, result.output
    assert f"Permission denied while creating '{locked / 'r18'}' in '{locked}'" in flat(result)
    result = cli("compare", *SMALL, "--csv", locked / "x.csv")
    assert result.exit_code == 1 and "Permission denied" in flat(result)
    result = cli("train", *TINY, "--out", locked / "run")
    assert result.exit_code == 1 and "Permission denied" in flat(result)
    assert list(locked.iterdir()) == []


def test_the_current_folder_as_out_is_refused_and_leaves_nothing(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    for out in (".", str(tmp_path), str(tmp_path.parent)):
        result = cli("convert", *SMALL, "--out", out, "--force")
        assert result.exit_code == 1, result.output
        assert "is the current directory or contains it" in flat(result)
    result = cli("train", *TINY, "--out", ".", "--force")
    assert result.exit_code == 1 and "is the current directory or contains it" in flat(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (12, 12), (40 * i, 0, 0)).save(root / split / cls / f"{i}.png")
    (root / "val" / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def test_a_corrupt_image_is_named(cli, image_folder):
    result = cli("convert", *SMALL, "--calib", f"imagefolder:{image_folder}", "--calib-batches", "1")
    assert result.exit_code == 1, result.output
    assert f"Could not read image '{image_folder / 'val' / 'b' / 'broken.png'}'" in flat(result)


def test_a_corrupt_image_read_in_a_dataloader_worker_is_named_without_its_traceback(cli, image_folder, tmp_path):
    result = cli("train", "digits-demo", "--model", "timm:test_resnet", "--data", f"imagefolder:{image_folder}",
                 "--set", "data.image_size=8", "--set", "data.batch_size=2", "--set", "data.workers=1",
                 "--set", "epochs=1", "--out", tmp_path / "run")
    assert result.exit_code == 1, result.output
    text = flat(result)
    assert (f"Error: Could not read image '{image_folder / 'val' / 'b' / 'broken.png'}' "
            "(UnidentifiedImageError: cannot identify image file") in text
    assert text.endswith("remove or replace the file.")
    assert "Traceback" not in text and "DataLoader worker" not in text
    assert not (tmp_path / "run").exists()  # the new run saved nothing: it leaves nothing


def test_a_recipe_that_is_not_utf8_is_named(cli, tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("description: caf\xe9\n".encode("latin-1"))
    result = cli("train", path, "--model", "timm:test_resnet")
    assert result.exit_code == 1 and f"Recipe '{path}' is not UTF-8 text (byte 0xe9 at offset 16)" in flat(result)


def test_a_training_checkpoint_without_its_optimizer_state_is_named(cli, tmp_path):
    out = tmp_path / "run"
    json_output(cli("train", *TINY, "--set", "epochs=1", "--out", out, "--json"))
    state = torch.load(out / "last.pt", weights_only=True)
    del state["optimizer"]
    state["epoch"] = "one"
    torch.save(state, out / "last.pt")
    result = cli("train", "--resume", "--out", out)
    assert result.exit_code == 1, result.output
    assert (f"Checkpoint '{out / 'last.pt'}' is incomplete: missing optimizer; mistyped epoch (str, expected int)"
            in flat(result))


def test_a_mistyped_surgery_json_is_named(cli, tmp_path):
    out = tmp_path / "c"
    json_output(cli("convert", *SMALL, "--out", out, "--json"))
    meta = json.loads((out / "surgery.json").read_text())
    meta["source"]["num_classes"] = "ten"
    (out / "surgery.json").write_text(json.dumps(meta))
    for args in (["benchmark", out, "--runs", "1"], ["train", *TINY, "--model", out, "--out", tmp_path / "run"]):
        result = cli(*args)
        assert result.exit_code == 1, result.output
        assert "surgery.json' is not a valid surgery.json: source.num_classes: Input should be a valid integer " \
               "(got 'ten')" in flat(result)


def test_environment_errors_anywhere_are_exit_1_and_bugs_stay_70(cli, monkeypatch):
    def fail(exc):
        def raiser(*args, **kwargs):
            raise exc
        return raiser

    for exc, message in [
        (OSError(28, "No space left on device", "/x/y"), "No space left on device while writing '/x/y'"),
        (MemoryError(), "Out of memory"),
        (RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate memory: you tried "
                      "to allocate 57600000000 bytes."), "Out of memory ([enforce fail"),
    ]:
        monkeypatch.setattr("bsconv_surgery.surgery.convert", fail(exc))
        result = cli("convert", *SMALL)
        assert result.exit_code == 1 and message in flat(result), result.output
    monkeypatch.setattr("bsconv_surgery.surgery.convert", fail(ZeroDivisionError("oops")))
    result = cli("convert", *SMALL)
    assert result.exit_code == 70 and "This is a bug in bsconv-surgery" in flat(result)


def test_ctrl_c_in_a_command_is_exit_130(cli, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("bsconv_surgery.surgery.convert", interrupted)
    result = cli("convert", *SMALL)
    assert result.exit_code == 130 and "Interrupted." in result.output and "Traceback" not in result.output


# -- 5. library errors name the Python argument, the command line its option ----------------------

@pytest.mark.parametrize("argument, option", [("target_macs", "--target-macs"), ("input_size", "--input-size"),
                                              ("min_mid_channels", "--min-mid-channels"), ("p", "--p")])
def test_a_library_error_names_the_option_of_its_argument(cli, monkeypatch, argument, option):
    from bsconv_surgery import SurgeryError

    def fail(*args, **kwargs):
        raise SurgeryError(f"Bad {argument} 'x': {argument} must be positive (see {argument}s, my_{argument}).",
                           argument=argument)

    monkeypatch.setattr("bsconv_surgery.surgery.convert", fail)
    result = cli("convert", *SMALL)
    assert result.exit_code == 1
    assert f"Error: Bad {option} 'x': {option} must be positive (see {argument}s, my_{argument})." in flat(result)


def test_an_argument_the_command_has_no_option_for_is_left_as_it_is(cli, monkeypatch):
    from bsconv_surgery import SurgeryError

    def fail(*args, **kwargs):
        raise SurgeryError("steps must be at least 1.", argument="steps")

    monkeypatch.setattr("bsconv_surgery.surgery.convert", fail)
    assert "Error: steps must be at least 1." in flat(cli("convert", *SMALL))


@pytest.mark.parametrize("args, message", [
    (["convert", *SMALL, "--target-macs", "1e400"],
     "Error: Bad --target-macs '1e400': not finite; expected a fraction of the original in (0, 1] such as 0.5, or a "
     "count such as 300M, 2.5M or 120000."),
    (["sensitivity", "timm:test_resnet", "--input-size", "3,32"],
     "Error: Bad input size '3,32' for timm:test_resnet (classification model): expected --input-size C,H,W"),
    (["sensitivity", "timm:test_resnet", "--input-size", "5,32,32"],
     "Pass an input size it accepts with --input-size C,H,W."),
    (["convert", *SMALL, "--out", ""],
     "Error: Invalid value for '--out': an empty value is not allowed (leave the option out for its default)."),
    (["convert", ""], "Error: Invalid value for 'MODEL': an empty value is not allowed."),
    (["train", *TINY, "--set", "optimizer.lr=1.0e+300"],
     "optimizer.lr: Input should be less than or equal to 1000000 (got 1e+300)."),
])
def test_round_two_messages(cli, args, message):
    result = cli(*args)
    assert result.exit_code in (1, 2), result.output
    assert message in flat(result) and "Traceback" not in result.output


# -- 6. Ctrl-C while the command starts -----------------------------------------------------------

def _wait_until_torch_loads(pid: int, timeout: float = 60.0) -> None:
    """Return once the process has mapped torch's shared library (its import is under way)."""
    maps = Path(f"/proc/{pid}/maps")
    if not maps.exists():  # not Linux: torch alone takes more than a second to import
        time.sleep(0.5)
        return
    deadline = time.monotonic() + timeout
    while "libtorch" not in maps.read_text():
        assert time.monotonic() < deadline, "torch was never loaded"
        time.sleep(0.005)


def _console_script() -> list:
    """The console script as pyproject.toml declares it."""
    module, func = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["bsconv-surgery"].split(":")
    return ["-c", f"from {module} import {func}; {func}()"]


@pytest.mark.parametrize("entry", [_console_script(), ["-m", "bsconv_surgery"]], ids=["console script", "python -m"])
def test_ctrl_c_while_torch_imports_exits_130_without_a_traceback(entry):
    """A fresh interpreter is interrupted while it imports torch for the command."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, *entry, "convert", "resnet18"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)
    _wait_until_torch_loads(proc.pid)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err and out == b""
    assert err.decode().strip() == "Interrupted."


def test_starting_a_command_prints_no_library_warnings():
    """fvcore scripts its focal loss at import, which torch 2.14 answers with a FutureWarning on
    stderr; a user running any command must not see it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="default")
    proc = subprocess.run([sys.executable, "-m", "bsconv_surgery", "models", "resnet18", "--names-only"],
                          capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and b"resnet18" in proc.stdout
    assert proc.stderr.decode() == ""


# -- 7. small defects of the messages ---------------------------------------------------------------

def test_a_close_match_list_names_each_model_once(cli):
    """resnet18 is both timm's and torchvision's: a bare name looked up in both lists it once."""
    result = cli("convert", "resnet_18")
    assert result.exit_code == 1
    close = flat(result).split("Close matches: ", 1)[1].split(".", 1)[0].split(", ")
    assert "resnet18" in close and len(close) == len(set(close)), close


def test_close_matches_is_deduplicated_and_ordered_by_similarity():
    from bsconv_surgery.core.errors import close_matches

    assert close_matches("resnet_18", ["resnet18", "resnet34", "resnet18", "vgg11"]) == ["resnet18", "resnet34"]
    assert close_matches("zzz", ["resnet18"]) == []


def test_train_help_names_every_kind_of_data(cli):
    text = flat(cli("train", "--help"))
    for kind in ("digits", "cifar10", "cifar100", "imagefolder:PATH", "images:PATH"):
        assert kind in text, kind
