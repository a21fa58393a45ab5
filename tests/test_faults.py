"""Fault injection: a full disk, a read-only folder and kill -9 in the middle of a save, against
convert --out, compare --csv and train. After each: what existed before is intact (byte for
byte), no temporary file is left, and a training run resumes to the weights of an uninterrupted
one. Real faults run in a subprocess (a file-size limit, SIGKILL); the rest are mocked where the
real thing needs privileges (tests may run as root, which writes to a chmod 0555 folder).

Round two (issue 24, at the end): hostile input of every failure class the second round found
(security, hangs, integrity, exit 70 for the user's faults, silently accepted values, the Python
API, data safety), as a table of command lines (``ROUND_TWO``) and one test per root fix."""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import timm
import torch
import yaml

import bsconv_surgery as bs
import bsconv_surgery.io.saving as saving
from bsconv_surgery.data import datasets
from bsconv_surgery.io import documents, files
from bsconv_surgery.training.recipe import recipe_from_dict

from .helpers import TINY, checkpoint, fill_hf_cache, json_output, metrics, random_state

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["timm:test_resnet", "--input-size", "3,32,32"]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones too) with its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list:
    """Temporary files and folders (``.NAME.tmp-*``, ``.NAME.new-*``, ``.NAME.old-*``, probes) under ``folder``."""
    return sorted(p.name for p in folder.rglob(".*") if any(k in p.name for k in (".tmp-", ".new-", ".old-", "probe")))


CHILD = """
import os, signal, sys, resource
import torch, shutil
from bsconv_surgery.cli import bsconv_surgery
torch.set_num_threads(1)
{patch}
bsconv_surgery.main(sys.argv[1:], prog_name="bsconv-surgery")
"""

#: SIGKILL this process in the ``n``-th call of ``torch.save`` (checkpoints), once half of the
#: file is written.
KILL_IN_SAVE = """
real_save, calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == {n}:
        import io
        buf = io.BytesIO(); real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
"""

#: SIGKILL this process in the ``n``-th file copy (best.pt from last.pt), half-way through.
KILL_IN_COPY = """
real_copy, copies = shutil.copyfile, [0]
def copyfile(src, dst, *args, **kwargs):
    copies[0] += 1
    if copies[0] == {n}:
        data = open(src, "rb").read()
        with open(dst, "wb") as fh:
            fh.write(data[: len(data) // 2]); fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_copy(src, dst, *args, **kwargs)
shutil.copyfile = copyfile
"""

#: A file-size limit: a write past ``limit`` bytes fails with EFBIG, as on a full disk.
FILE_SIZE_LIMIT = """
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
"""


