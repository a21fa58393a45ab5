"""Sweep the surgery over the zoos: every torchvision model (``torchvision.models.list_models()``:
classification, detection, segmentation, video, optical flow and the float quantization models),
the smallest model of every timm family (``timm.list_models`` grouped by module) and every timm
model that holds an ``nn.Conv1d`` or ``nn.Conv3d``, with ``--variant u`` and ``s``.

For each model and variant: status (converted / partly converted / nothing to convert / crash),
params and MACs before and after, how it traced (whole, in parts, or not), the time of trace +
convert (model construction and counting excluded), and a forward + backward of the converted
model in training mode on a small input (detection models with synthetic targets: one box per
image, plus a mask or keypoints where the model has those heads; ``models/inputs.py``).

    python benchmarks/zoo_sweep.py                      # everything (slow: hours on 2 cores)
    python benchmarks/zoo_sweep.py --only 'resnet*'     # a subset
    python benchmarks/zoo_sweep.py --set new --update benchmarks/results/zoo.json   # the non-classification
        # torchvision families and the timm Conv1d/Conv3d models, added to the earlier results
    python benchmarks/zoo_sweep.py --from-json benchmarks/results/zoo.json   # re-render the table
    python benchmarks/zoo_sweep.py --only 'tv:vit_h_14' --update benchmarks/results/zoo.json  # redo some

Writes ``benchmarks/results/zoo.json`` and ``benchmarks/results/zoo.md``. Never part of the tests.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
#: Small inputs tried first, per family (a model that does not run at its small size gets its default).
SMALL_INPUT = {"video": (3, 4, 32, 32), "optical_flow": (3, 128, 128)}
SMALL_IMAGE = (3, 64, 64)


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout()


def timm_smallest_per_family(cache: Path) -> dict:
    """``{module: model}``: the model with the fewest parameters in each timm module (timm's
    ``test_*`` fixtures excluded), counted on the meta device (no memory, no init cost). Cached,
    keyed by timm version."""
    import timm

    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("timm") == timm.__version__:
            return data["smallest"]
    smallest = {}
    for module in timm.list_modules():
        best = None
        for name in timm.list_models(module=module):
            if name.startswith("test_"):  # timm's unit-test fixtures, not real architectures
                continue
            try:
                with torch.device("meta"), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = timm.create_model(name)
                n = sum(p.numel() for p in model.parameters())
            except Exception:
                continue
            if best is None or n < best[1]:
                best = (name, n)
        if best:
            smallest[module] = best[0]
            print(f"  {module}: {best[0]} ({best[1]:,})", file=sys.stderr)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"timm": timm.__version__, "smallest": smallest}, indent=1))
    return smallest


def timm_conv_nd(cache: Path) -> dict:
    """``{model: {"Conv1d": n, "Conv3d": n, "params": n}}``: every timm model that holds an
    ``nn.Conv1d`` or ``nn.Conv3d`` (built on the meta device: no memory, no init cost; timm's
    ``test_*`` fixtures excluded). Cached, keyed by timm version."""
    import timm
    from torch import nn

    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("timm") == timm.__version__:
            return data["models"]
    found = {}
    for name in timm.list_models():
        if name.startswith("test_"):
            continue
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name)
        except Exception:
            continue
        counts = {}
        for m in model.modules():
            for cls in (nn.Conv1d, nn.Conv3d):
                if isinstance(m, cls):
                    counts[cls.__name__] = counts.get(cls.__name__, 0) + 1
        if counts:
            found[name] = {**counts, "params": sum(p.numel() for p in model.parameters())}
            print(f"  {name}: {counts}", file=sys.stderr)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"timm": timm.__version__, "models": found}, indent=1))
    return found


def model_list(only: str | None, which: str = "all") -> list:
    """``which``: ``all``; ``new`` (the torchvision families other than classification and the timm
    models with Conv1d/Conv3d); ``old`` (torchvision classification and the smallest of each timm
    family, the first sweep's set)."""
    import torchvision

    from bsconv_surgery.models import torchvision_family

    tv = [f"torchvision:{n}" for n in torchvision.models.list_models()]
    old = [s for s in tv if torchvision_family(s.split(":", 1)[1]) == "classification"]
    old += [f"timm:{n}" for n in timm_smallest_per_family(RESULTS / "timm_smallest.json").values()]
    new = [s for s in tv if s not in old]
    conv_nd = timm_conv_nd(RESULTS / "timm_conv_nd.json")
    new += [f"timm:{n}" for n in sorted(conv_nd, key=lambda n: conv_nd[n]["params"]) if f"timm:{n}" not in old]
    specs = {"all": old + [s for s in new if s not in old], "old": old, "new": new}[which]
    if only:
        globs = [g.replace("tv:", "torchvision:", 1) if g.startswith("tv:") else g for g in only.split(",")]
        specs = [s for s in specs if any(fnmatch.fnmatch(s.split(":", 1)[1], g) or fnmatch.fnmatch(s, g) for g in globs)]
    return specs


def _runs(model, size, family) -> bool:
    try:
        model.eval()
        with torch.no_grad():
            model(*family.make(size))
        return True
    except Exception:
        return False


def pick_input_size(spec, model):
    from bsconv_surgery.models import default_input_size, parse_model_spec

    spec = parse_model_spec(spec)
    small = SMALL_INPUT.get(spec.family, SMALL_IMAGE)
    if _runs(model, small, spec.inputs):
        return small
    return tuple(default_input_size(spec, model))


def forward_backward(model, inputs) -> None:
    """A training-mode forward (detection: with synthetic targets) and a backward of the loss."""
    from bsconv_surgery.models import training_loss

    model.train()
    training_loss(model(*inputs.train_args(model, 2))).backward()


def sweep_model(spec: str, variants) -> list:
    """One row per variant; the model is built and counted once, each variant converts a copy."""
    import copy

    from bsconv_surgery import ExampleInputs
    from bsconv_surgery.analysis.counting import count_budget
    from bsconv_surgery.models import create_model, parse_model_spec

    parsed = parse_model_spec(spec)
    model = create_model(parsed)
    size = pick_input_size(spec, model)
    before = count_budget(model, ExampleInputs.of(parsed.family, size))
    with torch.no_grad():
        model.eval()
        structure = parsed.inputs.structure(model(*parsed.inputs.make(size)))
    rows = []
    for variant in variants:
        row = {"model": spec, "family": parsed.family, "variant": variant, "params_before": before.params,
               "input_size": list(size), "macs_before": before.macs}
        try:
            convert_one(copy.deepcopy(model), variant, size, before, row, structure)
        except Timeout:
            raise
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            row.update(status="crash", error=f"{type(exc).__name__}: {str(exc)[:200]} at {Path(tb.filename).name}:{tb.lineno}")
        rows.append(row)
    return rows


def convert_one(model, variant: str, size, before, row: dict, structure=None) -> None:
    from bsconv_surgery import ExampleInputs, convert
    from bsconv_surgery.analysis.counting import count_budget

    inputs = ExampleInputs.of(row["family"], size)
    model.train()
    t0 = time.perf_counter()
    result = convert(model, variant, example_inputs=inputs, count=False)
    row["seconds_convert"] = round(time.perf_counter() - t0, 3)
    report = result.report.to_json()
    after = count_budget(model, inputs)
    row.update(
        params_after=report["params_after"],
        macs_after=after.macs,
        macs_error=before.error or after.error,
        tracing=report["tracing"]["method"],
        trace_error=report["tracing"]["error"],
        traced_parts=report["tracing"].get("parts", []),
        replaced=len(report["replaced"]),
        replaced_kinds=_kinds(report["replaced"]),
        skipped=len(report["skipped"]),
        skip_reasons=_reasons(report["skipped"]),
        census=report["conv_census"],
    )
    with torch.no_grad():  # eval forward: the converted model still runs, with the same output structure
        model.eval()
        row["output_structure_same"] = inputs.structure(model(*inputs.make())) == structure
    forward_backward(model, inputs)
    row["forward_backward"] = "ok"
    if not row["output_structure_same"]:
        raise RuntimeError("the converted model's eval output has another structure than the original's")
    row["status"] = "converted" if report["replaced"] and not report["skipped"] else (
        "partly converted" if report["replaced"] else "nothing to convert")
    if not report["replaced"]:
        row["reason"] = _nothing_reason(report)


def _kinds(records) -> dict:
    out = {}
    for r in records:
        out[r["kind"]] = out.get(r["kind"], 0) + 1
    return out


def _reasons(skipped) -> dict:
    """Skip reasons with site names stripped, counted."""
    out = {}
    for s in skipped:
        reason = s["reason"].split(":")[0] if s["reason"].startswith("hidden") else s["reason"]
        reason = reason if len(reason) < 120 else reason[:117] + "..."
        out[reason] = out.get(reason, 0) + 1
    return out


def _nothing_reason(report) -> str:
    census = report["conv_census"]
    if report["skipped"]:
        first = next(iter(_reasons(report["skipped"])))
        return f"every candidate skipped ({len(report['skipped'])}), e.g. {first}"
    if not any(census.values()):
        return "no convolution in the model"
    return "no standard conv, no depthwise-separable pair, no bottleneck (" + ", ".join(
        f"{k} {v}" for k, v in census.items() if v) + ")"


def has_candidates(row) -> bool:
    """Models that contain a standard conv or a depthwise-separable pair (the coverage target)."""
    return bool(row.get("replaced")) or bool(row.get("skipped")) or row.get("status") == "crash"


def render_markdown(rows: list, meta: dict) -> str:
    lines = [
        "# Zoo sweep",
        "",
        f"Generated by `python benchmarks/zoo_sweep.py` on {meta['date']} ({meta['machine']}), "
        f"torch {meta['torch']}, torchvision {meta['torchvision']}, timm {meta['timm']}.",
        "Models: every torchvision model (all families: classification, detection, segmentation, video, "
        "optical flow, quantization float models), the smallest model (fewest parameters) of every "
        "timm family and every timm model with an nn.Conv1d or nn.Conv3d. Input: 3x64x64 (video 3x4x32x32, "
        "optical flow 3x128x128) where the model runs at that size, else its default size; detection models "
        "get a list of images and resize them to their own size. "
        "`convert s` is the time of trace + discovery + passes (no construction, no counting). "
        "`fwd+bwd`: a training-mode forward of the converted model (detection: with synthetic targets) and a "
        "backward; each converted model also runs an eval forward whose output has the original's structure.",
        "",
    ]
    earlier = [r for r in rows if "family" not in r]
    if earlier:
        lines += [f"{len(earlier)} runs ({len({r['model'] for r in earlier})} models) carry no `family`: they are kept "
                  "from an earlier sweep (`--update`), run before partial tracing and Conv1d/Conv3d support.", ""]
    lines += summary_lines(rows)
    lines += [""] + family_table(rows)
    lines += ["", "| model | variant | status | tracing | sites | skipped | params before -> after | MACs before -> after | convert s | fwd+bwd | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in (r.get("replaced_kinds") or {}).items())
        note = r.get("reason") or r.get("error") or ""
        if r.get("skip_reasons") and r["status"] == "partly converted":
            note = "; ".join(f"{k} ({v})" for k, v in list(r["skip_reasons"].items())[:2])
        note = note.replace("|", "/")[:160]
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['status']} | {_tracing(r)} | {kinds or 0} | {r.get('skipped', '')} | "
            f"{_m(r.get('params_before'))} -> {_m(r.get('params_after'))} | {_m(r.get('macs_before'))} -> "
            f"{_m(r.get('macs_after'))} | {r.get('seconds_convert', '')} | {r.get('forward_backward', '')} | {note} |"
        )
    return "\n".join(lines) + "\n"


