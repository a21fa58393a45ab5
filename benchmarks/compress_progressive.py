"""Progressive against one-shot conversion in ``compress``, at equal total distillation steps (issue 23, item 4).

Subjects (``recovery_data.py``): digits ResNet-20 and the trained MTCNN R-Net / O-Net. Each subject's
samples (digits: the train and validation images; MTCNN: the calibration and held-out windows) are
given to ``bs.compress`` as one pool; compress sets aside its own held-out split (20%, seed 0) and
every configuration sees the same split, the same sites (the budget's choice) and the same number
of distillation steps. Reported: held-out agreement with the original (the decision output) and KL
at the three points, and wall time (2 shared cores, one torch thread).

    python benchmarks/compress_progressive.py                       # digits-r20, mtcnn-rnet, mtcnn-onet
    python benchmarks/compress_progressive.py --subjects digits-r20 --stages 1,2,3 --steps 600

Writes ``benchmarks/results/compress_progressive.json`` and ``.md``. Never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recovery_data as rd  # noqa: E402

import bsconv_surgery as bs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def pool(subject) -> list:
    x = torch.cat([torch.cat(subject.calib), subject.eval_x]) if subject.name != "digits-r20" else None
    if subject.name == "digits-r20":
        from bsconv_surgery.data.datasets import build_datasets
        ds = build_datasets("digits", 16)
        raw = torch.cat([ds.train.images, ds.val.images])
        mean, std = ds.train.images.mean().item(), ds.train.images.std().item()
        x = (raw - mean) / std
        y = torch.cat([ds.train.labels, ds.val.labels])
        return bs.Labelled(list(zip(x.split(64), y.split(64))))
    return list(x.split(64))


def run(subject, stages: int, steps: int, macs: float) -> dict:
    t0 = time.perf_counter()
    result = bs.compress(subject.model, list(pool(subject)), target_macs=macs, steps=steps, progressive=stages,
                         example_inputs=subject.input_size, speed_check=False)
    out = {"stages": stages, "steps": steps, "macs": macs, "seconds": round(time.perf_counter() - t0, 1),
           "kept": result.kept, "sites": len(result.report.replaced),
           "macs_ratio": round(result.report.macs_after / result.report.macs_before, 4),
           "stage_sites": [len(s["sites"]) for s in result.stages]}
    for point, fid in result.fidelity.items():
        if fid is not None:
            out[point] = {"agree": fid["top1_agreement"], "kl": fid.get("kl_divergence"),
                          "rel_err": fid["relative_logit_error"], "acc": fid.get("top1_accuracy_converted")}
    print(json.dumps({subject.name: out}), flush=True)
    return out


def render(results: dict) -> str:
    lines = ["# compress: progressive against one-shot at equal steps", "",
             "Held-out agreement with the original (decision output) and KL; `compress` defaults otherwise.", "",
             "| subject | MACs | stages | steps | zero-shot | recalibrated | distilled | KL distilled | kept | time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    pct = lambda f: "n/a" if not f else f"{100 * f['agree']:.2f}%"  # noqa: E731
    for name, rows in results.items():
        for r in rows:
            kl = r.get("distilled", {}).get("kl")
            lines.append(f"| {name} | {r['macs_ratio']} | {r['stages']} ({'/'.join(map(str, r['stage_sites']))} sites) | "
                         f"{r['steps']} | {pct(r.get('zero_shot'))} | {pct(r.get('recalibrated'))} | "
                         f"{pct(r.get('distilled'))} | {'n/a' if kl is None else f'{kl:.2e}'} | {r['kept']} | "
                         f"{r['seconds']}s |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--subjects", default="digits-r20,mtcnn-rnet,mtcnn-onet")
    ap.add_argument("--stages", default="1,3")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--macs", type=float, default=0.75)
    ap.add_argument("--cache", type=Path, default=rd.REPO / "runs" / "recovery-cache")
    a = ap.parse_args()
    torch.set_num_threads(1)
    file = RESULTS / "compress_progressive.json"
    results = json.loads(file.read_text()) if file.is_file() else {}
    for name in a.subjects.split(","):
        subject = rd.digits_subject(None) if name == "digits-r20" else rd.mtcnn_subject(name.split("-")[1], a.cache)
        results[name] = [run(subject, int(k), a.steps, a.macs) for k in a.stages.split(",")]
        file.write_text(json.dumps(results, indent=1) + "\n")
        (RESULTS / "compress_progressive.md").write_text(render(results))


if __name__ == "__main__":
    main()
