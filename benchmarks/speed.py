"""Measured inference speed of original vs converted models, side by side, on CPU.

For each model, batch size and preparation, the original and the converted model are prepared
the same way and timed interleaved in one process on the same input (see
``bsconv_surgery.inference.benchmark``); the table shows the median latencies, the measured speed-up and
the MAC ratio (fvcore, batch 1), and how much of the MAC ratio the speed-up realises.

    python benchmarks/speed.py                    # the default table: 1 thread and torch's default count
    python benchmarks/speed.py --compile all      # torch.compile rows for every cell (slow to compile)
    python benchmarks/speed.py --compile target   # torch.compile rows for resnet18 at batch 1 only
    python benchmarks/speed.py --threads 2        # rows at two intra-op threads only
    python benchmarks/speed.py --models timm:resnet18:u:3 --batch-sizes 1 --threads 1
    python benchmarks/speed.py --from-json benchmarks/results/speed.json   # re-render the table

Preparations: ``eager`` (the models as built, eval mode) and ``fused+channels_last`` (BatchNorm
folded into the convs, channels_last weights and input); ``fused+channels_last+compiled``
(inductor with weight freezing), ``fused+channels_last+lowered+compiled`` (the same with the
BSConv steps computed as matmul + depthwise stencil, ``bsconv_surgery.passes.lowering``) and
``fused+channels_last+lowered+aot-compiled`` (AOTInductor, ``compile_aot``) are added for
every batch-1 cell by default, for the target cell only with ``--compile target``, for every
cell with ``--compile all``, for none with ``--compile none``. Timings depend on the machine
and on whatever else runs on it: the header records threads, CPU, torch and the load average.

Writes ``benchmarks/results/speed.json`` and ``benchmarks/results/speed.md``. Never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_io import load_averages, ms, rerender

RESULTS = Path(__file__).resolve().parent / "results"

# spec:variant[:kernel sizes]. ResNets: the 3x3 convs become BSConv-U (7x7 stem and 1x1 convs
# kept). MobileNetV1: its depthwise-separable pairs become BSConv-U (paper 4.1; MACs go up).
# MobileNetV2 / EfficientNet-B0: linear bottlenecks read as BSConv-S (paper 4.2; the layers and
# MACs stay, only the stem conv changes), the paper's rewrite for these models.
DEFAULT_MODELS = [
    "timm:resnet18:u:3",
    "timm:resnet50:u:3",
    "timm:mobilenetv1_100:u",
    "timm:mobilenetv2_100:s",
    "timm:efficientnet_b0:s",
]
TARGET = {"model": "timm:resnet18", "variant": "u", "batch_size": 1, "speedup": 3.0, "share_of_mac_ratio": 0.65}


NOTES = [
    "## Reading the table",
    "",
    "- ResNets, BSConv-U: each 3x3 conv becomes a 1x1 conv and a depthwise 3x3. Depthwise convs do little "
    "arithmetic per byte moved, so they run at a fraction of the MAC/s of dense convs and the measured "
    "speed-up stays below the MAC ratio. Folding BatchNorm removes a memory-bound pass after every depthwise "
    "step, and channels_last lets oneDNN use its NHWC depthwise kernels; together they close most of the "
    "gap. The 7x7 stem, the 1x1 convs and the pooling are the same in both models and bound the speed-up.",
    "- MobileNetV1, BSConv-U: the reordering (paper 4.1) runs the depthwise step on the output channels, "
    "so MACs go up (MAC ratio below 1) and the converted model is slower, as its MAC count predicts.",
    "- MobileNetV2 / EfficientNet-B0, BSConv-S: the bottleneck layers stay as they are (same MACs); the "
    "only changed layer is the stem conv (3 -> 32 channels, stride 2), which becomes a BSConv-S whose two "
    "pointwise steps run at the full input resolution before the strided depthwise step and write a "
    "32-channel full-resolution tensor. Same MACs, more memory traffic: that is the slow-down in these "
    "rows. `convert --exclude conv_stem` keeps the stem (checked once, 1 thread, batch 16, "
    "fused+channels_last: 0.81x with the stem converted, 1.03x without).",
    "- Compiled rows: weight freezing lets inductor prepack the weights and fuse conv + bias + activation "
    "(+ residual add) for both models. Lowering (`+lowered`) changes only BSConv blocks: their pointwise "
    "steps run as plain GEMMs and their depthwise steps as stencils inductor fuses with what follows. "
    "AOTInductor (`+aot-compiled`) removes dynamo's per-call guard checks and the Python wrapper, a fixed "
    "cost per call that weighs on the small converted models at batch 1. Rows of different cells were "
    "measured minutes apart; `benchmarks/compile_modes.py` compares the preparations round-robin in one "
    "loop (ResNet-18: lowering -9 to -11% and AOTInductor a further -12 to -18% on the converted model; "
    "MobileNetV1: lowering +2 to +3%).",
    "- Threads: the converted models consist of many small, memory-bound ops that scale worse over threads "
    "than the dense 3x3 convs of the originals, so the speed-up at batch 1 is higher at one thread than at "
    "several; compare rows only at the same thread count.",
]


def with_compile(mode: str, spec, variant: str, batch: int) -> bool:
    is_target = str(spec) == TARGET["model"] and variant == TARGET["variant"] and batch == TARGET["batch_size"]
    return mode == "all" or (mode == "batch1" and batch == 1) or (mode == "target" and is_target)


def parse_entry(entry: str):
    parts = entry.split(":")
    if len(parts) < 3:
        raise SystemExit(f"bad --models entry '{entry}': expected source:name:variant[:kernel sizes]")
    spec = ":".join(parts[:2])
    variant = parts[2]
    kernel_sizes = parts[3] if len(parts) > 3 and parts[3] else None
    return spec, variant, kernel_sizes


def run(args) -> dict:
    import bsconv_surgery as bs
    from bsconv_surgery.inference.benchmark import PrepOptions, benchmark, environment
    from bsconv_surgery.inference import compiler_available
    from bsconv_surgery.models import create_model, default_input_size, parse_model_spec

    default_threads = torch.get_num_threads()
    thread_counts = ([int(t) for t in args.threads.split(",")] if args.threads
                     else sorted({1, default_threads}))
    base_preps = [PrepOptions(), PrepOptions(fuse=True, channels_last=True)]
    compiled = [PrepOptions(fuse=True, channels_last=True, compile=True),
                PrepOptions(fuse=True, channels_last=True, compile=True, lower=True),
                PrepOptions(fuse=True, channels_last=True, compile=True, lower=True, aot=True)]
    if args.compile != "none" and not compiler_available():
        print("no C++ compiler on PATH: torch.compile rows left out", file=sys.stderr)
        args.compile = "none"
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    started = time.time()
    out = {
        "environment": environment(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_start": os.getloadavg(),
        "default_threads": default_threads,
        "settings": {"runs": args.runs, "warmup": args.warmup, "max_seconds": args.max_seconds, "compile": args.compile},
        "rows": [],
    }
    for entry in args.models:
        spec_text, variant, kernel_sizes = parse_entry(entry)
        spec = parse_model_spec(spec_text)
        torch.manual_seed(0)
        original = create_model(spec)
        size = default_input_size(spec, original)
        converted_model = create_model(spec)
        result = bs.convert(converted_model, variant, example_inputs=size, kernel_sizes=kernel_sizes)
        rep = result.report.to_json()
        macs_o, macs_c = rep.get("macs_before"), rep.get("macs_after")
        cells = [(b, t, p) for b in batch_sizes for t in thread_counts
                 for p in base_preps + (compiled if with_compile(args.compile, spec, variant, b) else [])]
        for batch, threads, prep in cells:
            torch.set_num_threads(threads)
            if prep.compile and not prep.aot:
                # each frozen compile of a model class adds a dynamo cache entry for its forward;
                # past torch._dynamo.config.recompile_limit (8) dynamo would silently run it eagerly
                torch._dynamo.reset()
            t0 = time.time()
            r = benchmark(original, result.model, size, batch_size=batch, prep=prep, warmup=args.warmup,
                               runs=args.runs, max_seconds=args.max_seconds)
            ratio = macs_o / macs_c if macs_o and macs_c else None
            row = {
                "model": str(spec),
                "variant": variant,
                "kernel_sizes": kernel_sizes,
                "sites": len(rep["replaced"]),
                "input_size": list(size),
                "params": [rep["params_before"], rep["params_after"]],
                "macs": [macs_o, macs_c],
                "mac_ratio": round(ratio, 4) if ratio else None,
                "share_of_mac_ratio": round(r["speedup_median"] / ratio, 4) if ratio else None,
                **r,
            }
            out["rows"].append(row)
            print(f"{spec} {variant} b{batch} t{threads} {prep.label:<30} original {r['original']['median_ms']:9.2f} ms  "
                  f"converted {r['converted']['median_ms']:9.2f} ms  speed-up {r['speedup_median']:.2f}x  "
                  f"MAC ratio {ratio or float('nan'):.2f}x  CPU-time speed-up {r['speedup_cpu_time'] or float('nan'):.2f}x  "
                  f"({time.time() - t0:.0f} s)", flush=True)
    out["load_average_end"] = os.getloadavg()
    out["seconds"] = round(time.time() - started, 1)
    return out


def render(data: dict) -> str:
    env = data["environment"]
    la0, la1 = load_averages(data)
    s = data["settings"]
    threads = ", ".join(str(t) for t in sorted({r["threads"] for r in data["rows"]}))
    default = f"; torch's default here: {data['default_threads']}" if data.get("default_threads") else ""
    lines = [
        "# Inference speed: original vs converted",
        "",
        "Written by `benchmarks/speed.py`; re-run it on a quiet machine for numbers to quote.",
        "",
        f"- Date: {data['date']}; whole run {data['seconds']:.0f} s",
        f"- CPU: {env['cpu']} ({env['cpu_count']} logical CPUs), torch {env['torch']} "
        f"(oneDNN {'on' if env['mkldnn'] else 'off'}), Python {env['python']}",
        f"- Threads: {threads} (`torch.set_num_threads`, per row{default}); load "
        f"average (1, 5, 15 min) {la0} at the start, {la1} at the end. A load above the CPU count means other "
        "processes shared the cores: absolute times are then inflated and multi-threaded ones erratic; the "
        "ratios suffer less (the runs are interleaved) and the CPU-time columns least.",
        f"- Each cell: warm-up {s['warmup']} calls per model, then up to {s['runs']} interleaved timed calls "
        f"per model (at least 5, stopped after {s['max_seconds']} s), `torch.inference_mode()`, float32, "
        "random weights, same random input for both models. Latency = median of one forward pass.",
        "- Speed-up = original median / converted median. MAC ratio = original MACs / converted MACs "
        "(fvcore, batch 1). Share = speed-up / MAC ratio. Speed-up in CPU time = the same ratio of the "
        "median process CPU time per call (less sensitive to other load; at one thread it is the work done).",
        "- Both models get the same preparation: `eager` = as built, eval mode; `fused+channels_last` = "
        "BatchNorm folded into the convs (`prepare_for_inference`), channels_last weights and input"
        "; `+compiled` = `torch.compile` (inductor, weight freezing: `CompiledForInference`); `+lowered` = the "
        "BSConv steps computed as a matmul and a depthwise stencil that inductor fuses with what follows "
        "(`bsconv_surgery.passes.lowering`; it touches only BSConv blocks, so the originals are unchanged by it); "
        "`+aot-compiled` = compiled ahead of time with AOTInductor (`compile_aot`: torch.export, frozen weights, "
        "no dynamo guards or Python wrapper at run time).",
        "",
        "| model | variant | batch | threads | preparation | original ms | converted ms | p90 orig / conv ms "
        "| speed-up | MAC ratio | share | CPU ms orig / conv | speed-up in CPU time | converted img/s |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in data["rows"]:
        variant = r["variant"] + (f" (k{r['kernel_sizes']})" if r.get("kernel_sizes") else "")
        mac_ratio = f"{r['mac_ratio']:.2f}x" if r.get("mac_ratio") else "n/a"
        share = f"{r['share_of_mac_ratio']:.2f}" if r.get("share_of_mac_ratio") else "n/a"
        o, c = r["original"], r["converted"]
        cpu = f"{r['speedup_cpu_time']:.2f}x" if r.get("speedup_cpu_time") else "n/a"
        cpu_ms = (f"{ms(o['cpu_median_ms'])} / {ms(c['cpu_median_ms'])}"
                  if o.get("cpu_median_ms") and c.get("cpu_median_ms") else "n/a")
        lines.append(
            f"| {r['model']} | {variant} | {r['batch_size']} | {r['threads']} | {r['prep']} | {ms(o['median_ms'])} | "
            f"{ms(c['median_ms'])} | {ms(o['p90_ms'])} / {ms(c['p90_ms'])} | **{r['speedup_median']:.2f}x** | "
            f"{mac_ratio} | {share} | {cpu_ms} | {cpu} | {c['throughput_per_s']:.1f} |"
        )
    target_rows = [r for r in data["rows"] if r["model"] == TARGET["model"] and r["variant"] == TARGET["variant"]
                   and r["batch_size"] == TARGET["batch_size"]]
    if target_rows:
        lines += [
            "",
            f"Target (CPU, batch 1, BSConv-U {TARGET['model']}, 3x3 convs converted): at least "
            f"{TARGET['speedup']:.0f}x, i.e. {TARGET['share_of_mac_ratio']} of the MAC ratio. In this run:",
            "",
        ]
        for t in sorted({r["threads"] for r in target_rows}):
            rows = [r for r in target_rows if r["threads"] == t]
            cells = ", ".join(f"`{r['prep']}` {r['speedup_median']:.2f}x ({r['share_of_mac_ratio']:.2f})" for r in rows)
            best = max(rows, key=lambda r: r["speedup_median"])
            met = "met" if best["speedup_median"] >= TARGET["speedup"] else "not met"
            busy = max(data["load_average_start"][0], data["load_average_end"][0]) > (env.get("cpu_count") or 1)
            caveat = " Not to be trusted: the machine was busy and these rows use several threads." if busy and t > 1 else ""
            lines.append(f"- {t} thread(s): {cells}: **{met}** (best {best['speedup_median']:.2f}x).{caveat}")
    lines += ["", *NOTES]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="SOURCE:NAME:VARIANT[:K]")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--compile", choices=["none", "target", "batch1", "all"], default="batch1",
                    help="torch.compile rows: none, the target cell only, every batch-1 cell (default), or every cell")
    ap.add_argument("--threads", default=None, metavar="N[,N...]",
                    help="torch intra-op thread counts to time at (default: 1 and torch's default)")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-seconds", type=float, default=5.0, help="timed seconds per cell at most (after 5 runs)")
    ap.add_argument("--out", type=Path, default=RESULTS / "speed.md")
    ap.add_argument("--from-json", type=Path, default=None, help="re-render a saved speed.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found"
    if args.from_json:
        rerender(args.out, args.from_json, render)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        write_results(args.out, run(args), render)


def write_results(out: Path, data: dict, render_fn) -> None:
    """``data`` as JSON beside ``out`` (same name, ``.json``) and rendered as markdown at ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    out.write_text(render_fn(data))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
