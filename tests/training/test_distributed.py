"""Two processes under torchrun (gloo on CPU): DistributedDataParallel, reduced metrics, rank-0 files."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from ..helpers import TINY_S, checkpoint, metrics


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_torchrun_two_processes_train_with_ddp_and_only_rank_0_writes(tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "bsconv_surgery", "train", *TINY_S, "--out", str(out), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]

    summary = json.loads(proc.stdout)  # one JSON object: rank 1 prints nothing
    assert summary["processes"] == 2 and summary["epochs_done"] == 2
    assert proc.stderr.count("epoch 1/2 ") == 1  # and logs nothing

    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl", "recipe.yaml"]
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]  # one writer
    assert all(r["train_samples"] == 2 * 3 * 16 for r in rows)  # summed over both ranks
    assert all(r["val_samples"] == 360 for r in rows)  # every validation image once, across ranks
    assert "train_reg" in rows[0]  # the regulariser reaches the BSConv-S sites through DDP

    last = checkpoint(out / "last.pt")
    assert (last["epoch"], last["world_size"], len(last["rng"])) == (2, 2, 2)
    assert not any(k.startswith("module.") for k in last["model"])  # the bare model, loadable without DDP
    assert not torch.equal(last["rng"][0]["torch"], last["rng"][1]["torch"])  # each rank's own RNG state