def child(patch: str, *args, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", CHILD.format(patch=patch), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd or ROOT, timeout=600)


def flat(text: str) -> str:
    return " ".join(text.split())


# -- disk full ------------------------------------------------------------------------------------

def test_disk_full_during_forced_writes_keeps_the_old_outputs_and_names_the_file(cli, tmp_path):
    """A file-size limit (EFBIG, what a full disk does to a write) in a real process: a forced
    convert --out and a forced train --out fail naming the file; the old outputs stay whole."""
    out, run = tmp_path / "converted", tmp_path / "run"
    json_output(cli("convert", *SMALL, "--variant", "s", "--out", out, "--json"))
    json_output(cli("train", *TINY, "--set", "epochs=1", "--out", run, "--json"))
    before = snapshot(tmp_path)
    both = ("\nfor args in (sys.argv[1:{n}], sys.argv[{n}:]):\n"
            "    try:\n        bsconv_surgery.main(args, prog_name='bsconv-surgery')\n"
            "    except SystemExit as exc:\n        print('exit', exc.code, flush=True)\nsys.exit(0)")
    convert = ["convert", *SMALL, "--out", out, "--force"]
    proc = child(FILE_SIZE_LIMIT.format(limit=100_000) + both.format(n=len(convert) + 1),
                 *convert, "train", *TINY, "--out", run, "--force")
    assert proc.stdout.split() == ["exit", "1", "exit", "1"], proc.stderr
    assert f"File size limit reached while writing '{out / 'model.safetensors'}'" in flat(proc.stderr)
    assert f"File size limit reached while writing '{run / 'last.pt'}'" in flat(proc.stderr)
    assert "unexpected pos" not in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []  # the old outputs, whole; nothing new


class FullDisk:
    """A file whose writes fail with ENOSPC after ``room`` bytes."""

    def __init__(self, path, room):
        self.fh, self.room = open(path, "wb"), room

    def write(self, data):
        if len(data) > self.room:
            self.fh.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.fh.write(data)

    def flush(self):
        self.fh.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def test_no_space_left_in_the_middle_of_training_keeps_the_last_checkpoint_resumable(cli, tmp_path, monkeypatch):
    out = tmp_path / "run"
    saves = [0]

    def open_(path, mode="r", *args, **kwargs):
        saves[0] += 1
        return FullDisk(path, 4096) if saves[0] == 2 else open(path, mode, *args, **kwargs)  # epoch 2's last.pt

    with monkeypatch.context() as patch:
        patch.setattr(files, "open", open_, raising=False)
        result = cli("train", *TINY, "--out", out)
    assert result.exit_code == 1, result.output
    assert f"No space left on device while writing '{out / 'last.pt'}'" in flat(result.output)
    assert "unexpected pos" not in result.output
    assert checkpoint(out / "last.pt")["epoch"] == 1 and leftovers(tmp_path) == []
    summary = json_output(cli("train", "--resume", "--out", out, "--json"))
    assert summary["epochs_done"] == 2 and [r["epoch"] for r in metrics(out)] == [1, 2]


def test_no_space_left_for_a_forced_csv_or_conversion_keeps_the_old_file(cli, tmp_path, monkeypatch):
    csv, out = tmp_path / "table.csv", tmp_path / "converted"
    assert cli("compare", *SMALL, "--variant", "orig", "--csv", csv, "--no-cross-check").exit_code == 0
    json_output(cli("convert", *SMALL, "--out", out, "--json"))
    before = snapshot(tmp_path)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", full)
        result = cli("compare", *SMALL, "--csv", csv, "--force", "--no-cross-check")
    assert result.exit_code == 1 and f"No space left on device while writing '{csv}'" in flat(result.output)

    def half_written(model, filename, *args, **kwargs):  # safetensors reports the OS error in its message
        Path(filename).write_bytes(b"\0" * 1000)
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as patch:
        patch.setattr(saving, "save_model", half_written)
        result = cli("convert", *SMALL, "--variant", "s", "--out", out, "--force")
    assert result.exit_code == 1, result.output
    assert f"No space left on device while writing '{out / 'model.safetensors'}'" in flat(result.output)
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


# -- read-only folders ----------------------------------------------------------------------------

@pytest.fixture
def locked(tmp_path):
    """A folder this process cannot create files in: chmod 0555, or, for root (whom permission
    bits do not stop), /sys where the kernel refuses new files."""
    if os.geteuid() != 0:
        folder = tmp_path / "locked"
        folder.mkdir()
        os.chmod(folder, 0o555)
        yield folder
        os.chmod(folder, 0o755)
        return
    try:
        fd, probe = files.tempfile.mkstemp(dir="/sys")
    except OSError:
        yield Path("/sys")
        return
    os.close(fd)
    os.unlink(probe)
    pytest.skip("running as root and /sys takes new files: no real read-only folder (test_messages.py mocks one)")


def test_a_real_read_only_folder_is_refused_before_the_work(cli, locked, tmp_path):
    before = sorted(p.name for p in locked.iterdir())
    for args in (["convert", *SMALL, "--out", locked / "c"], ["compare", *SMALL, "--csv", locked / "c.csv"],
                 ["train", *TINY, "--out", locked / "run"]):
        result = cli(*args)
        assert result.exit_code == 1, result.output
        assert f"while creating '{args[args.index('--out' if '--out' in args else '--csv') + 1]}' in '{locked}'" in \
            flat(result.output)
    assert sorted(p.name for p in locked.iterdir()) == before


def test_resuming_in_a_folder_that_cannot_be_written_is_refused_before_the_work(cli, tmp_path, monkeypatch):
    run = tmp_path / "run"
    json_output(cli("train", *TINY, "--set", "epochs=1", "--out", run, "--json"))
    before = snapshot(run)
    real = files.tempfile.mkstemp

    def mkstemp(*args, dir=None, **kwargs):
        if Path(dir) == run:
            raise OSError(errno.EROFS, "Read-only file system", str(run))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    result = cli("train", *TINY, "--set", "epochs=1", "--resume", "--out", run)
    assert result.exit_code == 1, result.output
    assert f"Read-only file system while creating '{run / 'last.pt'}' in '{run}'" in flat(result.output)
    assert snapshot(run) == before


# -- replacing, not deleting ----------------------------------------------------------------------

def test_a_forced_run_that_fails_keeps_the_old_run(cli, tmp_path):
    out = tmp_path / "run"
    json_output(cli("train", *TINY, "--set", "epochs=1", "--out", out, "--json"))
    before = snapshot(tmp_path)
    result = cli("train", *TINY, "--set", "optimizer.lr=1e6", "--out", out, "--force")
    assert result.exit_code == 1, result.output
    assert "Training diverged in epoch 1: the training loss is nan" in flat(result.output)
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []
    json_output(cli("train", *TINY, "--set", "epochs=1", "--set", "seed=3", "--out", out, "--force", "--json"))
    assert checkpoint(out / "last.pt")["recipe"]["seed"] == 3 and leftovers(tmp_path) == []


@pytest.mark.slow
def test_kill_during_the_first_save_of_a_forced_run_keeps_the_old_run(cli, tmp_path):
    out = tmp_path / "run"
    json_output(cli("train", *TINY, "--set", "epochs=1", "--out", out, "--json"))
    before = snapshot(out)
    proc = child(KILL_IN_SAVE.format(n=1), "train", *TINY, "--out", out, "--force")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert snapshot(out) == before  # the new run was being built beside it


# -- kill -9 during checkpoint saves --------------------------------------------------------------

def test_kill_during_a_last_pt_save_then_resume_cleans_up_and_ends_with_the_uninterrupted_weights(cli, tmp_path):
    json_output(cli("train", *TINY, "--out", tmp_path / "full", "--json"))
    out = tmp_path / "cut"
    proc = child(KILL_IN_SAVE.format(n=2), "train", *TINY, "--out", out)  # epoch 2's last.pt
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert checkpoint(out / "last.pt")["epoch"] == 1
    assert [p.name.split(".tmp-")[0] for p in out.glob(".*.tmp-*")] == [".last.pt"]
    result = cli("train", "--resume", "--out", out)
    assert result.exit_code == 0, result.output
    assert "Removed 1 temporary file(s) of interrupted saves: .last.pt.tmp-" in flat(result.output)
    assert leftovers(tmp_path) == []
    full, cut = checkpoint(tmp_path / "full" / "last.pt"), checkpoint(out / "last.pt")
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])


