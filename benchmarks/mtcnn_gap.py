"""Why the converted MTCNN nets stop at 92-95% held-out agreement (issue 23): data or architecture?

The student is the budgeted conversion at MACs <= 0.75 (``recovery_data.py`` subjects, --init svd,
sites by measured sensitivity), distilled for ``--steps`` steps (plain, batches of 64) on:

- ``train windows``: the subject's distillation stream (its calibration windows, random flips);
  agreement is measured on the held-out windows *and* on 1,024 of the training windows;
- ``held-out windows (oracle)``: the held-out windows themselves, to see whether the converted
  architecture can represent the original's decisions there at all;
- ``T=1`` and ``lr 1e-2``: the recipe's temperature and learning rate changed;
- ``+ fresh windows``: 5 x (200 random + 40 around each detected face) more windows per photo, cut
  from the same (mirrored, calibration) photos.

    python benchmarks/mtcnn_gap.py --nets pnet,rnet --steps 1200

Writes ``benchmarks/results/mtcnn_gap.{json,md}``. One torch thread; never part of the tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recovery_data as rd  # noqa: E402

import bsconv_surgery as bs  # noqa: E402
from bsconv_surgery.data.calibration import Batch  # noqa: E402
from bsconv_surgery.recovery.fidelity import ReferenceOutputs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def fresh_windows(size: int, seeds: int) -> torch.Tensor:
    """More random and face-centred windows of the mirrored (calibration) photos only."""
    from facenet_pytorch.models.mtcnn import ONet, PNet, RNet
    from facenet_pytorch.models.utils.detect_face import detect_face

    nets = [PNet().eval(), RNet().eval(), ONet().eval()]
    found = []
    for im in rd._photos().values():
        im = np.ascontiguousarray(im[:, ::-1])
        with torch.no_grad():
            boxes, _ = detect_face(im, 20, *nets, [0.3, 0.3, 0.3], 0.709, "cpu")
        found.append((im, boxes[0]))
    out = []
    for seed in range(10, 10 + seeds):
        rng = random.Random(seed)
        for im, boxes in found:
            out.append(rd._windows(im, None, 200, size, rng, jitter=False))
            if boxes is not None and len(boxes):
                out.append(rd._windows(im, boxes, 40, size, rng, jitter=True))
    return torch.cat(out)


def measure(which: str, steps: int, cache: Path) -> list:
    s = rd.mtcnn_subject(which, cache)
    start = bs.convert(copy.deepcopy(s.model), "u", init="svd", example_inputs=s.input_size, calibration=s.calib,
                       target={"macs": 0.75}).model
    held = ReferenceOutputs(s.model, [Batch((b,), None) for b in s.eval_x.split(256)], "held-out windows")
    train = ReferenceOutputs(s.model, [Batch((b,), None) for b in torch.cat(s.calib).split(256)], "training windows")
    extra = fresh_windows(s.input_size[-1], 5)
    runs = [("train windows", s.stream(1), {}), ("held-out windows (oracle)", rd.window_stream(s.eval_x, 1), {}),
            ("train windows, T=1", s.stream(1), {"temperature": 1.0}),
            ("train windows, lr 1e-2", s.stream(1), {"lr": 1e-2}),
            (f"train windows + {len(extra):,} fresh windows", rd.window_stream(torch.cat([s.pool, extra]), 1), {})]
    rows = []
    for name, batches, kw in runs:
        student = copy.deepcopy(start)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        bs.distill(student, s.model, batches, steps, log_every=steps, **kw)
        h, t = held.compare(student), train.compare(student)
        rows.append({"net": which, "run": name, "steps": steps, "held_out_agree": round(h["top1_agreement"], 4),
                     "train_agree": round(t["top1_agreement"], 4), "held_out_kl": round(h["kl_divergence"], 4),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default="pnet,rnet")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--cache", type=Path, default=rd.REPO / "runs" / "recovery-cache")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = [row for net in a.nets.split(",") for row in measure(net, a.steps, a.cache)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mtcnn_gap.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = ["# Why the converted MTCNN nets stop at 92-95%: `benchmarks/mtcnn_gap.py`", "",
             "Budgeted conversion at MACs <= 0.75, plain distillation; decision agreement with the original.", "",
             "| net | distilled on | steps | held-out agree | training-windows agree | held-out KL | s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['net']} | {r['run']} | {r['steps']} | {100 * r['held_out_agree']:.1f}% | "
              f"{100 * r['train_agree']:.1f}% | {r['held_out_kl']} | {r['seconds']} |" for r in rows]
    (RESULTS / "mtcnn_gap.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
