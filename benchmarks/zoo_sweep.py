"""Sweep the surgery over the zoos: every torchvision classification model and the smallest model
of every timm family (``timm.list_models`` grouped by module), with ``--variant u`` and ``s``.

For each model and variant: status (converted / partly converted / nothing to convert / crash),
params and MACs before and after, the time of trace + convert (model construction and counting
excluded), and a forward + backward of the converted model on a small input.

    python benchmarks/zoo_sweep.py                      # everything (slow: about an hour on 2 cores)
    python benchmarks/zoo_sweep.py --only 'resnet*'     # a subset
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
SMALL_INPUT = (3, 64, 64)


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


def model_list(only: str | None) -> list:
    import torchvision

    specs = [f"torchvision:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    specs += [f"timm:{n}" for n in timm_smallest_per_family(RESULTS / "timm_smallest.json").values()]
    if only:
        only = only.replace("tv:", "torchvision:", 1) if only.startswith("tv:") else only
        specs = [s for s in specs if fnmatch.fnmatch(s.split(":", 1)[1], only) or fnmatch.fnmatch(s, only)]
    return specs


def _runs(model, size) -> bool:
    try:
        model.eval()
        with torch.no_grad():
            model(torch.randn(1, *size))
        return True
    except Exception:
        return False


def pick_input_size(spec, model):
    from bsconv_surgery.models import default_input_size, parse_model_spec

    if _runs(model, SMALL_INPUT):
        return SMALL_INPUT
    return tuple(default_input_size(parse_model_spec(spec), model))


def forward_backward(model, size) -> None:
    model.train()
    out = model(torch.randn(2, *size))
    if isinstance(out, (tuple, list)):
        out = out[0]
    elif isinstance(out, dict):
        out = next(iter(out.values()))
    out.float().sum().backward()


def sweep_model(spec: str, variants) -> list:
    """One row per variant; the model is built and counted once, each variant converts a copy."""
    import copy

    from bsconv_surgery import create_model, parse_model_spec
    from bsconv_surgery.counting import count_budget

    model = create_model(parse_model_spec(spec))
    size = pick_input_size(spec, model)
    before = count_budget(model, size)
    rows = []
    for variant in variants:
        row = {"model": spec, "variant": variant, "params_before": before.params,
               "input_size": list(size), "macs_before": before.macs}
        try:
            convert_one(copy.deepcopy(model), variant, size, before, row)
        except Timeout:
            raise
        except Exception as exc:
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            row.update(status="crash", error=f"{type(exc).__name__}: {str(exc)[:200]} at {Path(tb.filename).name}:{tb.lineno}")
        rows.append(row)
    return rows


def convert_one(model, variant: str, size, before, row: dict) -> None:
    from bsconv_surgery import convert
    from bsconv_surgery.counting import count_budget

    model.train()
    t0 = time.perf_counter()
    result = convert(model, variant, input_size=size, count=False)
    row["seconds_convert"] = round(time.perf_counter() - t0, 3)
    report = result.report.to_json()
    after = count_budget(model, size)
    row.update(
        params_after=report["params_after"],
        macs_after=after.macs,
        macs_error=before.error or after.error,
        tracing=report["tracing"]["method"],
        trace_error=report["tracing"]["error"],
        replaced=len(report["replaced"]),
        replaced_kinds=_kinds(report["replaced"]),
        skipped=len(report["skipped"]),
        skip_reasons=_reasons(report["skipped"]),
        census=report["conv_census"],
    )
    forward_backward(model, size)
    row["forward_backward"] = "ok"
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
        return "no nn.Conv2d in the model"
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
        "Models: every torchvision classification model and the smallest model (fewest parameters) of every "
        "timm family. Input: 3x64x64 where the model runs at that size, else its default size. "
        "`convert s` is the time of trace + discovery + passes (no construction, no counting).",
        "",
    ]
    lines += summary_lines(rows)
    lines += ["", "| model | variant | status | sites | skipped | params before -> after | MACs before -> after | convert s | fwd+bwd | note |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in (r.get("replaced_kinds") or {}).items())
        note = r.get("reason") or r.get("error") or ""
        if r.get("skip_reasons") and r["status"] == "partly converted":
            note = "; ".join(f"{k} ({v})" for k, v in list(r["skip_reasons"].items())[:2])
        note = note.replace("|", "/")[:160]
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['status']} | {kinds or 0} | {r.get('skipped', '')} | "
            f"{_m(r.get('params_before'))} -> {_m(r.get('params_after'))} | {_m(r.get('macs_before'))} -> "
            f"{_m(r.get('macs_after'))} | {r.get('seconds_convert', '')} | {r.get('forward_backward', '')} | {note} |"
        )
    return "\n".join(lines) + "\n"


def _m(n):
    return "n/a" if n is None else f"{n / 1e6:.2f}M"


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
    parser.add_argument("--only", help="glob on model names, e.g. 'resnet*' or 'timm:*'")
    parser.add_argument("--variants", default="u,s")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model and variant")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-json", type=Path, help="re-render zoo.md from an existing JSON")
    parser.add_argument("--update", type=Path, help="start from this zoo.json and replace the rows of the models swept now")
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
        specs = model_list(args.only)
        print(f"{len(specs)} models", file=sys.stderr)
        variants = args.variants.split(",")
        for i, spec in enumerate(specs):
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
            for row in new_rows:
                print(f"[{i + 1}/{len(specs)}] {spec} {row['variant']}: {row['status']} "
                      f"{row.get('seconds_convert', '')} {row.get('error', '')}", file=sys.stderr, flush=True)
        if args.update:
            swept = {r["model"] for r in rows}
            old_rows = json.loads(args.update.read_text())["rows"]
            rows = [r for r in old_rows if r["model"] not in swept] + rows
            order = {spec: i for i, spec in enumerate(dict.fromkeys(r["model"] for r in old_rows))}
            rows.sort(key=lambda r: order.get(r["model"], len(order)))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "zoo.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (args.out / "zoo.md").write_text(render_markdown(rows, meta))
    print("\n".join(summary_lines(rows)))


if __name__ == "__main__":
    main()