def test_kill_during_the_best_pt_copy_is_repaired_on_resume(cli, tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--set", "epochs=3", "--set", "optimizer.lr=0.003", "--set", "schedule.name=constant"]
    proc = child(KILL_IN_COPY.format(n=2), "train", *args, "--out", out)  # the second improvement's copy
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # (so there were two: the test's premise)
    last = checkpoint(out / "last.pt")
    assert last["best"]["epoch"] == last["epoch"] != checkpoint(out / "best.pt")["epoch"]  # stale best.pt
    summary = json_output(cli("train", *args, "--resume", "--out", out, "--json"))
    assert summary["best_epoch"] == checkpoint(out / "best.pt")["epoch"]
    best = max(metrics(out), key=lambda r: r["val_acc"])
    assert summary["best_epoch"] == best["epoch"] and summary["best_val_acc"] == best["val_acc"]
    assert leftovers(tmp_path) == []


def test_resume_reports_the_repair(cli, tmp_path):
    """best.pt one epoch behind (a kill between writing last.pt and copying it): the resumed run
    says what it repaired."""
    out = tmp_path / "run"
    json_output(cli("train", *TINY, "--set", "epochs=1", "--out", out, "--json"))
    (out / "best.pt").unlink()
    (out / ".best.pt.tmp-abc.pt").write_bytes(b"half")
    result = cli("train", *TINY, "--set", "epochs=1", "--resume", "--out", out)
    assert result.exit_code == 0, result.output
    text = flat(result.output)
    assert "Removed 1 temporary file(s) of interrupted saves: .best.pt.tmp-abc.pt." in text
    assert f"Repaired {out / 'best.pt'}: it is missing or unreadable, the best epoch is 1; rewritten from last.pt." in text
    assert checkpoint(out / "best.pt")["epoch"] == 1 and leftovers(tmp_path) == []


# -- modes ----------------------------------------------------------------------------------------

@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_outputs_follow_the_umask_and_a_replaced_file_keeps_its_mode(cli, tmp_path, umask_027):
    out, run, csv = tmp_path / "converted", tmp_path / "run", tmp_path / "table.csv"
    json_output(cli("convert", *SMALL, "--out", out, "--json"))
    json_output(cli("train", *TINY, "--set", "epochs=1", "--out", run, "--json"))
    assert cli("compare", *SMALL, "--variant", "orig", "--csv", csv, "--no-cross-check").exit_code == 0
    assert mode(out) == mode(run) == 0o750
    assert {p.name: mode(p) for p in [*out.iterdir(), *run.iterdir(), csv]} == {
        "model.safetensors": 0o640, "surgery.json": 0o640, "last.pt": 0o640, "best.pt": 0o640,
        "metrics.jsonl": 0o640, "recipe.yaml": 0o640, "table.csv": 0o640}
    os.chmod(csv, 0o644)
    assert cli("compare", *SMALL, "--variant", "orig", "--csv", csv, "--force", "--no-cross-check").exit_code == 0
    assert mode(csv) == 0o644
    json_output(cli("train", *TINY, "--set", "epochs=1", "--out", run, "--force", "--json"))
    assert mode(run) == 0o750 and mode(run / "last.pt") == 0o640


# -- many kills at random moments (slow) ----------------------------------------------------------

@pytest.mark.slow
def test_random_kills_never_break_resume(cli, tmp_path):
    """kill -9 at random moments of a run (after its first checkpoint), resumed each time: the run
    ends with the uninterrupted run's weights, a best.pt that holds the best epoch, no temp files."""
    args = [*TINY, "--set", "epochs=4", "--set", "max_steps_per_epoch=20"]
    json_output(cli("train", *args, "--out", tmp_path / "full", "--json"))
    out, rng = tmp_path / "cut", random.Random(0)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    start = [sys.executable, "-m", "bsconv_surgery", "train", *args, "--out", str(out)]
    proc = subprocess.Popen(start, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (out / "last.pt").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    resume = [sys.executable, "-m", "bsconv_surgery", "train", "--resume", "--out", str(out)]
    for _ in range(8):
        proc = subprocess.Popen(resume, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2, 8))
        proc.kill()
        proc.wait()
    result = cli("train", "--resume", "--out", out)
    assert result.exit_code == 0, result.output
    full, cut = checkpoint(tmp_path / "full" / "last.pt"), checkpoint(out / "last.pt")
    assert all(torch.equal(full["model"][k], cut["model"][k]) for k in full["model"])
    assert checkpoint(out / "best.pt")["epoch"] == max(metrics(out), key=lambda r: r["val_acc"])["epoch"]
    assert leftovers(tmp_path) == []


# == round two (issue 24) ==========================================================================
# A second fault-injection round found failures of the classes below; each is fixed at its root
# (named in the class's tests) and ROUND_TWO holds one command line per class and symptom, run
# by test_round_two. The classes of the issue: every one must appear in the table.

CLASSES = {"security", "hangs", "integrity", "exit 70", "silently accepted", "python api", "data safety"}


def alias_bomb(levels: int = 9) -> str:
    """Nine aliases of nine aliases ... of a list: a few hundred bytes that expand to 9**9 values."""
    text = 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels):
        text += f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]\n"
    return text + f"description: *a{levels - 1}\n"


def nested(depth: int, opening: str = "[", closing: str = "]") -> str:
    return opening * depth + closing * depth


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def converted(cli, folder: Path, *extra) -> Path:
    json_output(cli("convert", *SMALL, "--out", folder, "--json", *extra))
    return folder


def deep_surgery_json(cli, tmp_path: Path) -> Path:
    folder = converted(cli, tmp_path / "deep")
    meta = json.loads((folder / "surgery.json").read_text())
    meta["report"]["counter"] = json.loads(nested(200))
    (folder / "surgery.json").write_text(json.dumps(meta))
    return folder


