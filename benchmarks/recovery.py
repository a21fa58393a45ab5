"""Keeping a trained model's accuracy, measured on real trained weights (issue 15).

Subjects (``recovery_data.py``): ``digits-r20`` (cifar_resnet20 trained here on digits for 40 epochs)
and ``mtcnn-pnet`` / ``mtcnn-rnet`` / ``mtcnn-onet`` (facenet-pytorch's trained MTCNN nets; the
``mtcnn`` extra). Everything goes through the package's Python API: ``measure_sensitivity``,
``convert(..., target={"macs": ...}, calibration=..., recalibrate_bn=...)``, ``recalibrate_batchnorm`` and
``distill``. Parts:

- ``sensitivity``: every site converted alone (``--init svd``), measured on the calibration batches
  and on the held-out set; the plot goes to ``docs/sensitivity-<subject>.png``.
- ``budget``: at ``--target-macs`` 0.5 and 0.75 (and ``--target-params`` 0.5), the set chosen by
  measured sensitivity, the set chosen by filter energy (no calibration data) and the same budget
  reached by converting sites in network order, each measured on the held-out set (zero-shot, and
  after BatchNorm recalibration where the net has BatchNorms).
- ``recalibration``: every conv but the first converted, before and after ``recalibrate_batchnorm``.
- ``distill``: every conv but the first converted to BSConv-U, then label-free distillation from
  the original (batches of 64 unlabelled inputs, AdamW one-cycle); ``--init svd`` against
  ``--init default``, output-only against output + site-level features, learning rates,
  temperature, and the scale of the svd factors. Curves go to ``docs/recovery-<subject>.png``.
- ``budget-distill``: the conversion at ``--fractions`` (MACs budgets, default 0.75) chosen by measured
  sensitivity, BatchNorms recalibrated, then each method of ``METHODS`` (``plain``, ``function
  matching`` and its ablations; add rows for other recipes) distilling it: a separate run with its
  full schedule for each of ``--step-counts``, scored on the held-out sets.

    python benchmarks/recovery.py                                  # every subject and part (~45 min on 2 cores)
    python benchmarks/recovery.py --subjects digits-r20 --parts distill --runs svd,default
    python benchmarks/recovery.py --subjects mtcnn-pnet --parts budget-distill --methods "plain,function matching"
    python benchmarks/recovery.py --from-json                      # re-render the markdown

Writes ``benchmarks/results/recovery.json`` (subjects run separately are merged into it) and
``benchmarks/results/recovery.md``. One torch thread; wall times depend on the machine and its
load. Never part of the tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, List, Optional

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recovery_data as rd  # noqa: E402

import bsconv_surgery as bs  # noqa: E402
from bsconv_surgery.data.calibration import Batch  # noqa: E402
from bsconv_surgery.recovery.augment import augmentation_for  # noqa: E402
from bsconv_surgery.recovery.fidelity import ReferenceOutputs  # noqa: E402
from bsconv_surgery.io.files import atomic_file  # noqa: E402
from bsconv_surgery.io.plots import new_figure, save_figure  # noqa: E402
from bsconv_surgery.core.options import SurgeryOptions  # noqa: E402
from bsconv_surgery.recovery.sensitivity import measure_sensitivity, plan_sites, swapped_in, write_sensitivity_plot  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DOCS = Path(__file__).resolve().parents[1] / "docs"
SUBJECTS = ["digits-r20", "mtcnn-pnet", "mtcnn-rnet", "mtcnn-onet"]
PARTS = ["sensitivity", "budget", "recalibration", "distill", "budget-distill"]

#: Distillation runs: name -> settings (init, lr, temperature, features, scale of the svd factors).
RUNS: Dict[str, Dict[str, Any]] = {
    "svd": {"init": "svd"},
    "default": {"init": "default"},
    "svd+features": {"init": "svd", "features": True},
    "default+features": {"init": "default", "features": True},
    "svd lr1e-3": {"init": "svd", "lr": 1e-3},
    "default lr1e-3": {"init": "default", "lr": 1e-3},
    "svd lr3e-4": {"init": "svd", "lr": 3e-4},
    "default lr3e-4": {"init": "default", "lr": 3e-4},
    "svd lr1e-2": {"init": "svd", "lr": 1e-2},
    "default lr1e-2": {"init": "default", "lr": 1e-2},
    "svd T1": {"init": "svd", "temperature": 1.0},
    "default T1": {"init": "default", "temperature": 1.0},
    "svd x10": {"init": "svd", "scale": 10.0},
    "svd rms": {"init": "svd", "scale": "rms"},
    "svd bn-momentum-0 unguarded": {"init": "svd", "bn_momentum": 0.0, "guard": False},
    "svd bn-momentum-0 guarded": {"init": "svd", "bn_momentum": 0.0},
}
#: Distillation of a budgeted conversion (part ``budget-distill``): name -> keywords of ``distill``
#: (a dict, or a function of the subject returning one). Add rows here (progressive, compress).
METHODS: Dict[str, Any] = {
    "plain": {"method": "plain"},
    "function matching": {"method": "function_matching"},
    "fm no mixup": {"method": "function_matching", "mixup": 0},
    "fm no ema": {"method": "function_matching", "ema": 0},
    "fm no flip": lambda s: {"method": "function_matching", "augment": augmentation_for(s.input_size, flip=False)},
}
#: Rows that run ``bs.compress`` end to end on the subject's training pool (its own split, sensitivity,
#: conversion, recalibration kept only where it helps, distillation) instead of distilling the shared
#: budgeted conversion: name -> keywords of ``compress``. The held-out sets stay the benchmark's own.
COMPRESS_ROWS: Dict[str, Dict[str, Any]] = {
    "compress (default)": {},
    "compress 3 stages": {"progressive": 3},
}
DEFAULT_METHODS = {
    "digits-r20": list(METHODS) + list(COMPRESS_ROWS),
    "mtcnn-onet": ["plain", "function matching"] + list(COMPRESS_ROWS),
    "mtcnn-rnet": ["plain", "function matching", "fm no mixup", "fm no ema"] + list(COMPRESS_ROWS),
    "mtcnn-pnet": ["plain", "function matching", "fm no mixup", "fm no ema"] + list(COMPRESS_ROWS),
}
DEFAULT_RUNS = {
    "digits-r20": list(RUNS),
    "mtcnn-onet": ["svd", "default", "svd+features", "svd T1"],
    "mtcnn-rnet": ["svd", "default", "svd+features"],
    "mtcnn-pnet": ["svd", "default", "svd+features"],
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- measuring --------------------------------------------------------------------------------------

class Evaluator:
    """The original's outputs on the held-out sets, computed once; ``__call__`` scores a model."""

    def __init__(self, subject: rd.Subject):
        self.s = subject
        x, y = subject.eval_x, subject.eval_y
        self.sets = {"held-out": ReferenceOutputs(subject.model, [Batch((b,), None if y is None else yb)
                                                                   for b, yb in zip(x.split(256), (y.split(256) if y is not None else [None] * math.ceil(len(x) / 256)))],
                                                   "held-out")}
        for name, (ex, ey) in subject.extra.items():
            self.sets[name] = ReferenceOutputs(subject.model, [Batch((b,), yb) for b, yb in zip(ex.split(512), ey.split(512))], name)
        if not subject.classifier:
            with torch.no_grad():
                self.ref_prob = self._prob(subject.model)

    def _prob(self, model) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model(b)[-1].reshape(len(b), 2, -1)[:, 1, 0] for b in self.s.eval_x.split(256)])

    def __call__(self, model) -> Dict[str, Any]:
        model.eval()
        out: Dict[str, Any] = {}
        for name, ref in self.sets.items():
            fid = ref.compare(model)
            prefix = "" if name == "held-out" else f"{name} "
            out[prefix + "rel_err"] = fid["relative_logit_error"]
            out[prefix + "agree"] = fid["top1_agreement"]
            out[prefix + "kl"] = fid["kl_divergence"]
            if "top1_accuracy_converted" in fid:
                out[prefix + "acc"] = fid["top1_accuracy_converted"]
        if not self.s.classifier:
            pa, pb = self.ref_prob > self.s.threshold, self._prob(model) > self.s.threshold
            tpr = float((pb & pa).sum() / pa.sum().clamp_min(1))
            tnr = float((~pb & ~pa).sum() / (~pa).sum().clamp_min(1))
            out.update({"bal_agree": (tpr + tnr) / 2, "pos_agree": tpr, "neg_agree": tnr,
                        "decision_agree": float((pa == pb).float().mean())})
        return out

    def original(self) -> Dict[str, Any]:
        return self(self.s.model)


