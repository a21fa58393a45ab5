"""Every inference preparation and ONNX Runtime, original vs converted, in one interleaved loop per cell.

For each model and batch size, the original and the converted model are prepared every way
(``fused``, ``channels_last``, ``aot``, ``aot_conv``: see ``bsconv_surgery.inference.preps``) and exported to
ONNX for ONNX Runtime (the ``ort`` preparation); all eight callables are then timed round-robin in one loop
(``time_interleaved``), so every figure of a cell shares the moment's load. Per cell the table
gives, each as a speed-up and its share of the MAC ratio:

- **default**: what ``prepare_for_inference`` / ``benchmark`` pick without flags for each model
  (``choose_fastest``, the auto rule, applied to these timings of its candidates ``fused``,
  ``channels_last``, ``aot``, ``aot_conv``, ``ort``);
- **best torch**: each model in its fastest torch preparation;
- **ORT**: both in the ``ort`` preparation (ONNX Runtime: BatchNorm folded, exported with a dynamic
  batch, as many intra-op threads);
- **best of all**: the best original over torch and ORT against the best converted (the honest
  cross-backend figure).

    python benchmarks/preps.py --phase prepare   # compile the AOTInductor packages (slow, cached)
    python benchmarks/preps.py                   # prepare what is missing, then time every cell
    python benchmarks/preps.py --models timm:resnet18:u:3 --batch-sizes 1 --threads 1
    python benchmarks/preps.py --from-json benchmarks/results/preps.json

The compiled packages go to ``--cache`` (default ``~/.cache/bsconv-surgery/bench``),
named by model, variant, batch and threads. Writes ``benchmarks/results/preps.json`` and
``preps.md``. Never part of the tests.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from results_io import add_output_arguments, load_averages, ms, run_and_write

# the package of this checkout, not another installed one
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
DEFAULT_MODELS = [
    "timm:resnet18:u:3",
    "timm:resnet50:u:3",
    "timm:mobilenetv2_100:u",
    "timm:mobilenetv2_100:s",
    "timm:efficientnet_b0:s",
]
PREPS = ("fused", "channels_last", "aot", "aot_conv")
#: The original models have no BSConv steps to lower: their aot_conv is their aot (one package, timed once).
SAME = {("original", "aot_conv"): "aot"}


def form(which: str, prep: str) -> str:
    """The timed form that stands for ``which``'s ``prep``."""
    return f"{which}/{SAME.get((which, prep), prep)}"
TARGET_SHARE = 0.8


def parse_entry(entry: str):
    parts = entry.split(":")
    if len(parts) < 3:
        raise SystemExit(f"bad --models entry '{entry}': expected source:name:variant[:kernel sizes]")
    return ":".join(parts[:2]), parts[2], (parts[3] if len(parts) > 3 and parts[3] else None)


def build(entry: str):
    import bsconv_surgery as bs
    from bsconv_surgery.models import create_model, default_input_size, parse_model_spec

    spec_text, variant, kernel_sizes = parse_entry(entry)
    spec = parse_model_spec(spec_text)
    torch.manual_seed(0)
    original = create_model(spec).eval()
    size = default_input_size(spec, original)
    result = bs.convert(copy.deepcopy(original), variant, example_inputs=size, kernel_sizes=kernel_sizes)
    rep = result.report.to_json()
    return {"model": str(spec), "variant": variant, "kernel_sizes": kernel_sizes, "size": list(size),
            "original": original, "converted": result.model.eval(), "macs": [rep["macs_before"], rep["macs_after"]]}


def prepared_models(cell: dict, batch: int, cache: Path, log) -> dict:
    """name -> (callable, input) for every preparation and ORT, of both models; AOTInductor
    packages and ONNX files reused from ``cache`` when there."""
    from torch._inductor import aoti_load_package

    from bsconv_surgery.inference import AOTCompiled, channels_last_input, compile_aot
    from bsconv_surgery.inference.preps import apply_preparation, preparation_from_flags, resolve_preparation

    x = torch.randn(batch, *cell["size"], generator=torch.Generator().manual_seed(0))
    xcl = channels_last_input(x)
    threads = torch.get_num_threads()
    stem = f"{cell['model'].replace(':', '_')}-{cell['variant']}{cell['kernel_sizes'] or ''}-b{batch}-t{threads}"
    out = {}
    for which in ("original", "converted"):
        # the originals do not depend on the variant: share their files
        key = (f"{cell['model'].replace(':', '_')}-original-b{batch}-t{threads}" if which == "original"
               else f"{stem}-converted")
        model = cell[which]
        for name in ("fused", "channels_last"):
            prep = resolve_preparation(name)
            out[f"{which}/{name}"] = (apply_preparation(copy.deepcopy(model), prep), xcl if prep.channels_last else x)
        for name, lower in (("aot", True), ("aot_conv", False)):
            if (which, name) in SAME:
                continue
            prepared = apply_preparation(copy.deepcopy(model),
                                         preparation_from_flags(fuse=True, channels_last=True, lower=lower))
            package = cache / f"{key}{'' if lower else '-conv'}.pt2"
            if not package.exists():
                log(f"  compiling {package.name} ...")
                t0 = time.time()
                compile_aot(prepared, xcl, package_path=package)
                log(f"  ... {time.time() - t0:.0f} s")
            out[f"{which}/{name}"] = (AOTCompiled(prepared, aoti_load_package(str(package)), channels_last=True), xcl)
        # the ort preparation itself (OrtModule: exported with a dynamic batch, checked against the model)
        log(f"  exporting {which} for ONNX Runtime ...")
        out[f"{which}/ort"] = (apply_preparation(copy.deepcopy(model), resolve_preparation("ort"), x), x)
    return out