#: (class, id, setup(cli, tmp_path) -> extra arguments, command line (``{x}``: the setup's result),
#: exit code, what the message must say, in order). Every case must end within the test's deadline.
ROUND_TWO = [
    ("security", "recipe-name-escapes-runs", lambda cli, t: write(t, "r.yaml", "name: ../../escaped\n"),
     ["train", "{x}", "--model", "timm:test_resnet", "--set", "data.image_size=8"], 1,
     ["The recipe name '../../escaped-", "cannot name a folder inside 'runs'"]),
    ("security", "yaml-alias-bomb", lambda cli, t: write(t, "bomb.yaml", alias_bomb()),
     ["train", "{x}"], 1, ["is refused at line", "aliases expand to more than 100,000 values (an alias bomb?)"]),
    ("security", "yaml-self-alias", lambda cli, t: write(t, "self.yaml", "description: &a [*a]\n"),
     ["train", "{x}"], 1, ["is refused at line 1", "an alias refers to the value that contains it"]),
    ("security", "yaml-deep-nesting", lambda cli, t: write(t, "deep.yaml", f"description: {nested(100_000)}\n"),
     ["train", "{x}"], 1, ["is refused at line 1", "nested more than 64 levels deep"]),
    ("security", "set-deep-nesting", None, ["train", "digits-demo", "--set", f"description={nested(10_000)}"], 1,
     ["Bad --set 'description=[[[[", "the value is refused (nested more than 64 levels deep)"]),
    ("security", "json-deep-nesting", deep_surgery_json, ["train", *TINY, "--model", "{x}"], 1,
     ["surgery.json': ValueError: nested more than 64 levels deep"]),
    ("exit 70", "target-macs-1e400", None, ["convert", *SMALL, "--target-macs", "1e400"], 1,
     ["Bad --target-macs '1e400': not finite; expected a fraction"]),
    ("exit 70", "target-macs-5000-digits", None, ["convert", *SMALL, "--target-macs", "9" * 5000], 1,
     ["Bad --target-macs '99999", "(5002 characters): too long"]),
    ("exit 70", "target-params-inf", None, ["convert", *SMALL, "--target-params", "inf"], 1,
     ["Bad --target-params 'inf': not a number"]),
    ("exit 70", "target-macs-nan", None, ["convert", *SMALL, "--target-macs", "nan"], 1,
     ["Bad --target-macs 'nan': not a number"]),
    ("exit 70", "target-macs-beyond-int64", None, ["convert", *SMALL, "--target-macs", "9" * 30], 1,
     ["Bad --target-macs", "too large"]),
    ("exit 70", "recipe-5000-digit-integer", lambda cli, t: write(t, "big.yaml", f"epochs: {'9' * 5000}\n"),
     ["train", "{x}"], 1, ["is refused at line 1, column 9: an integer of 5000 characters is too large"]),
    ("exit 70", "recipe-integer-beyond-int64", None, ["train", *TINY, "--set", f"seed={'9' * 30}"], 1,
     ["the value is refused (the integer 999999999999999999999999999999 is too large"]),
    ("exit 70", "recipe-seed-beyond-torch", None, ["train", *TINY, "--set", f"seed={2**63 - 1}"], 1,
     ["seed: Input should be less than or equal to 4294967295"]),
    ("exit 70", "recipe-learning-rate-overflows-float32", None, ["train", *TINY, "--set", "optimizer.lr=1.0e300"], 1,
     ["optimizer.lr: Input should be less than or equal to 1000000"]),
    ("exit 70", "recipe-image-size-overflows", None, ["train", *TINY, "--set", f"data.image_size={2**62}"], 1,
     ["data.image_size: Input should be less than or equal to 4096"]),
    ("exit 70", "recipe-workers-fork-bomb", None, ["train", *TINY, "--set", f"data.workers={2**62}"], 1,
     ["data.workers: Input should be less than or equal to 128"]),
    ("exit 70", "num-classes-beyond-torch", None, ["convert", *SMALL, "--num-classes", "9" * 20], 1,
     ["Bad --num-classes 99999999999999999999: expected a positive integer of at most 10,000,000"]),
    ("exit 70", "calib-batches-beyond-memory", None, ["convert", *SMALL, "--calib", "random", "--calib-batches", "9" * 20],
     1, ["--calib-batches must be a whole number in [1, 10000], not 99999999999999999999 (too large)."]),
    ("exit 70", "sensitivity-input-size-the-model-refuses", None,
     ["sensitivity", "timm:test_resnet", "--input-size", "5,32,32"], 1,
     ["The model does not run on a 5x32x32 input before any surgery", "accepts with --input-size C,H,W."]),
    ("silently accepted", "convert-out-empty", None, ["convert", *SMALL, "--out", ""], 2,
     ["Invalid value for '--out': an empty value is not allowed"]),
    ("silently accepted", "train-teacher-checkpoint-empty", None, ["train", *TINY, "--teacher-checkpoint", ""], 2,
     ["Invalid value for '--teacher-checkpoint': an empty value is not allowed"]),
    ("silently accepted", "recipe-teacher-checkpoint-empty", None,
     ["train", *TINY, "--set", "distill.teacher_checkpoint=''"], 1,
     ["distill.teacher_checkpoint: must not be empty"]),
    ("python api", "cli-maps-arguments-to-options", None, ["convert", *SMALL, "--variant", "s", "--p", "inf"], 1,
     ["Bad --p 'inf': expected a number in (0, 1]"]),
]


@pytest.fixture
def deadline():
    """Fail (instead of hanging) a test that runs past ``seconds``: SIGALRM in the main thread."""
    def expire(signum, frame):
        raise TimeoutError("the case did not end within its deadline (a hang)")

    old = signal.signal(signal.SIGALRM, expire)

    def arm(seconds: int) -> None:
        signal.alarm(seconds)

    yield arm
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_round_two_covers_every_class():
    assert {case[0] for case in ROUND_TWO} | {"hangs", "integrity", "data safety"} == CLASSES  # those three: below


@pytest.mark.parametrize("kind, name, setup, args, code, expected", ROUND_TWO, ids=[c[1] for c in ROUND_TWO])
def test_round_two(cli, tmp_path, monkeypatch, deadline, kind, name, setup, args, code, expected):
    monkeypatch.chdir(tmp_path)
    x = setup(cli, tmp_path) if setup else None
    before = sorted(p.name for p in tmp_path.parent.iterdir())
    deadline(60)
    started = time.perf_counter()
    result = cli(*[str(x) if a == "{x}" else a for a in args])
    assert result.exit_code == code, result.output
    text, at = flat(result.output), 0
    for part in expected:
        assert part in text[at:], (part, text)
        at = text.index(part, at) + len(part)
    assert "Traceback" not in text and "This is a bug" not in text and len(text) < 700
    assert time.perf_counter() - started < 30  # fails fast: no hang, no expansion
    assert not (tmp_path / "runs").exists() and sorted(p.name for p in tmp_path.parent.iterdir()) == before