def _r(v):
    return round(v, 6) if isinstance(v, float) else v


def rounded(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: _r(v) for k, v in d.items()}


def has_bn(model) -> bool:
    return bool(bs.recovery.recalibration.batchnorms(model))


# -- parts ------------------------------------------------------------------------------------------

def part_sensitivity(s: rd.Subject, ev: Evaluator) -> Dict[str, Any]:
    opts = SurgeryOptions.create("u", init="svd")
    plan = plan_sites(s.model, opts, s.input_size)
    t0 = time.perf_counter()
    label = f"{sum(len(b) for b in s.calib)} calibration inputs"
    sens = measure_sensitivity(s.model, s.calib, options=opts, plan=plan)
    seconds = time.perf_counter() - t0
    sens.model, sens.calib = s.name, label
    write_sensitivity_plot(sens, DOCS / f"sensitivity-{s.name}.png", force=True)
    sites = plan.by_name()
    rows = []
    for r in sens.rows:
        with swapped_in(s.model, [sites[r.name]]):
            held = ev(s.model)
        rows.append({"site": r.name, "macs_saved": r.macs_saved, "params_saved": r.params_saved,
                     "energy_kept": _r(r.energy_kept), "calib_loss": _r(r.loss),
                     "calib_rel_err": _r(r.fidelity["relative_logit_error"]),
                     "calib_agree": _r(r.fidelity["top1_agreement"]), "loss_per_mmac": _r(r.loss_per_mac)
                     if r.loss_per_mac is not None and not math.isinf(r.loss_per_mac) else None,
                     "held_out": rounded(held)})
    out = {"rows": rows, "seconds": round(seconds, 2), "sites": len(rows), "loss": sens.loss,
           "calib_samples": sum(len(b) for b in s.calib), "plot": f"docs/sensitivity-{s.name}.png"}
    if has_bn(s.model):
        t0 = time.perf_counter()
        recal = measure_sensitivity(s.model, s.calib, options=opts, plan=plan, recalibrate_bn=True)
        out["recalibrated"] = {"seconds": round(time.perf_counter() - t0, 2),
                               "losses": {r.name: _r(r.loss) for r in recal.rows},
                               "baseline_rel_err": _r(recal.baseline["relative_logit_error"]) if recal.baseline else None}
    log(f"{s.name}: sensitivity of {len(rows)} sites in {seconds:.1f}s")
    return out