def run(args) -> dict:
    from bsconv_surgery.inference.benchmark import environment
    from bsconv_surgery.inference import relative_error
    from bsconv_surgery.inference.preps import choose_fastest
    from bsconv_surgery.inference.timing import paired_speedup, time_interleaved

    cache = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    threads = [int(t) for t in args.threads.split(",")]
    batches = [int(b) for b in args.batch_sizes.split(",")]
    out = {"environment": environment(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "load_average_start": os.getloadavg(), "settings": {"runs": args.runs, "warmup": args.warmup,
                                                                "max_seconds": args.max_seconds}, "rows": []}
    started = time.time()
    for entry in args.models:
        cell = build(entry)
        ratio = cell["macs"][0] / cell["macs"][1]
        for t in threads:
            torch.set_num_threads(t)
            for batch in batches:
                log(f"{entry} batch {batch} threads {t}")
                models = prepared_models(cell, batch, cache, log)
                if args.phase == "prepare":
                    continue
                fns = {n: m for n, (m, _) in models.items()}
                inputs = {n: x for n, (_, x) in models.items()}
                with torch.inference_mode():  # parity of every form against the eager fused one
                    parity = {}
                    for n, (m, x) in models.items():
                        ref = models[n.split("/")[0] + "/fused"]
                        parity[n] = relative_error(torch.as_tensor(m(x)), ref[0](ref[1]))
                tm = time_interleaved(fns, inputs, warmup=args.warmup, runs=args.runs, min_runs=5,
                                      max_seconds=args.max_seconds)
                med = {n: tm[n].median for n in fns}
                row = {"model": cell["model"], "variant": cell["variant"], "kernel_sizes": cell["kernel_sizes"],
                       "batch_size": batch, "threads": t, "input_size": cell["size"], "macs": cell["macs"],
                       "mac_ratio": round(ratio, 4), "timings": {n: tm[n].as_dict() for n in fns},
                       "max_rel_error_vs_fused": {n: float(f"{e:.3g}") for n, e in parity.items()}}
                pick = {}
                for which in ("original", "converted"):
                    torch_meds = {p: med[form(which, p)] for p in PREPS if (which, p) not in SAME}
                    auto_meds = {**torch_meds, "ort": med[f"{which}/ort"]}  # auto's candidates, ort among them
                    pick[which] = {"default": choose_fastest(auto_meds, compiled=["aot", "aot_conv", "ort"]),
                                   "best_torch": min(torch_meds, key=torch_meds.get),
                                   "ort": "ort"}
                    pick[which]["best_all"] = min([*torch_meds, "ort"], key=lambda p: med[f"{which}/{p}"])
                row["choice"] = pick
                for col in ("default", "best_torch", "ort", "best_all"):
                    o, c = f"original/{pick['original'][col]}", f"converted/{pick['converted'][col]}"
                    speedup = med[o] / med[c]
                    row[col] = {"original": pick["original"][col], "converted": pick["converted"][col],
                                "original_ms": round(med[o] * 1e3, 3), "converted_ms": round(med[c] * 1e3, 3),
                                "speedup": round(speedup, 4), "paired": round(paired_speedup(tm[o], tm[c]), 4),
                                "share": round(speedup / ratio, 4)}
                # both models prepared alike, for each preparation
                row["alike"] = {p: {"speedup": round(med[form("original", p)] / med[form("converted", p)], 4),
                                    "share": round(med[form("original", p)] / med[form("converted", p)] / ratio, 4)}
                                for p in (*PREPS, "ort")}
                out["rows"].append(row)
                log("  " + "  ".join(f"{col} {row[col]['speedup']:.2f}x ({row[col]['share']:.2f}; "
                                     f"{row[col]['original']}/{row[col]['converted']})"
                                     for col in ("default", "best_torch", "ort", "best_all")))
                del models, fns, inputs
    out["load_average_end"] = os.getloadavg()
    out["seconds"] = round(time.time() - started, 1)
    return out


def render(data: dict) -> str:
    env = data["environment"]
    la0, la1 = load_averages(data)
    s = data["settings"]
    lines = [
        "# Inference speed by preparation and backend: original vs converted",
        "",
        "Written by `benchmarks/preps.py`. All eight forms of a cell (original and converted, each `fused`, "
        "`channels_last`, `aot` and ONNX Runtime) were timed round-robin in one loop, so the figures of a cell "
        "share the moment's load.",
        "",
        f"- Date: {data['date']}; whole run {data['seconds']:.0f} s",
        f"- CPU: {env['cpu']} ({env['cpu_count']} logical CPUs), torch {env['torch']}, Python {env['python']}; "
        f"load average (1, 5, 15 min) {la0} at the start, {la1} at the end",
        f"- Each cell: warm-up {s['warmup']} calls per form, then up to {s['runs']} rounds (at least 5, stopped "
        f"after {s['max_seconds']} s of timed rounds), `torch.inference_mode()`, float32, random weights, the same "
        "random input for every form. Latency = median of one forward pass.",
        "- Columns: **default** = each model in the preparation `prepare_for_inference` / `benchmark` pick without "
        "flags (the auto rule `choose_fastest` on these timings of its candidates `fused`, `channels_last`, `aot`, `aot_conv`, "
        "`ort`: the fastest, a compiled or ONNX Runtime one only when 2% faster than the fastest eager one); **best "
        "torch** = each model in its fastest torch preparation; **ORT** = both in the `ort` preparation (ONNX Runtime, "
        "BatchNorm folded before export, dynamic batch), same thread count; **best of all** = the best original over torch and ORT against the best converted. "
        "Each: speed-up (original ms / converted ms) and, in brackets, the share of the MAC ratio. "
        "`cl` = channels_last.",
        "",
        "| model | variant | batch | threads | MAC ratio | default | best torch | ORT | best of all "
        "| original ms: fused / cl / aot / ORT | converted ms: fused / cl / aot / aot_conv / ORT |",
        "|---|---|---:|---:|---:|---|---|---|---|---|---|",
    ]
    short = {"fused": "fused", "channels_last": "cl", "aot": "aot", "aot_conv": "aot_conv", "ort": "ORT"}
    for r in data["rows"]:
        variant = r["variant"] + (f" (k{r['kernel_sizes']})" if r.get("kernel_sizes") else "")

        def cell(col):
            c = r[col]
            how = short[c["original"]] if c["original"] == c["converted"] else \
                f"{short[c['original']]} / {short[c['converted']]}"
            return f"**{c['speedup']:.2f}x** ({c['share']:.2f}; {how})"

        times = {w: " / ".join(ms(r["timings"][f"{w}/{p}"]["median_ms"]) for p in (*PREPS, "ort") if (w, p) not in SAME)
                 for w in ("original", "converted")}
        lines.append(f"| {r['model']} | {variant} | {r['batch_size']} | {r['threads']} | {r['mac_ratio']:.2f}x | "
                     f"{cell('default')} | {cell('best_torch')} | {cell('ort')} | {cell('best_all')} | "
                     f"{times['original']} | {times['converted']} |")
    lines += ["", "Both models prepared alike (speed-up, share of the MAC ratio):", "",
              "| model | variant | batch | threads | fused | cl | aot | aot_conv | ORT |",
              "|---|---|---:|---:|---|---|---|---|---|"]
    for r in data["rows"]:
        a = r["alike"]
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch_size']} | {r['threads']} | "
                     + " | ".join(f"{a[p]['speedup']:.2f}x ({a[p]['share']:.2f})" for p in (*PREPS, "ort")) + " |")
    worst = max((e for r in data["rows"] for e in r["max_rel_error_vs_fused"].values()), default=0.0)
    lines += ["", f"Every form's output matched its model's eager fused output (max relative error {worst:.1e})."]
    lines += ["", *data.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS, metavar="SOURCE:NAME:VARIANT[:K]")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--threads", default="1", metavar="N[,N...]")
    ap.add_argument("--phase", choices=["prepare", "all"], default="all",
                    help="prepare: compile and export only (no timing); all: prepare what is missing and time")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-seconds", type=float, default=20.0, help="timed seconds per cell at most (after 5 rounds)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "bsconv-surgery" / "bench")
    add_output_arguments(ap, "preps")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    if args.phase == "prepare" and not args.from_json:
        run(args)  # compiles and caches the packages; nothing to write
        return
    run_and_write(args, run, render)


if __name__ == "__main__":
    main()