def _m(n):
    return "n/a" if n is None else f"{n / 1e6:.2f}M"


def _tracing(row) -> str:
    method = row.get("tracing", "")
    if method == "fx parts":
        return f"{len(row.get('traced_parts') or [])} parts"
    return {"named_modules fallback": "fallback"}.get(method, method)


def _family_of(row) -> str:
    if row.get("family"):
        return row["family"]
    return "timm" if row["model"].startswith("timm:") else "classification"


def family_table(rows: list) -> list:
    """Per family: models, runs, converted share, crashes, forward+backward ok, tracing."""
    order = ["classification", "detection", "segmentation", "video", "optical_flow", "quantization", "timm Conv1d/3d", "timm"]
    groups = {}
    for r in rows:
        family = _family_of(r)
        if r["model"].startswith("timm:"):
            family = "timm Conv1d/3d" if r.get("conv_nd") else "timm"
        groups.setdefault(family, []).append(r)
    lines = ["## Per family", "",
             "| family | models | runs | converted (>= 1 site, fwd+bwd ok) | crashes | timeouts | fwd+bwd ok | traced whole / in parts / fallback |",
             "|---|---|---|---|---|---|---|---|"]
    for family in sorted(groups, key=lambda f: order.index(f) if f in order else len(order)):
        g = groups[family]
        converted = [r for r in g if r.get("replaced") and r.get("forward_backward") == "ok"]
        crashes = sum(r["status"] == "crash" for r in g)
        timeouts = sum(r["status"] == "timeout" for r in g)
        fb = sum(r.get("forward_backward") == "ok" for r in g)
        tracing = [sum(r.get("tracing") == m for r in g) for m in ("fx", "fx parts", "named_modules fallback")]
        lines.append(f"| {family} | {len({r['model'] for r in g})} | {len(g)} | {len(converted)} / {len(g)} "
                     f"({100 * len(converted) / len(g):.0f}%) | {crashes} | {timeouts} | {fb} / {len(g)} | "
                     f"{' / '.join(map(str, tracing))} |")
    return lines


