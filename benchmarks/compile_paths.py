"""Why the dynamo-compiled converted model was no faster than eager: the compile paths side by side.

ResNet-18 original and converted (BSConv-U on the 3x3 convs), batch 1, fused + channels_last +
lowered, timed round-robin in one loop:

- ``eager``: not compiled (``channels_last`` preparation);
- ``dynamo``: ``torch.compile`` with inductor's freezing flag set around each call (what
  ``CompiledForInference`` did before issue 16); both models compiled, as in every benchmark, so
  the converted model's calls also walk the original's entry in the one dynamo cache of timm's
  ``ResNet.forward``;
- ``export``: the graph captured with ``torch.export`` and compiled by ``torch._inductor.compile``
  (``CompiledForInference`` now): the same kernels, no dynamo guards per call;
- ``aot``: the AOTInductor package (no Python wrapper either).

The profiler's "TorchDynamo Cache Lookup" (guard evaluation per call) is reported for ``dynamo``.

    python benchmarks/compile_paths.py --threads 1,2

Writes ``benchmarks/results/compile_paths.json`` and ``.md``. Never part of the tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from results_io import add_output_arguments, run_and_write

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package


class DynamoCompiled(nn.Module):
    """``CompiledForInference`` before issue 16: torch.compile, freezing set around each call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(model)

    def forward(self, x):
        import torch._inductor.config as inductor_config

        with torch.inference_mode(), inductor_config.patch(freezing=True):
            return self.compiled(x)


def cache_lookup_ms(fn, x, calls: int = 20) -> float:
    from torch.profiler import profile

    with torch.inference_mode(), profile() as prof:
        for _ in range(calls):
            fn(x)
    return sum(e.cpu_time_total for e in prof.key_averages() if "Cache Lookup" in e.key) / calls / 1e3


def run(args) -> dict:
    import bsconv_surgery as bs
    from bsconv_surgery.inference.benchmark import environment
    from bsconv_surgery.inference import CompiledForInference, channels_last_input, compile_aot
    from bsconv_surgery.inference.compiled import AOTCompiled
    from bsconv_surgery.inference.preps import apply_preparation, preparation_from_flags, resolve_preparation
    from bsconv_surgery.inference.timing import time_interleaved
    from bsconv_surgery.models import create_model, parse_model_spec

    spec = parse_model_spec("timm:resnet18")
    torch.manual_seed(0)
    original = create_model(spec).eval()
    converted = bs.convert(copy.deepcopy(original), "u", example_inputs=(3, 224, 224),
                           kernel_sizes="3").model.eval()
    x = channels_last_input(torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
    lowered = preparation_from_flags(fuse=True, channels_last=True, lower=True)
    data = {"environment": environment(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average_start": os.getloadavg(), "rows": []}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        torch._dynamo.reset()
        fns = {}
        for which, model in (("original", original), ("converted", converted)):
            fns[f"{which}/eager"] = apply_preparation(copy.deepcopy(model), resolve_preparation("channels_last"))
            fns[f"{which}/dynamo"] = DynamoCompiled(apply_preparation(copy.deepcopy(model), lowered))
            fns[f"{which}/export"] = CompiledForInference(apply_preparation(copy.deepcopy(model), lowered),
                                                          channels_last=True)
            m = apply_preparation(copy.deepcopy(model), lowered)
            fns[f"{which}/aot"] = AOTCompiled(m, compile_aot(m, x), channels_last=True)
        with torch.inference_mode():
            for f in fns.values():
                f(x)
        lookup = {w: round(cache_lookup_ms(fns[f"{w}/dynamo"], x), 4) for w in ("original", "converted")}
        t = time_interleaved(fns, {n: x for n in fns}, warmup=3, runs=args.runs, min_runs=5, max_seconds=args.max_seconds)
        row = {"threads": threads, "median_ms": {n: round(t[n].median * 1e3, 3) for n in fns},
               "cpu_median_ms": {n: t[n].as_dict()["cpu_median_ms"] for n in fns}, "dynamo_cache_lookup_ms": lookup}
        row["speedup"] = {p: round(t[f"original/{p}"].median / t[f"converted/{p}"].median, 4)
                          for p in ("eager", "dynamo", "export", "aot")}
        data["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    data["load_average_end"] = os.getloadavg()
    return data


def render(data: dict) -> str:
    env = data["environment"]
    lines = ["# Compile paths: eager, dynamo, torch.export + inductor, AOTInductor", "",
             "Written by `benchmarks/compile_paths.py`. timm resnet18, BSConv-U on its 3x3 convs (MAC ratio 4.54x), "
             "batch 1, fused + channels_last (+ lowered when compiled), all eight forms timed round-robin in one loop.",
             "", f"- Date: {data['date']}; CPU: {env['cpu']}, torch {env['torch']}; load average "
             f"{', '.join(f'{v:.2f}' for v in data['load_average_start'])} at the start, "
             f"{', '.join(f'{v:.2f}' for v in data['load_average_end'])} at the end", "",
             "| threads | path | original ms | converted ms | speed-up | share of MAC ratio | dynamo cache lookup ms/call (orig / conv) |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for r in data["rows"]:
        for p in ("eager", "dynamo", "export", "aot"):
            look = (f"{r['dynamo_cache_lookup_ms']['original']:.3f} / {r['dynamo_cache_lookup_ms']['converted']:.3f}"
                    if p == "dynamo" else "")
            lines.append(f"| {r['threads']} | {p} | {r['median_ms'][f'original/{p}']:.2f} | "
                         f"{r['median_ms'][f'converted/{p}']:.2f} | **{r['speedup'][p]:.2f}x** | "
                         f"{r['speedup'][p] / 4.54:.2f} | {look} |")
    lines += ["", *data.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--max-seconds", type=float, default=15.0)
    add_output_arguments(ap, "compile_paths")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    run_and_write(args, run, render)


if __name__ == "__main__":
    main()