# -- security: names that become paths, the loaders -----------------------------------------------

@pytest.mark.parametrize("name", ["../x", "..", ".", "", " ", "a/b", "/abs", "x\0y", "a/../../b"])
def test_a_user_given_name_cannot_leave_its_parent(tmp_path, name):
    with pytest.raises(files.SurgeryError, match="cannot name a folder inside"):
        files.child_path(tmp_path, name)


def test_a_plain_name_is_a_child(tmp_path):
    assert files.child_path(tmp_path, "run-2024") == tmp_path / "run-2024"
    assert files.child_path("runs", "..x") == Path("runs") / "..x"


@pytest.mark.parametrize("text, problem", [
    (alias_bomb(), "aliases expand to more than 100,000 values"),
    ("a: &a [*a]", "an alias refers to the value that contains it"),
    ("a: &a {b: *a}", "an alias refers to the value that contains it"),
    (f"a: {nested(65)}", "nested more than 64 levels deep"),
    (f"a: {nested(65, '{x: ', '}')}", "nested more than 64 levels deep"),
    ("a: &a " + nested(40) + "\nb: [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[*a]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]", "more than 64 levels"),
    (f"a: {'9' * 41}", "an integer of 41 characters is too large"),
    (f"a: {2**63}", "is too large"),
])
def test_the_yaml_loader_refuses_bombs_at_once(text, problem):
    started = time.perf_counter()
    with pytest.raises(documents.LimitError, match=problem):
        documents.load_yaml(text)
    assert time.perf_counter() - started < 2


def test_the_yaml_loader_reads_what_safe_load_reads():
    text = "base: &b {lr: 0.1, steps: [1, 2]}\nrun: {<<: *b, lr: 0.2}\nmany: [*b, *b, *b]\nbig: 9223372036854775807\n"
    assert documents.load_yaml(text) == yaml.safe_load(text)
    assert documents.load_yaml("") is None


@pytest.mark.parametrize("text, problem", [(nested(65), "nested more than 64"), (nested(100_000), "nested more than 64"),
                                           ('{"a": ' + "9" * 5000 + "}", "too large"),
                                           ('{"a": ' + str(2**63) + "}", "too large")])
def test_the_json_loader_refuses_deep_or_huge_documents(text, problem):
    with pytest.raises(ValueError, match=problem):
        documents.load_json(text)
    text = json.dumps({"a": "[" * 72, "b": [1.5]})
    assert documents.load_json(text) == {"a": "[" * 72, "b": [1.5]}  # brackets inside strings are text


# -- hangs: the one folder walker -----------------------------------------------------------------

@pytest.fixture
def looped_images(tmp_path):
    """Two images at the top, one in a sub-folder, and links that loop: to the folder itself, to
    its parent, and between two sub-folders; a class folder of an imagefolder linking to itself."""
    from PIL import Image

    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "other").mkdir()
    for p in (root / "a.png", root / "b.png", root / "sub" / "c.png"):
        Image.new("RGB", (12, 12), (200, 0, 0)).save(p)
    (root / "self").symlink_to(".")
    (root / "sub" / "up").symlink_to("..")
    (root / "sub" / "to-other").symlink_to("../other")
    (root / "other" / "to-sub").symlink_to("../sub")
    (root / "nowhere").symlink_to("missing")
    folder = tmp_path / "classes"
    for split in ("train", "val"):
        for cls in ("x", "y"):
            (folder / split / cls).mkdir(parents=True)
            Image.new("RGB", (12, 12)).save(folder / split / cls / "0.png")
            (folder / split / cls / "loop").symlink_to(".")
    return root, folder


def test_the_walker_enters_every_folder_once(looped_images, deadline):
    root, folder = looped_images
    deadline(30)
    found = datasets.walk_files(root)
    assert [p.relative_to(root).as_posix() for p in found] == ["a.png", "b.png", "sub/c.png"]  # once each
    assert len(datasets.image_files(root)) == 3
    train = datasets.image_folder(folder / "train", 8)
    assert sorted((Path(p).relative_to(folder).as_posix(), c) for p, c in train.samples) == [
        ("train/x/0.png", 0), ("train/y/0.png", 1)]


@pytest.mark.parametrize("calib, samples", [("images:{root}", 3), ("imagefolder:{folder}", 2)])
def test_calibration_on_looped_folders_ends_and_counts_each_image_once(cli, looped_images, deadline, calib, samples):
    root, folder = looped_images
    deadline(120)
    report = json_output(cli("convert", *SMALL, "--calib", calib.format(root=root, folder=folder), "--calib-batches",
                             "1", "--json"))
    assert report["fidelity"]["samples"] == samples


def test_training_on_a_looped_folder_ends(cli, looped_images, tmp_path, deadline):
    root, folder = looped_images
    deadline(300)
    summary = json_output(cli("train", *TINY, "--data", f"imagefolder:{folder}", "--set", "epochs=1",
                              "--set", "data.batch_size=2", "--set", "recalibrate_bn=false", "--out", tmp_path / "run",
                              "--json"))
    assert summary["epochs_done"] == 1


# -- integrity: the teacher's recorded SHA-256 ----------------------------------------------------