def summary_lines(rows: list) -> list:
    total = len(rows)
    crashes = [r for r in rows if r["status"] == "crash"]
    with_candidates = [r for r in rows if has_candidates(r)]
    converted_ok = [r for r in with_candidates if r.get("replaced") and r.get("forward_backward") == "ok"]
    under_100m = [r for r in rows if r.get("params_before", 0) <= 100e6 and "seconds_convert" in r]
    slow = [r for r in under_100m if r["seconds_convert"] >= 2.0]
    slowest = max(under_100m, key=lambda r: r["seconds_convert"], default=None)
    models = {r["model"] for r in rows}
    lines = [
        "## Headline",
        "",
        f"- {len(models)} models x 2 variants = {total} runs.",
        f"- Ended without a crash: {total - len(crashes)} / {total} ({100 * (total - len(crashes)) / max(total, 1):.1f}%).",
        f"- Runs on models with a standard conv, a depthwise-separable pair or a bottleneck: {len(with_candidates)}; "
        f"at least one site converted with a working forward and backward: {len(converted_ok)} "
        f"({100 * len(converted_ok) / max(len(with_candidates), 1):.1f}%).",
        f"- Trace + convert >= 2 s (models up to 100M params): {len(slow)} of {len(under_100m)}"
        + (f"; slowest {slowest['model']} ({slowest['variant']}) {slowest['seconds_convert']} s." if slowest else "."),
    ]
    if crashes:
        lines.append("- Crashes: " + ", ".join(f"{r['model']} ({r['variant']})" for r in crashes))
    timeouts = [r for r in rows if r["status"] == "timeout"]
    if timeouts:
        lines.append("- Timed out (counted as ending without a crash, but not run to the end): "
                     + ", ".join(f"{r['model']} ({r['variant']}, {r['error']})" for r in timeouts))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="glob(s) on model names, comma-separated, e.g. 'resnet*' or 'timm:*,tv:r3d*'")
    parser.add_argument("--set", dest="which", choices=("all", "new", "old"), default="all",
                        help="all models; new: torchvision's non-classification families and the timm Conv1d/Conv3d "
                        "models; old: torchvision classification and the smallest model of each timm family")
    parser.add_argument("--variants", default="u,s")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model and variant")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-json", type=Path, help="re-render zoo.md from an existing JSON")
    parser.add_argument("--update", type=Path, help="start from this zoo.json and replace the rows of the models swept now")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of models already in OUT/zoo.partial.jsonl (written as the sweep goes)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import timm
    import torchvision

    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "torchvision": torchvision.__version__, "timm": timm.__version__,
    }
    if args.from_json:
        rows = json.loads(args.from_json.read_text())["rows"]
    else:
        rows = []
        signal.signal(signal.SIGALRM, _alarm)
        specs = model_list(args.only, args.which)
        print(f"{len(specs)} models", file=sys.stderr)
        variants = args.variants.split(",")
        args.out.mkdir(parents=True, exist_ok=True)
        partial = args.out / "zoo.partial.jsonl"
        done = {}
        if args.resume and partial.is_file():
            for line in partial.read_text().splitlines():
                row = json.loads(line)
                done.setdefault(row["model"], []).append(row)
        elif partial.is_file():
            partial.unlink()
        for i, spec in enumerate(specs):
            if spec in done:
                rows.extend(done[spec])
                continue
            signal.alarm(args.timeout)
            try:
                new_rows = sweep_model(spec, variants)
            except Timeout:
                new_rows = [{"model": spec, "variant": v, "status": "timeout", "error": f"over {args.timeout} s"} for v in variants]
            except Exception as exc:  # building or counting the original failed
                tb = traceback.extract_tb(exc.__traceback__)[-1]
                error = f"{type(exc).__name__}: {str(exc)[:200]} at {Path(tb.filename).name}:{tb.lineno}"
                new_rows = [{"model": spec, "variant": v, "status": "crash", "error": error} for v in variants]
            finally:
                signal.alarm(0)
            rows.extend(new_rows)
            with partial.open("a") as fh:
                fh.writelines(json.dumps(row) + "\n" for row in new_rows)
            for row in new_rows:
                print(f"[{i + 1}/{len(specs)}] {spec} {row['variant']}: {row['status']} "
                      f"{row.get('seconds_convert', '')} {row.get('error', '')}", file=sys.stderr, flush=True)
        if args.update:
            swept = {r["model"] for r in rows}
            old_rows = json.loads(args.update.read_text())["rows"]
            rows = [r for r in old_rows if r["model"] not in swept] + rows
            order = {spec: i for i, spec in enumerate(dict.fromkeys(r["model"] for r in old_rows))}
            rows.sort(key=lambda r: order.get(r["model"], len(order)))
        conv_nd = timm_conv_nd(RESULTS / "timm_conv_nd.json")
        for row in rows:
            name = row["model"].split(":", 1)[1]
            if row["model"].startswith("timm:") and name in conv_nd:
                row["conv_nd"] = {k: v for k, v in conv_nd[name].items() if k != "params"}
        (args.out / "zoo.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        partial.unlink()
    (args.out / "zoo.md").write_text(render_markdown(rows, meta))
    print("\n".join(summary_lines(rows)))


if __name__ == "__main__":
    main()