def _order_sites(s: rd.Subject, metric: str, fraction: float) -> Optional[List[str]]:
    plan = plan_sites(s.model, SurgeryOptions.create("u", init="svd"), s.input_size)
    total = plan.macs_before if metric == "macs" else plan.params_before
    need, got, chosen = total * (1 - fraction), 0, []
    for site in plan.sites:
        if got >= need:
            break
        saved = site.macs_saved if metric == "macs" else site.params_saved
        if saved > 0:
            chosen.append(site.name)
            got += saved
    return chosen if got >= need else None


def _measure_set(s: rd.Subject, ev: Evaluator, result, extra: Dict[str, Any]) -> Dict[str, Any]:
    rep = result.report
    row = {"sites": [r.name for r in rep.replaced], "n": len(rep.replaced),
           "macs_ratio": _r(rep.macs_after / rep.macs_before), "params_ratio": _r(rep.params_after / rep.params_before),
           "zero_shot": rounded(ev(result.model)), **extra}
    if has_bn(result.model):
        recal = copy.deepcopy(result.model)
        bs.recalibrate_batchnorm(recal, s.calib)
        row["recalibrated"] = rounded(ev(recal))
    return row


def part_budget(s: rd.Subject, ev: Evaluator) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for metric, fraction in (("macs", 0.5), ("macs", 0.75), ("params", 0.5)):
        key = f"{metric}<={fraction}"
        rows: Dict[str, Any] = {}
        kw = {"target": {metric: fraction}}
        try:
            t0 = time.perf_counter()
            res = bs.convert(copy.deepcopy(s.model), "u", init="svd", example_inputs=s.input_size, calibration=s.calib, **kw)
            sel = res.report.selection
            rows["sensitivity"] = _measure_set(s, ev, res, {"predicted_loss": _r(sel["predicted_loss"]),
                                                            "measured_calib_loss": _r(sel["measured_loss"]),
                                                            "seconds": round(time.perf_counter() - t0, 2)})
        except bs.SurgeryError as exc:
            out[key] = {"unreachable": str(exc)}
            log(f"{s.name} {key}: {exc}")
            continue
        if has_bn(s.model):
            res = bs.convert(copy.deepcopy(s.model), "u", init="svd", example_inputs=s.input_size, calibration=s.calib,
                             recalibrate_bn=True, **kw)
            rows["sensitivity after recalibration"] = _measure_set(s, ev, res, {
                "recalibration_kept": res.report.recalibration["kept"]})
        # the earlier loss, for comparison: each site's relative output error on the calibration batches
        res = bs.convert(copy.deepcopy(s.model), "u", init="svd", example_inputs=s.input_size, calibration=s.calib,
                         metric="relative-error", **kw)
        rows["relative error (earlier loss)"] = _measure_set(s, ev, res, {})
        if has_bn(s.model):
            res = bs.convert(copy.deepcopy(s.model), "u", init="svd", example_inputs=s.input_size, calibration=s.calib,
                             recalibrate_bn=True, metric="relative-error", **kw)
            rows["relative error after recalibration"] = _measure_set(s, ev, res, {
                "recalibration_kept": res.report.recalibration["kept"]})
        res = bs.convert(copy.deepcopy(s.model), "u", init="svd", example_inputs=s.input_size, **kw)
        rows["filter energy (no calib)"] = _measure_set(s, ev, res, {})
        order = _order_sites(s, metric, fraction)
        res = bs.convert(copy.deepcopy(s.model), "u", init="svd", example_inputs=s.input_size, sites=order)
        rows["network order"] = _measure_set(s, ev, res, {})
        out[key] = rows
        log(f"{s.name} {key}: " + ", ".join(f"{k}: agree {v['zero_shot']['agree']:.3f}" for k, v in rows.items()))
    return out