def test_a_changed_teacher_is_refused_before_training(cli, tmp_path):
    teacher = tmp_path / "teacher.pt"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), teacher)
    folder = converted(cli, tmp_path / "c", "--num-classes", "10", "--checkpoint", teacher)
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), teacher)  # other random weights
    result = cli("train", *TINY, "--model", folder, "--set", "distill.enabled=true", "--out", tmp_path / "run")
    assert result.exit_code == 1, result.output
    assert (f"Checkpoint '{teacher}' is not the file the model was converted from (timm:test_resnet): its SHA-256 is "
            in flat(result.output))
    assert "restore that file, or pass the teacher's weights with --teacher-checkpoint FILE" in flat(result.output)
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_refuses_a_teacher_changed_since_it_started(cli, tmp_path):
    teacher, out = tmp_path / "teacher.pt", tmp_path / "run"
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), teacher)
    json_output(cli("train", *TINY, "--set", "epochs=1", "--teacher-checkpoint", teacher, "--out", out, "--json"))
    assert len(checkpoint(out / "last.pt")["teacher_sha256"]) == 64
    before = snapshot(out)
    torch.save(timm.create_model("test_resnet", num_classes=10).state_dict(), teacher)
    result = cli("train", "--resume", "--out", out)
    assert result.exit_code == 1, result.output
    assert f"The teacher's weights '{teacher}' changed since the run started" in flat(result.output)
    assert snapshot(out) == before


# -- exit 70: the choice cache, NaN cached weights ------------------------------------------------

CACHE_SHAPES = {
    "list": [], "number": 3, "string": "x", "null": None, "true": True, "entry-list": {"K": []},
    "entry-number": {"K": 5}, "entry-empty": {"K": {}}, "chosen-number": {"K": {"chosen": 7}},
    "chosen-list": {"K": {"chosen": ["fused"]}}, "candidates-list": {"K": {"chosen": "fused", "candidates": []}},
    "candidate-number": {"K": {"chosen": "fused", "candidates": {"fused": 3}}},
    "median-text": {"K": {"chosen": "fused", "candidates": {"fused": {"median_ms": "fast"}}}},
    "median-negative": {"K": {"chosen": "fused", "candidates": {"fused": {"median_ms": -1}}}},
    "nested-garbage": {"K": {"chosen": "fused", "candidates": {"fused": {"label": {"a": [[[{"b": []}]]]}}}}},
    "deep": json.loads(nested(60)), "deeper-than-64": "RAW" + nested(70), "huge-integer": "RAW{\"K\": " + "9" * 50 + "}",
    "not-json": "RAW{not json", "not-utf8": b"\xff\xfe{",
}


@pytest.mark.parametrize("shape", CACHE_SHAPES.values(), ids=CACHE_SHAPES.keys())
def test_a_choice_cache_of_the_wrong_shape_is_ignored_with_a_note_and_measured_again(tmp_path, monkeypatch, shape):
    from bsconv_surgery.inference import preps

    from .inference.test_preps import Blocks, fake_timer

    monkeypatch.setenv("BSCONV_SURGERY_CACHE", str(tmp_path))
    model, x = Blocks().eval(), torch.randn(1, 3, 16, 16)
    key = preps._cache_key(preps._signature(model, x), ["fused", "channels_last"])
    path = preps.choice_cache_path()
    if isinstance(shape, bytes):
        path.write_bytes(shape)
    elif isinstance(shape, str) and shape.startswith("RAW"):
        path.write_text(shape[3:].replace('"K"', f'"{key}"'))
    else:
        path.write_text(json.dumps(shape).replace('"K"', f'"{key}"'))
    notes, calls = [], []
    _, prep = preps.choose_preparation(model, x, candidates=["fused", "channels_last"], log=notes.append,
                                       timer=fake_timer({"fused": 1.0, "channels_last": 3.0}, calls))
    assert prep.name == "fused" and len(calls) == 1  # measured again
    assert any(n.startswith("auto: ignoring") and str(path) in n for n in notes), notes
    assert json.loads(path.read_text())[key]["chosen"] == "fused"  # rewritten, valid
    notes.clear()
    preps.choose_preparation(model, x, candidates=["fused", "channels_last"], log=notes.append,
                             timer=fake_timer({"fused": 1.0, "channels_last": 3.0}, calls))
    assert len(calls) == 1 and not any("ignoring" in n for n in notes)  # the rewritten cache is used


def test_nan_in_cached_pretrained_weights_is_refused_by_sensitivity(cli, zoo_caches):
    hf_home, _ = zoo_caches
    state = random_state(timm.create_model("test_resnet.r160_in1k"))
    state["layer1.0.conv1.weight"].view(-1)[5] = float("nan")
    path = fill_hf_cache(hf_home, "timm/test_resnet.r160_in1k", state)
    result = cli("sensitivity", "timm:test_resnet.r160_in1k", "--pretrained", "--input-size", "3,32,32")
    assert result.exit_code == 1, result.output
    assert (f"The model timm:test_resnet.r160_in1k (weights from {path}) holds non-finite values (NaN or inf) in 1 "
            "tensor(s): layer1.0.conv1.weight (1 NaN, 0 inf of 9216)") in flat(result.output)


# -- silently accepted: empty values --------------------------------------------------------------

def _string_params():
    from bsconv_surgery.cli import bsconv_surgery

    root = click.Context(bsconv_surgery)
    for name in bsconv_surgery.list_commands(root):  # every command of the lazy table, not only those loaded
        command = bsconv_surgery.get_command(root, name)
        for param in command.params:
            if not isinstance(param.type, (click.types.IntParamType, click.types.FloatParamType, click.Choice,
                                           click.types.BoolParamType)):
                yield name, command, param


def test_every_path_or_name_option_takes_the_one_non_empty_type():
    from bsconv_surgery.cli.options import NonEmpty

    params = list(_string_params())
    assert len(params) > 40
    assert [f"{name} {p.name}" for name, _, p in params if not isinstance(p.type, NonEmpty)] == []


@pytest.mark.parametrize("name, param", [(n, p) for n, _, p in _string_params()],
                         ids=[f"{n}-{p.name}" for n, _, p in _string_params()])
