"""``bsconv-surgery export``: a ``convert --out`` folder and a ``train`` run folder written as ONNX and
``torch.export`` programs that load and compute what the PyTorch model computes at several batch
sizes; parity failures, existing files and bad folders refused, with nothing left behind."""

import sys

import numpy as np
import pytest
import timm
import torch

from bsconv_surgery import convert, load_converted
from bsconv_surgery.cli import export as export_command
from bsconv_surgery.inference import export as exporting
from bsconv_surgery.inference.ort import ort_session

from ..helpers import checkpoint, json_output, randomize_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """timm's test ResNet (3 classes, random BatchNorm statistics: folding them changes the weights)
    converted to BSConv-U at 32x32 with ``convert --out``."""
    from click.testing import CliRunner

    from bsconv_surgery.cli import bsconv_surgery

    folder = tmp_path_factory.mktemp("export")
    weights = folder / "trained.pt"
    torch.save(randomize_batchnorm(timm.create_model("test_resnet", num_classes=3), seed=3).state_dict(), weights)
    result = CliRunner().invoke(bsconv_surgery, ["convert", "timm:test_resnet", "--num-classes", "3", "--checkpoint",
                                                 str(weights), "--input-size", "3,32,32", "--out", str(folder / "u")])
    assert result.exit_code == 0, result.output
    return folder / "u"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A ``train`` run folder: the digits-demo recipe on timm's test ResNet, one epoch of two steps."""
    from click.testing import CliRunner

    from bsconv_surgery.cli import bsconv_surgery

    out = tmp_path_factory.mktemp("export-run") / "run"
    result = CliRunner().invoke(bsconv_surgery, [
        "train", "digits-demo", "--model", "timm:test_resnet", "--set", "epochs=1", "--set", "max_steps_per_epoch=2",
        "--set", "data.batch_size=16", "--set", "data.image_size=16", "--set", "data.workers=0", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def batch(n, size=32, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def relative(actual, expected) -> float:
    return exporting.relative_error(torch.as_tensor(actual), expected)


def run_onnx(path, x) -> np.ndarray:
    session = ort_session(path, threads=1)
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def test_onnx_export_loads_in_onnxruntime_and_matches_the_model_at_two_batch_sizes(cli, converted):
    data = json_output(cli("export", converted, "--json"))
    path = converted / "model.onnx"
    assert data["file"] == str(path) and path.is_file() and data["bytes"] == path.stat().st_size
    assert (data["format"], data["family"], data["input_size"]) == ("onnx", "classification", [3, 32, 32])
    assert data["batch"] == {"dynamic": True, "traced": 2, "max": 4096} and data["source"]["kind"] == "converted"
    assert data["batchnorms_folded"] > 0 and data["parity"]["batches"] == [1, 2, 3]
    assert data["parity"]["within_tolerance"] and data["parity"]["max_relative_error"] < 1e-5
    model = load_converted(converted).model.eval()  # the unfolded PyTorch model
    for n in (1, 4):
        x = batch(n, seed=n)
        with torch.no_grad():
            expected = model(x)
        assert relative(run_onnx(path, x), expected) < 1e-5


def test_pt2_export_loads_with_torch_export_and_matches_at_two_batch_sizes(cli, converted, tmp_path):
    data = json_output(cli("export", converted, "--format", "pt2", "--out", tmp_path / "m.pt2", "--json"))
    assert data["format"] == "pt2" and data["parity"]["max_relative_error"] < 1e-5
    program = torch.export.load(tmp_path / "m.pt2").module()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in program.modules())  # folded before export
    model = load_converted(converted).model.eval()
    for n in (1, 5):
        x = batch(n, seed=n)
        with torch.no_grad():
            assert relative(program(x), model(x)) < 1e-5


def test_the_table_names_the_file_its_size_input_and_parity(cli, converted, tmp_path):
    result = cli("export", converted, "--format", "pt2", "--out", tmp_path / "m.pt2")
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())
    for fact in ("pt2 (torch.export program)", "kB", "3x32x32 (classification), batch dynamic", "max relative error",
                 "batches 1, 2, 3; tolerance 0.0001", "timm:test_resnet, variant u"):
        assert fact in text, fact
    assert str(tmp_path / "m.pt2") in "".join(result.stdout.split())  # a long path folds onto two lines


def test_a_static_batch_and_another_input_size(cli, converted, tmp_path):
    data = json_output(cli("export", converted, "--static-batch", "--batch", "2", "--input-size", "3,48,48",
                           "--out", tmp_path / "b2.onnx", "--json"))
    assert data["batch"] == {"dynamic": False, "traced": 2} and data["input_size"] == [3, 48, 48]
    assert data["parity"]["batches"] == [2, 2, 2]
    session = ort_session(tmp_path / "b2.onnx", threads=1)
    assert session.get_inputs()[0].shape == [2, 3, 48, 48]


def test_an_existing_file_needs_force(cli, converted, tmp_path):
    out = tmp_path / "m.pt2"
    out.write_bytes(b"old")
    result = cli("export", converted, "--format", "pt2", "--out", out)
    assert result.exit_code == 1 and "already exists; pass --force to replace it" in result.output
    assert out.read_bytes() == b"old"
    assert cli("export", converted, "--format", "pt2", "--out", out, "--force").exit_code == 0
    torch.export.load(out)  # replaced by a program


@pytest.mark.parametrize("error, shown", [(0.5, "5.00e-01"), (float("nan"), "not a number (NaN)")])
def test_a_parity_failure_writes_nothing_unless_forced(cli, converted, tmp_path, monkeypatch, error, shown):
    monkeypatch.setattr(exporting, "program_parity", lambda *args: error)
    folder = tmp_path / "out"
    folder.mkdir()
    result = cli("export", converted, "--format", "pt2", "--out", folder / "m.pt2")
    text = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert (f"the largest relative error on 3 random inputs (batches 1, 2, 3) is {shown}, above the tolerance "
            "0.0001") in text
    assert "was not written; pass --force to write it anyway" in text and "Traceback" not in result.output
    assert list(folder.iterdir()) == []  # neither the file nor its temporary sibling
    forced = cli("export", converted, "--format", "pt2", "--out", folder / "m.pt2", "--force")
    assert forced.exit_code == 0 and "Warning: Written with --force" in " ".join(forced.stderr.split())
    assert [p.name for p in folder.iterdir()] == ["m.pt2"]


def test_a_tolerance_no_export_meets_is_refused_for_real(cli, converted, tmp_path):
    """Without a patched parity: folding BatchNorm moves the outputs by rounding, so 1e-12 is never met."""
    result = cli("export", converted, "--format", "pt2", "--out", tmp_path / "m.pt2", "--tolerance", "1e-12")
    assert result.exit_code == 1 and "above the tolerance 1e-12" in result.output
    assert not (tmp_path / "m.pt2").exists()


def test_a_run_folder_exports_its_best_checkpoint(cli, run):
    data = json_output(cli("export", run, "--json"))
    best = checkpoint(run / "best.pt")
    assert data["source"]["kind"] == "run" and data["source"]["epoch"] == best["epoch"] == 1
    assert data["source"]["checkpoint"] == str(run / "best.pt") and data["input_size"] == [3, 16, 16]
    assert data["source"]["val_acc"] == best["history"][0]["val_acc"]
    model = timm.create_model("test_resnet", num_classes=10)  # built by hand: the digits' 10 classes
    model.load_state_dict(best["model"])
    model.eval()
    for n in (1, 3):
        x = batch(n, size=16, seed=n)
        with torch.no_grad():
            assert relative(run_onnx(run / "model.onnx", x), model(x)) < 1e-5


def test_a_run_saved_without_its_classes_is_sized_from_its_data(cli, run, tmp_path):
    state = checkpoint(run / "best.pt")
    del state["num_classes"]  # as runs saved before the classes were recorded
    old = tmp_path / "old-run"
    old.mkdir()
    torch.save(state, old / "best.pt")
    data = json_output(cli("export", old, "--format", "pt2", "--json"))
    assert data["source"]["kind"] == "run"
    program = torch.export.load(old / "model.pt2").module()
    assert program(batch(2, size=16)).shape == (2, 10)


def test_a_run_whose_model_is_gone_says_it_cannot_be_rebuilt(cli, run, tmp_path):
    state = checkpoint(run / "best.pt")
    state["recipe"]["model"] = str(tmp_path / "deleted-conversion")  # trained on a convert --out folder, since removed
    moved = tmp_path / "run"
    moved.mkdir()
    torch.save(state, moved / "best.pt")
    result = cli("export", moved)
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Cannot rebuild the model the run '{moved}' trained (model: {tmp_path / 'deleted-conversion'}" in text
    assert "is not a directory written by 'bsconv-surgery convert --out'" in text


def _a_file(tmp):
    (tmp / "model.onnx").write_bytes(b"x")
    return tmp / "model.onnx"


def _empty_run(folder):
    folder.mkdir()
    (folder / "recipe.yaml").write_text("model: timm:test_resnet\n")
    return folder


BAD = [
    ("missing", lambda tmp: tmp / "nowhere", "'{p}' does not exist: RUN_OR_DIR is a folder written by"),
    ("a file", _a_file, "'{p}' is a file"),
    ("an empty folder", lambda tmp: tmp, "'{p}' is neither a folder written by 'bsconv-surgery convert --out'"),
    ("a run with no epoch done", lambda tmp: _empty_run(tmp / "run"),
     "'{p}' has no best.pt: it is written at the end of an epoch"),
]


def _converted_in_python(tmp):
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    convert(module, "u", example_inputs=(3, 8, 8)).save(tmp / "module-u")
    return tmp / "module-u"


BAD.append(("a module converted without a spec", _converted_in_python,
            "'{p}' holds a module converted in Python without a spec to rebuild it from; export it in Python: "
            "bs.export_converted(bs.load_converted('{p}', model=your_module), 'model.onnx')"))


@pytest.mark.parametrize("make, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_a_bad_run_or_dir_is_a_clear_error(cli, tmp_path, make, message):
    path = make(tmp_path)
    result = cli("export", path)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert message.format(p=path) in " ".join(result.output.split())


@pytest.mark.parametrize("args, message", [
    (["--out", "model.pt2"], "--out 'model.pt2' ends in .pt2 but --format is onnx"),
    (["--batch", "1"], "A dynamic batch is traced on 2 or more samples (torch.export fixes a traced batch of 1 as a "
                       "constant): give --batch 2 or more, or export a fixed batch of 1 with --static-batch."),
    (["--input-size", "3,32"], "Bad input size '3,32'"),
])
def test_bad_options_are_clear_errors(cli, converted, tmp_path, args, message):
    out = [] if "--out" in args else ["--out", tmp_path / "m.onnx"]
    result = cli("export", converted, *args, *out)
    assert result.exit_code == 1 and message in " ".join(result.output.split()), result.output


def test_without_onnxruntime_one_line_says_what_to_install(cli, converted, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime raises ImportError
    result = cli("export", converted, "--out", tmp_path / "m.onnx")
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert result.stderr.startswith("Error: Exporting to ONNX needs onnxruntime, which cannot be imported here")
    assert result.stderr.strip().endswith("install them with: pip install onnx onnxruntime onnxscript")
    assert not (tmp_path / "m.onnx").exists()


def test_the_command_offers_the_library_formats():
    assert export_command.FORMATS == exporting.FORMATS