def part_recalibration(s: rd.Subject, ev: Evaluator) -> Dict[str, Any]:
    if not has_bn(s.model):
        return {"note": "no BatchNorm in this network: nothing to recalibrate"}
    res = bs.convert(copy.deepcopy(s.model), "u", init="svd", example_inputs=s.input_size, exclude=[s.first], count=False)
    before = ev(res.model)
    t0 = time.perf_counter()
    done = bs.recalibrate_batchnorm(res.model, s.calib)
    return {"conversion": f"every conv but {s.first}", "sites": len(res.report.replaced), "before": rounded(before),
            "after": rounded(ev(res.model)), "batchnorms": done.batchnorms, "samples": done.samples,
            "seconds": round(time.perf_counter() - t0, 3)}


def _student(s: rd.Subject, cfg: Dict[str, Any], seed: int):
    torch.manual_seed(seed)
    res = bs.convert(copy.deepcopy(s.model), "u", init=cfg.get("init", "svd"), example_inputs=s.input_size,
                     exclude=[s.first], count=False)
    student, scale = res.model, cfg.get("scale")
    if scale is not None:
        torch.manual_seed(seed)
        fresh = bs.convert(copy.deepcopy(s.model), "u", init="default", example_inputs=s.input_size, exclude=[s.first],
                           count=False).model
        with torch.no_grad():
            for name, m in student.named_modules():
                if isinstance(m, bs.BSConvU):
                    f = fresh.get_submodule(name)
                    for a, b in ((m.pw.weight, f.pw.weight), (m.dw.weight, f.dw.weight)):
                        a.mul_(scale if scale != "rms" else b.square().mean().sqrt() / a.square().mean().sqrt())
        bs.recalibrate_batchnorm(student, s.calib)  # the function is the same once the BatchNorms follow
    if "bn_momentum" in cfg:  # as some ported models ship: running statistics frozen in training
        for m in student.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = cfg["bn_momentum"]
    return student, res.report