def test_an_empty_value_is_an_error(cli, name, param):
    from bsconv_surgery.cli import bsconv_surgery

    command = bsconv_surgery.commands[name]
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    args = ["" if p is param else "x" for p in arguments if p.required or p is param]
    options = [param.opts[0], ""] if isinstance(param, click.Option) else []
    result = cli(name, *args, *options)
    assert result.exit_code == 2, result.output
    assert "an empty value is not allowed" in flat(result.output)


# -- the Python API: one validation, errors naming the argument ------------------------------------

def _small():
    return timm.create_model("test_resnet")


API_CASES = [
    ("convert-target-macs-huge", lambda: bs.convert(_small(), example_inputs=(3, 32, 32), target={"macs": 10**400}),
     "Bad target_macs 1000000"),
    ("convert-target-macs-inf", lambda: bs.convert(_small(), example_inputs=(3, 32, 32), target={"macs": float("inf")}),
     "Bad target_macs inf: not finite"),
    ("convert-target-params-text", lambda: bs.convert(_small(), example_inputs=(3, 32, 32), target={"params": "9" * 5000}),
     "too long"),
    ("convert-p-inf", lambda: bs.convert(_small(), "s", example_inputs=(3, 32, 32), p=float("inf")), "Bad p inf"),
    ("convert-min-mid-channels", lambda: bs.convert(_small(), "s", example_inputs=(3, 32, 32), min_mid_channels=4.5),
     "min_mid_channels must be a whole number in [1, 1048576], not 4.5"),
    ("convert-with-bn", lambda: bs.convert(_small(), "s", example_inputs=(3, 32, 32), with_bn="no"),
     "with_bn must be True or False, not 'no'"),
    ("convert-allow-growth", lambda: bs.convert(_small(), example_inputs=(3, 32, 32), allow_growth=1),
     "allow_growth must be True or False, not 1"),
    ("convert-recalibrate-bn", lambda: bs.convert(_small(), example_inputs=(3, 32, 32), recalibrate_bn="yes"),
     "recalibrate_bn must be True or False"),
    ("convert-input-size-huge", lambda: bs.convert(_small(), example_inputs=(3, 10**400, 32)), "Bad input size '3,1000"),
    ("sensitivity-input-size-refused", lambda: bs.measure_sensitivity(_small(), example_inputs="5,32,32"),
     "does not run on a 5x32x32 input"),
    ("options-with-bn", lambda: bs.SurgeryOptions.create("s", with_bn="false"), "with_bn must be True or False"),
    ("convert-calib-batches-huge", lambda: bs.convert(_small(), example_inputs=(3, 32, 32), calibration=bs.Dataset("random", limit=10**400)), "limit must be a whole number"),
    ("convert-calib-batches-fraction", lambda: bs.convert(_small(), example_inputs=(3, 32, 32), calibration=bs.Dataset("random", limit=2.5)), "not 2.5 (not a whole number)"),
    ("convert-num-classes-huge", lambda: bs.load_model("timm:test_resnet", num_classes=10**20),
     "Bad num_classes 100000000000000000000: expected a positive integer of at most 10,000,000"),
]
for _kw, _problem in [({"steps": 2.5}, "steps=2.5: input should be a valid integer"),
                      ({"steps": 10**30}, "steps=1000000000000000000000000000000: input should be less than"),
                      ({"lr": -1}, "lr=-1: input should be greater than 0"),
                      ({"lr": float("nan")}, "lr=nan: input should be a finite number"),
                      ({"lr": 1e300}, "lr=1e+300: input should be less than or equal to 1000000"),
                      ({"weight_decay": -1}, "weight_decay=-1: input should be greater than or equal to 0"),
                      ({"log_every": 0}, "log_every=0: input should be greater than or equal to 1"),
                      ({"temperature": -1}, "temperature=-1: input should be greater than 0"),
                      ({"feature_weight": -1}, "feature_weight=-1: input should be greater than or equal to 0"),
                      ({"stale_bn_momentum": 2}, "stale_bn_momentum=2: input should be less than or equal to 1")]:
    API_CASES.append((f"distill-{next(iter(_kw))}", lambda kw=_kw: bs.distill(
        _small(), _small(), [torch.randn(2, 3, 16, 16)], **{"steps": 1, **kw}), f"Bad argument(s) of distill(): {_problem}"))


