"""Fault injection: a full disk, a read-only folder and kill -9 in the middle of a save, against
convert --out, compare --csv and train. After each: what existed before is intact (byte for
byte), no temporary file is left, and a training run resumes to the weights of an uninterrupted
one. Real faults run in a subprocess (a file-size limit, SIGKILL); the rest are mocked where the
real thing needs privileges (tests may run as root, which writes to a chmod 0555 folder)."""

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bsconv_surgery.io.saving as saving
from bsconv_surgery.io import files

from .helpers import TINY, checkpoint, json_output, metrics

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["timm:test_resnet", "--input-size", "3,32,32"]


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` (hidden ones too) with its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list:
    """Temporary files and folders (``.NAME.tmp-*``, ``.NAME.old-*``, probes) under ``folder``."""
    return sorted(p.name for p in folder.rglob(".*") if ".tmp-" in p.name or ".old-" in p.name or "probe" in p.name)


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