def part_distill(s: rd.Subject, ev: Evaluator, runs: List[str], steps: int, seed: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    orig = ev.original()
    key = "acc" if s.classifier else "bal_agree"
    for name in runs:
        cfg = RUNS[name]
        student, report = _student(s, cfg, seed)
        features = bs.recovery.distill.site_outputs(report) if cfg.get("features") else False
        t0 = time.perf_counter()
        result = bs.distill(student, s.model, s.stream(seed + 1), steps, lr=cfg.get("lr", 3e-3),
                            temperature=cfg.get("temperature", 4.0), features=features, evaluate=ev, log_every=50,
                            stale_bn_momentum=0.1 if cfg.get("guard", True) else None)
        wall = time.perf_counter() - t0
        hist = [rounded({k: v for k, v in h.items() if k != "warning"}) for h in result.history]
        target = orig.get(key, 1.0) - (0.005 if s.classifier else 0.02)
        hit = next((h["step"] for h in hist if h.get(key, 0) >= target), None)
        out[name] = {"config": cfg, "steps": steps, "wall_seconds": round(wall, 1), "start": hist[0], "final": hist[-1],
                     "first_step_within_target": hit, "target": f"{key} >= {target:.4f}", "history": hist}
        f = hist[-1]
        log(f"{s.name} distill {name}: {key} {hist[0].get(key, 0):.4f} -> {f.get(key, 0):.4f}, agree {f['agree']:.4f}, "
            f"kl {f['kl']:.4f}, hit@{hit}, {wall:.0f}s")
    return out


def _budget_student(s: rd.Subject, ev: Evaluator, fraction: float):
    """The budgeted conversion at MACs <= ``fraction`` (BatchNorms recalibrated where the net has
    them) and its row: sites, ratios, zero-shot and recalibrated fidelity."""
    t0 = time.perf_counter()
    res = bs.convert(copy.deepcopy(s.model), "u", init="svd", example_inputs=s.input_size, calibration=s.calib,
                     target={"macs": fraction})
    row = _measure_set(s, ev, res, {"convert_seconds": round(time.perf_counter() - t0, 2)})
    if has_bn(res.model):
        bs.recalibrate_batchnorm(res.model, s.calib)
    return res.model, row


def _compress_row(s: rd.Subject, ev: Evaluator, fraction: float, steps: int, seed: int,
                  keywords: Dict[str, Any]) -> Dict[str, Any]:
    """``bs.compress`` on the subject's training pool (batches of 64, no labels), scored on the
    benchmark's held-out sets; ``points``: compress's own held-out agreement at its three points."""
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    result = bs.compress(copy.deepcopy(s.model), list(s.pool.split(64)), target_macs=fraction, steps=steps,
                         example_inputs=s.input_size, speed_check=False, seed=seed, **keywords)
    wall = time.perf_counter() - t0
    rep = result.report
    return {"wall_seconds": round(wall, 1), "kept": result.kept, "sites": len(rep.replaced),
            "macs_ratio": _r(rep.macs_after / rep.macs_before),
            "points": {k: _r(v["top1_agreement"]) for k, v in result.fidelity.items() if v is not None},
            **rounded(ev(result.model))}


def part_budget_distill(s: rd.Subject, ev: Evaluator, methods: List[str], steps_list: List[int],
                        fractions: List[float], seed: int, done: Dict[str, Any]) -> None:
    """Each method of ``METHODS`` distilling the budgeted conversion, a separate run with its full
    schedule per step count; the final model scored on the held-out sets. Fills ``done`` in place."""
    key = "acc" if s.classifier else "bal_agree"
    for fraction in fractions:
        try:
            start, row = _budget_student(s, ev, fraction)
        except bs.SurgeryError as exc:
            done[f"macs<={fraction}"] = {"unreachable": str(exc)}
            log(f"{s.name} MACs<={fraction}: {exc}")
            continue
        entry = done.setdefault(f"macs<={fraction}", {})
        entry["conversion"] = row
        runs = entry.setdefault("runs", {})
        for name in methods:
            if name in COMPRESS_ROWS:
                for steps in steps_list:
                    runs.setdefault(name, {})[str(steps)] = _compress_row(s, ev, fraction, steps, seed, COMPRESS_ROWS[name])
                    log(f"{s.name} MACs<={fraction} {name} {steps} steps: {runs[name][str(steps)]}")
                    yield
                continue
            kw = METHODS[name](s) if callable(METHODS[name]) else dict(METHODS[name])
            for steps in steps_list:
                student = copy.deepcopy(start)
                torch.manual_seed(seed)
                t0 = time.perf_counter()
                result = bs.distill(student, s.model, s.stream(seed + 1), steps, log_every=steps, **kw)
                wall = time.perf_counter() - t0
                scores = rounded(ev(student))
                runs.setdefault(name, {})[str(steps)] = {"wall_seconds": round(wall, 1), "settings": result.settings,
                                                         "final_loss": _r(result.final_loss), **scores}
                log(f"{s.name} MACs<={fraction} {name} {steps} steps: {key} {scores.get(key, 0):.4f}, agree "
                    f"{scores['agree']:.4f}, kl {scores['kl']:.4f}, {wall:.0f}s")
                yield


def plot_distill(name: str, data: Dict[str, Any], metric: str, path: Path, original: float) -> None:
    fig = new_figure(7, 4.2)
    ax = fig.add_subplot()
    for i, (run, r) in enumerate(data.items()):
        steps = [h["step"] for h in r["history"]]
        ax.plot(steps, [h.get(metric) for h in r["history"]], label=run, color=f"C{i % 10}",
                linestyle="-" if "default" not in run else "--", linewidth=1.4)
    ax.axhline(original, color="k", linewidth=0.8, linestyle=":", label="original")
    ax.set_xlabel("distillation steps (batches of 64, no labels)")
    ax.set_ylabel(metric)
    lo = min(min(h.get(metric, 1) for h in r["history"][1:]) for r in data.values())
    ax.set_ylim(max(0.0, lo - 0.02), 1.005)
    ax.set_title(f"{name}: every conv but the first -> BSConv-U, label-free distillation", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    save_figure(fig, path, force=True)


# -- files ------------------------------------------------------------------------------------------

def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _f(v, d=3) -> str:
    return "n/a" if v is None else f"{v:.{d}g}"


def render(results: Dict[str, Any]) -> str:
    lines = ["# Keeping a trained model's accuracy: measured", "",
             "Written by `benchmarks/recovery.py` (see its docstring and `recovery_data.py` for the subjects and data). "
             "`rel_err`: relative error of all outputs vs the original; `agree`: top-1 / decision agreement with the "
             "original; `acc`: held-out accuracy (digits); `bal`: balanced face/non-face agreement at the stage "
             "threshold (MTCNN: mean of the agreement on the original's positives and negatives).", ""]
    meta = results.get("_meta", {})
    if meta:
        lines += [f"Machine: {meta.get('machine')}; torch {meta.get('torch')}; threads {meta.get('threads')}.", ""]
    for name in SUBJECTS:
        r = results.get(name)
        if not r:
            continue
        key = "acc" if name.startswith("digits") else "bal_agree"
        lines += [f"## {name}", "", r.get("note", ""), "",
                  f"Original on the held-out set: {', '.join(f'{k} {_f(v, 4)}' for k, v in r['original'].items() if k in ('acc', 'agree', 'bal_agree', 'val+shifts acc'))}.", ""]
        sens = r.get("sensitivity")
        if sens:
            rows = sens["rows"]
            recal = (sens.get("recalibrated") or {}).get("losses", {})
            lines += [f"### Sensitivity (each site alone, --init svd; {sens['calib_samples']} calibration inputs, "
                      f"{sens['seconds']} s for {sens['sites']} sites)", "",
                      f"Loss: {sens.get('loss', 'relative output error')}.", "",
                      "| rank | site | MACs saved | params saved | energy kept | calib loss | calib rel_err | loss / MMAC | "
                      + ("calib loss after BN recal | " if recal else "") + f"held-out {key} | held-out agree |",
                      "|---|---|---|---|---|---|---|---|" + ("---|" if recal else "") + "---|---|"]
            show = list(enumerate(rows, 1))
            if len(show) > 10:
                show = show[:5] + show[-5:]
            for i, row in show:
                h = row["held_out"]
                lines.append(f"| {i} | {row['site']} | {row['macs_saved']:,} | {row['params_saved']:,} | "
                             f"{_f(row['energy_kept'])} | {_f(row.get('calib_loss', row['calib_rel_err']))} | "
                             f"{_f(row['calib_rel_err'])} | {_f(row['loss_per_mmac'])} | "
                             + (f"{_f(recal.get(row['site']))} | " if recal else "")
                             + f"{_pct(h.get(key))} | {_pct(h.get('agree'))} |")
            lines += ["", f"Plot: `{sens['plot']}`.", ""]
        bud = r.get("budget")
        if bud:
            lines += ["### Budgets (held-out, zero-shot; after BatchNorm recalibration where the net has BatchNorms)", "",
                      "| budget | chosen by | sites | MACs | params | rel_err | agree | " + key + " | after BN recal: agree | " + key + " |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for bk, rows in bud.items():
                if "unreachable" in rows:
                    lines.append(f"| {bk} | unreachable | | | | | | | | |")
                    continue
                for strat, row in rows.items():
                    z, c = row["zero_shot"], row.get("recalibrated") or {}
                    lines.append(f"| {bk} | {strat} | {row['n']} | {row['macs_ratio']:.3f} | {row['params_ratio']:.3f} | "
                                 f"{_f(z['rel_err'])} | {_pct(z['agree'])} | {_pct(z.get(key))} | {_pct(c.get('agree'))} | "
                                 f"{_pct(c.get(key))} |")
            notes = [f"- {bk}: {rows['unreachable']}" for bk, rows in bud.items() if "unreachable" in rows]
            if any("sensitivity after recalibration" in rows for rows in bud.values()):
                notes.append("- sensitivity after recalibration: `convert(..., recalibrate_bn=True)` (`--recalibrate-bn`), "
                             "which ranks the sites by their loss after per-site recalibration and recalibrates the "
                             "result (kept only where it lowers the calibration loss), so its first columns are already "
                             "after recalibration.")
            if any("relative error (earlier loss)" in rows for rows in bud.values()):
                notes.append("- relative error (earlier loss): the same, with each site ranked by its relative output "
                             "error (`metric=\"relative-error\"`, the loss before issue 23) instead of the decision-aware "
                             "default.")
            lines += [""] + notes + ([""] if notes else [])
        rec = r.get("recalibration")
        if rec:
            if "note" in rec:
                lines += ["### BatchNorm recalibration", "", rec["note"] + ".", ""]
            else:
                b, a = rec["before"], rec["after"]
                lines += ["### BatchNorm recalibration", "",
                          f"{rec['conversion']} ({rec['sites']} sites), {rec['batchnorms']} BatchNorms re-estimated on "
                          f"{rec['samples']} inputs in {rec['seconds']} s:", "",
                          "| | rel_err | agree | acc | val+shifts acc |", "|---|---|---|---|---|",
                          f"| before | {_f(b['rel_err'])} | {_pct(b['agree'])} | {_pct(b.get('acc'))} | {_pct(b.get('val+shifts acc'))} |",
                          f"| after | {_f(a['rel_err'])} | {_pct(a['agree'])} | {_pct(a.get('acc'))} | {_pct(a.get('val+shifts acc'))} |", ""]
        dist = r.get("distill")
        if dist:
            extra = "val+shifts agree" if name.startswith("digits") else "pos_agree"
            lines += ["### Label-free distillation (every conv but the first -> BSConv-U; held-out)", "",
                      f"| run | start {key} | {key} @50 | @100 | final {key} | final agree | final {extra} | final KL | "
                      "first step within target | steps | wall s |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for run, d in dist.items():
                h = {x["step"]: x for x in d["history"]}
                f = d["final"]
                lines.append(f"| {run} | {_pct(d['start'].get(key))} | {_pct(h.get(50, {}).get(key))} | "
                             f"{_pct(h.get(100, {}).get(key))} | {_pct(f.get(key))} | {_pct(f.get('agree'))} | "
                             f"{_pct(f.get(extra))} | {_f(f.get('kl'))} | {d['first_step_within_target'] or 'never'} | {d['steps']} | "
                             f"{d['wall_seconds']} |")
            margin = "0.5 point" if name.startswith("digits") else "2 points"
            lines += ["", f"First step within target: the first evaluation (every 50 steps) with "
                      f"{next(iter(dist.values()))['target']} (the original's minus {margin}; never: not within "
                      f"{next(iter(dist.values()))['steps']} steps). Wall times: this shared machine under varying "
                      f"load, indicative only. Plot: `docs/recovery-{name}.png`.", ""]
        lines += _render_budget_distill(name, r.get("budget_distill"), key)
    return "\n".join(lines) + "\n"


def _render_budget_distill(name: str, data: Optional[Dict[str, Any]], key: str) -> List[str]:
    if not data:
        return []
    extra = "val+shifts acc" if name.startswith("digits") else "pos_agree"
    lines = ["### Distilling a budgeted conversion: plain, function matching, and `compress` (held-out)", "",
             f"Each cell: `agree` / `{key}` after a separate run of that many steps (its own full one-cycle "
             f"schedule, batches of 64, seed 0). KL, {extra} and wall seconds (one torch thread, loaded shared "
             "machine) of the longest run. `compress` rows: `bs.compress` end to end on the training pool (its own "
             "sensitivity, conversion, recalibration kept only where it helps, 20% of the pool set aside), scored on "
             "the same held-out sets; their sites and MACs are listed under the table.", ""]
    for budget, entry in data.items():
        if "unreachable" in entry:
            lines += [f"**MACs {budget[4:]}**: unreachable ({entry['unreachable']})", ""]
            continue
        conv = entry["conversion"]
        z, c = conv["zero_shot"], conv.get("recalibrated") or conv["zero_shot"]
        lines += [f"**MACs {budget[4:]}**: {conv['n']} site(s) ({', '.join(conv['sites'][:6])}"
                  f"{', ...' if conv['n'] > 6 else ''}), MACs {conv['macs_ratio']:.3f}, params {conv['params_ratio']:.3f}; "
                  f"zero-shot agree {_pct(z['agree'])} / {key} {_pct(z.get(key))}"
                  + (f", after BN recalibration {_pct(c['agree'])} / {_pct(c.get(key))} (the distillation start)"
                     if conv.get("recalibrated") else "") + ".", ""]
        runs = entry.get("runs", {})
        counts = sorted({int(n) for r in runs.values() for n in r})
        lines += ["| method | " + " | ".join(f"{n} steps" for n in counts) + f" | KL | {extra} | wall s |",
                  "|---|" + "---|" * (len(counts) + 3)]
        for method, r in runs.items():
            cells = [f"{_pct(r[str(n)]['agree'])} / {_pct(r[str(n)].get(key))}" if str(n) in r else "" for n in counts]
            last = r[str(max(int(n) for n in r))]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {_f(last.get('kl'))} | {_pct(last.get(extra))} | "
                         f"{last['wall_seconds']} |")
        lines.append("")
        for method, r in runs.items():
            last = r[str(max(int(n) for n in r))]
            if "points" in last:
                points = ", ".join(f"{k.replace('_', '-')} {_pct(v)}" for k, v in last["points"].items())
                lines += [f"- {method}: {last['sites']} site(s), MACs {last['macs_ratio']:.3f}; on its own held-out "
                          f"20%: {points}; kept: {last['kept']}."]
        lines.append("")
    return lines


def write(results: Dict[str, Any], mine: Optional[List[str]] = None) -> None:
    """Write the JSON and markdown; ``mine``: the subjects this process measured (merged into what
    another process may have written meanwhile)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    file = RESULTS / "recovery.json"
    if mine is not None and file.is_file():
        merged = json.loads(file.read_text())
        merged.update({k: results[k] for k in mine + ["_meta"] if k in results})
        results = merged
    with atomic_file(file) as tmp:
        tmp.write_text(json.dumps(results, indent=1))
    with atomic_file(RESULTS / "recovery.md") as tmp:
        tmp.write_text(render(results))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subjects", default=",".join(SUBJECTS))
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--runs", default=None, help="distillation runs (comma-separated names of RUNS); default per subject")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--methods", default=None, help="budget-distill: comma-separated names of METHODS; default per subject")
    ap.add_argument("--step-counts", default="150,300,600", help="budget-distill: separate runs of these lengths")
    ap.add_argument("--fractions", default="0.75", help="budget-distill: MACs budgets, e.g. 0.75,0.5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--digits-checkpoint", type=Path, default=None,
                    help="the trained digits ResNet-20 (default runs/digits-r20/last.pt, trained when missing)")
    ap.add_argument("--cache", type=Path, default=rd.REPO / "runs" / "recovery-cache", help="MTCNN windows cache")
    ap.add_argument("--from-json", action="store_true", help="only re-render the markdown and the curves")
    a = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    file = RESULTS / "recovery.json"
    results = json.loads(file.read_text()) if file.is_file() else {}
    if a.from_json:
        write(results)
        return
    results["_meta"] = {"machine": f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}", "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    parts = a.parts.split(",")
    for name in a.subjects.split(","):
        s = rd.digits_subject(a.digits_checkpoint) if name == "digits-r20" else rd.mtcnn_subject(name.split("-")[1], a.cache)
        ev = Evaluator(s)
        entry = results.setdefault(name, {})
        entry["note"], entry["original"] = s.note, rounded(ev.original())
        if "sensitivity" in parts:
            entry["sensitivity"] = part_sensitivity(s, ev)
        if "budget" in parts:
            entry["budget"] = part_budget(s, ev)
        if "recalibration" in parts:
            entry["recalibration"] = part_recalibration(s, ev)
        write(results, [name])
        if "distill" in parts:
            runs = a.runs.split(",") if a.runs else DEFAULT_RUNS[name]
            done = entry.setdefault("distill", {})
            for run in runs:
                done.update(part_distill(s, ev, [run], a.steps, a.seed))
                write(results, [name])
            metric = "acc" if s.classifier else "bal_agree"
            plot_distill(name, {k: v for k, v in done.items() if k in ("svd", "default", "svd+features", "default+features")},
                         metric, DOCS / f"recovery-{name}.png", entry["original"].get(metric, 1.0))
        if "budget-distill" in parts:
            methods = a.methods.split(",") if a.methods else DEFAULT_METHODS[name]
            done = entry.setdefault("budget_distill", {})
            for _ in part_budget_distill(s, ev, methods, [int(n) for n in a.step_counts.split(",")],
                                         [float(f) for f in a.fractions.split(",")], a.seed, done):
                write(results, [name])
        write(results, [name])


if __name__ == "__main__":
    main()