@pytest.mark.parametrize("call, message", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_the_python_api_raises_a_clear_surgery_error(call, message):
    with pytest.raises(bs.SurgeryError) as error:
        call()
    assert message in str(error.value) and "\n" not in str(error.value)


def test_measure_sensitivity_takes_the_input_size_as_text_as_convert_does():
    as_text = bs.measure_sensitivity(_small(), example_inputs="3,32,32")
    assert as_text.input_size == (3, 32, 32) and len(as_text.rows) == 10


@pytest.mark.parametrize("key, argument, value", [
    ("distill.temperature", "temperature", -1), ("distill.temperature", "temperature", 0),
    ("distill.feature_weight", "feature_weight", -0.5), ("optimizer.lr", "lr", -1), ("optimizer.lr", "lr", 0),
    ("optimizer.lr", "lr", 1e300), ("optimizer.weight_decay", "weight_decay", -1),
    ("stale_bn_momentum", "stale_bn_momentum", 0), ("stale_bn_momentum", "stale_bn_momentum", 1.5),
    ("epochs", "steps", 0),
])
def test_the_recipe_and_distill_refuse_the_same_values(key, argument, value):
    """One validation (core/settings.py) behind the recipe schema and distill()'s arguments."""
    with pytest.raises(bs.SurgeryError, match=key.replace(".", r"\.")):
        recipe_from_dict(_nested_key(key, value))
    with pytest.raises(bs.SurgeryError, match=f"{argument}="):
        bs.distill(_small(), _small(), [torch.randn(2, 3, 16, 16)], **{"steps": 1, argument: value})


def _nested_key(key: str, value) -> dict:
    out: dict = {}
    node = out
    *parents, last = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return out


# -- data safety: replacing an output folder -------------------------------------------------------

class Killed(BaseException):
    """What kill -9 does to the code that would run next: nothing runs, not even ``except OSError``."""


def kill_at(monkeypatch, step: int, exchange: bool) -> None:
    """Raise ``Killed`` at the ``step``-th step of ``swap_in``: its renames, the exchange (refused
    when ``exchange`` is false: the fallback of other systems) and the removal of the old folder."""
    count = [0]

    def counted(real):
        def wrapper(*args, **kwargs):
            count[0] += 1
            if count[0] == step:
                raise Killed
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(files.os, "rename", counted(os.rename))
    monkeypatch.setattr(files, "exchange", counted(files.exchange if exchange else lambda a, b: False))
    monkeypatch.setattr(files, "_remove", counted(files._remove))


def folder(path: Path, text: str) -> Path:
    path.mkdir()
    for i in range(3):
        (path / f"f{i}").write_text(f"{text} {i}")
    return path


def beside(path: Path) -> list:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_this_system_swaps_folders_in_one_step(tmp_path):
    a, b = folder(tmp_path / "a", "A"), folder(tmp_path / "b", "B")
    assert files.exchange(a, b) and (a / "f0").read_text() == "B 0" and (b / "f0").read_text() == "A 0"


# (exchange, step killed before, what DIR holds then, what it holds once the next run recovered it)
SWAP_KILLS = [(True, 1, "old", "old"), (True, 2, "old", "old"), (True, 3, "new", "new"), (True, 4, "new", "new"),
              (False, 1, "old", "old"), (False, 2, "old", "old"), (False, 3, "old", "old"),
              (False, 4, None, "new"), (False, 5, "new", "new"), (False, 6, "new", "new")]


@pytest.mark.parametrize("exchange, step, now, after", SWAP_KILLS,
                         ids=[f"{'exchange' if c[0] else 'renames'}-step{c[1]}" for c in SWAP_KILLS])
def test_a_kill_at_any_step_of_a_replacement_leaves_the_old_or_the_new_folder(tmp_path, monkeypatch, exchange, step,
                                                                               now, after):
    target = folder(tmp_path / "out", "old")
    new = folder(tmp_path / ".out.tmp-1", "new")
    versions = {"old": snapshot(target), "new": snapshot(new), None: {}}
    with monkeypatch.context() as patch:
        kill_at(patch, step, exchange)
        try:
            files.swap_in(new, target)
        except Killed:
            pass
    assert (snapshot(target) if target.exists() else {}) == versions[now]
    left = [n for n in beside(target) if ".new-" in n or ".old-" in n]
    message = files.recover_swap(target)  # what the next run does first
    assert snapshot(target) == versions[after]
    assert [n for n in beside(target) if ".new-" in n or ".old-" in n] == [] and (message is None) == (left == [])
    if now is None:
        assert message == f"Recovered '{target}' after an interrupted replacement: the new version is in place."


def test_a_kill_between_the_renames_of_a_forced_convert_is_recovered_by_the_next_run(cli, tmp_path, monkeypatch):
    out = converted(cli, tmp_path / "c")
    with monkeypatch.context() as patch:
        kill_at(patch, 4, exchange=False)  # out renamed aside, the new one not yet in place
        with pytest.raises(Killed):  # click's runner passes a BaseException on, as the group does
            cli("convert", *SMALL, "--variant", "s", "--out", out, "--force")
    assert not out.exists() and [n.split("-")[0] for n in beside(out)] == [".c.new", ".c.old"]
    model = bs.load_converted(out)  # the next run: the finished new conversion is put in place
    assert model.options.variant == "s" and beside(out) == [] and leftovers(tmp_path) == []


def test_a_new_run_without_force_does_not_take_a_folder_a_kill_left_beside(cli, tmp_path, monkeypatch):
    """The rename fallback killed between its renames leaves no run folder: a plain train --out
    must find the recovered run (and refuse without --force), not start a new one over it."""
    out = tmp_path / "run"
    json_output(cli("train", *TINY, "--set", "epochs=1", "--out", out, "--json"))
    new = tmp_path / ".run.tmp-x"
    shutil.copytree(out, new)
    with monkeypatch.context() as patch:
        kill_at(patch, 4, exchange=False)
        with pytest.raises(Killed):
            files.swap_in(new, out)
    assert not out.exists()
    result = cli("train", *TINY, "--set", "epochs=1", "--out", out)
    assert result.exit_code == 1 and f"Run folder '{out}' already exists" in flat(result.output)
    assert checkpoint(out / "last.pt")["epoch"] == 1 and beside(out) == []


@pytest.mark.parametrize("where, holds", [("exchange", "old"), ("_remove", "new")])
def test_kill_9_while_a_forced_convert_replaces_its_folder(cli, tmp_path, where, holds):
    """A real SIGKILL just before the atomic exchange, and just after it: the folder holds the old
    or the new conversion, whole; the next run removes what was left beside it."""
    out = converted(cli, tmp_path / "c")
    old = snapshot(out)
    patch = (f"import bsconv_surgery.io.files as files\n"
             f"files.{where} = lambda *args: os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = child(patch, "convert", *SMALL, "--variant", "s", "--out", out, "--force")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert len(beside(out)) == 1
    if holds == "old":
        assert snapshot(out) == old
    else:
        assert snapshot(out) != old and json.loads((out / "surgery.json").read_text())["options"]["variant"] == "s"
        assert bs.load_converted(out).options.variant == "s"  # complete: its weights match the recorded hash
    result = cli("convert", *SMALL, "--out", out)
    assert result.exit_code == 1 and "already exists" in flat(result.output)  # the next run: clean up, then check
    assert beside(out) == []
