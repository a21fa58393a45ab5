"""Inference preparations compared in one process: every model x preparation timed interleaved.

``speed.py`` times one original/converted pair per cell, cell after cell; on a shared machine
the load drifts between cells. Here all preparations of the original and the converted model
run round-robin in one timing loop, so the rows are directly comparable (same moments, same
load). This is the measurement behind the docs' claims (docs/guide/inference.md) on lowering and AOTInductor.

    python benchmarks/compile_modes.py                                 # resnet18 (u, 3x3) and mobilenetv1 (u)
    python benchmarks/compile_modes.py --models timm:resnet18:u:3 --threads 1

Writes ``benchmarks/results/compile_modes.md`` (and ``.json``). Never part of the tests.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import parse_entry, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_MODELS = ["timm:resnet18:u:3", "timm:mobilenetv1_100:u"]


def preparations():
    from bsconv_surgery.inference.benchmark import PrepOptions

    return [
        PrepOptions(fuse=True, channels_last=True),
        PrepOptions(fuse=True, channels_last=True, compile=True),
        PrepOptions(fuse=True, channels_last=True, compile=True, lower=True),
        PrepOptions(fuse=True, channels_last=True, compile=True, lower=True, aot=True),
    ]


def prepare(model, prep, x):
    from bsconv_surgery.inference.benchmark import prepare_with

    m = prepare_with(copy.deepcopy(model), prep, x)
    with torch.inference_mode():
        m(x)  # torch.compile compiles at the first call
    return m


def run_model(entry: str, runs: int) -> list:
    import bsconv_surgery as bs
    from bsconv_surgery.inference.benchmark import time_interleaved
    from bsconv_surgery.inference import channels_last_input
    from bsconv_surgery.models import create_model, default_input_size, parse_model_spec

    spec_text, variant, kernel_sizes = parse_entry(entry)
    spec = parse_model_spec(spec_text)
    torch.manual_seed(0)
    original = create_model(spec).eval()
    size = default_input_size(spec, original)
    result = bs.convert(copy.deepcopy(original), variant, example_inputs=size, kernel_sizes=kernel_sizes)
    x = channels_last_input(torch.randn(1, *size, generator=torch.Generator().manual_seed(0)))
    torch._dynamo.reset()
    models = {}
    for prep in preparations():
        for role, model in (("original", original), ("converted", result.model)):
            models[(role, prep.label)] = prepare(model, prep, x)
    names = {f"{role}|{label}": m for (role, label), m in models.items()}
    timings = time_interleaved(names, {n: x for n in names}, warmup=5, runs=runs)
    rows = []
    for prep in preparations():
        o, c = timings[f"original|{prep.label}"], timings[f"converted|{prep.label}"]
        rows.append({
            "model": str(spec), "variant": variant, "kernel_sizes": kernel_sizes, "prep": prep.label,
            "threads": torch.get_num_threads(), "original_ms": round(o.median * 1e3, 3),
            "converted_ms": round(c.median * 1e3, 3), "speedup": round(o.median / c.median, 4),
            "mac_ratio": round(result.report.macs_before / result.report.macs_after, 4),
        })
        print(f"{spec} {variant} t{torch.get_num_threads()} {prep.label:<42} original {o.median * 1e3:8.2f} ms  "
              f"converted {c.median * 1e3:8.2f} ms  speed-up {o.median / c.median:.2f}x", flush=True)
    return rows


def render(data: dict) -> str:
    env = data["environment"]
    lines = [
        "# Inference preparations compared in one process",
        "",
        "Written by `benchmarks/compile_modes.py`. All preparations of the original and the converted model "
        "are timed round-robin in one loop (`time_interleaved`), batch 1, float32, channels_last input, so the "
        "rows of one model and thread count were measured at the same moments.",
        "",
        f"- Date: {data['date']}; CPU: {env['cpu']} ({env['cpu_count']} logical CPUs), torch {env['torch']}; "
        f"{data['runs']} timed rounds after 5 warm-up rounds; load average at the start "
        f"{', '.join(f'{v:.2f}' for v in data['load_average_start'])}.",
        "- Converted change = converted latency relative to the `fused+channels_last+compiled` row of the "
        "same model and thread count.",
        "",
        "| model | variant | threads | preparation | original ms | converted ms | speed-up | MAC ratio | converted change |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        base = next(b for b in data["rows"] if b["model"] == r["model"] and b["threads"] == r["threads"]
                    and b["prep"] == "fused+channels_last+compiled")
        change = r["converted_ms"] / base["converted_ms"] - 1
        variant = r["variant"] + (f" (k{r['kernel_sizes']})" if r.get("kernel_sizes") else "")
        lines.append(f"| {r['model']} | {variant} | {r['threads']} | {r['prep']} | {r['original_ms']:.2f} | "
                     f"{r['converted_ms']:.2f} | **{r['speedup']:.2f}x** | {r['mac_ratio']:.2f}x | {change:+.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="SOURCE:NAME:VARIANT[:K]")
    ap.add_argument("--threads", default=None, metavar="N[,N...]", help="default: torch's default count")
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--out", type=Path, default=RESULTS / "compile_modes.md")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from bsconv_surgery.inference.benchmark import environment
    from bsconv_surgery.inference import compiler_available

    if not compiler_available():
        raise SystemExit("torch.compile and AOTInductor on CPU need a C++ compiler (g++ or clang++) on PATH")
    threads = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    data = {"environment": environment(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average_start": os.getloadavg(), "runs": args.runs, "rows": []}
    for t in threads:
        torch.set_num_threads(t)
        for entry in args.models:
            data["rows"] += run_model(entry, args.runs)
    write_results(args.out, data, render)


if __name__ == "__main__":
    main()
