"""Where the time of a forward pass goes, per kind of op: eager (fused, channels_last) against
compiled (the kernels of the ``aot`` and ``aot_conv`` preparations), original and converted ResNet-18.

Eager models are timed per leaf module (forward hooks, wall clock; what no module accounts for is
"other": residual adds, Python). Compiled models are profiled with ``torch.profiler`` on inductor's
kernels (``cpp.enable_kernel_profile``; the ``aot`` preparation runs the same kernels without the
Python wrapper; ops told apart by their weight shapes): oneDNN convolutions, MKL GEMMs (the lowered pointwise steps and the classifier),
inductor's fused C++ kernels (the lowered depthwise steps with their bias, ReLU and residual add;
pooling).

    python benchmarks/profile_ops.py                       # timm resnet18, BSConv-U on 3x3, batch 1 and 16, 1 thread
    python benchmarks/profile_ops.py --batch-sizes 1 --threads 2

Writes ``benchmarks/results/profile_ops.json`` and ``profile_ops.md``. Never part of the tests.
"""

from __future__ import annotations

import argparse
import collections
import copy
import os
import sys
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch import nn
from results_io import add_output_arguments, run_and_write

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's package


def module_kind(name: str, m: nn.Module) -> str:
    from bsconv_surgery.layers import DepthwiseAsStencil, PointwiseAsLinear

    if isinstance(m, nn.Conv2d):
        parent = name.rsplit(".", 1)[-1]
        if isinstance(m, PointwiseAsLinear) or parent in ("pw", "pw1", "pw2"):
            return "BSConv pointwise (1x1 GEMM)"
        if isinstance(m, DepthwiseAsStencil) or parent == "dw":
            return "BSConv depthwise 3x3"
        if m.kernel_size == (7, 7):
            return "stem conv 7x7"
        if m.kernel_size == (1, 1):
            return "downsample conv 1x1"
        return "conv 3x3"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "BatchNorm"
    if isinstance(m, nn.Linear):
        return "classifier"
    if "pool" in type(m).__name__.lower():
        return "pooling"
    if isinstance(m, (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Identity)):
        return "activation / identity"
    return type(m).__name__


def eager_profile(model: nn.Module, x: torch.Tensor, calls: int) -> dict:
    times = collections.defaultdict(float)
    starts = {}
    hooks = []
    for name, m in model.named_modules():
        if next(m.children(), None) is not None:
            continue
        kind = module_kind(name, m)
        hooks.append(m.register_forward_pre_hook(lambda mod, i, n=name: starts.__setitem__(n, time.perf_counter())))
        hooks.append(m.register_forward_hook(
            lambda mod, i, o, n=name, k=kind: times.__setitem__(k, times[k] + time.perf_counter() - starts[n])))
    with torch.inference_mode():
        model(x)
        times.clear()
        t0 = time.perf_counter()
        for _ in range(calls):
            model(x)
        total = (time.perf_counter() - t0) / calls
    for h in hooks:
        h.remove()
    out = {k: v / calls for k, v in times.items()}
    out["other (residual adds, Python)"] = max(total - sum(out.values()), 0.0)
    return {"total_ms": total * 1e3, "ms": {k: v * 1e3 for k, v in out.items()}}


def kernel_kind(key: str, shapes) -> str:
    if key.startswith("mkl::") or "linear" in key or key.startswith("aten::mm") or key.startswith("aten::addmm"):
        return "MKL GEMM (lowered BSConv pointwise steps; classifier)"
    if "convolution" in key:
        # the weight: the second 4-D argument, or the third in the forms that add a residual (input, other, weight)
        four_d = [list(v) for v in shapes[:3] if len(v) == 4]
        weight = four_d[2] if len(four_d) == 3 else (four_d[1] if len(four_d) > 1 else [])
        if len(weight) == 4 and weight[1] == 1 and weight[0] > 1:
            return "oneDNN depthwise conv 3x3"
        if len(weight) == 4 and weight[2:] == [1, 1]:
            return "oneDNN 1x1 conv (BSConv pointwise steps; downsample)"
        if len(weight) == 4 and weight[2:] == [7, 7]:
            return "oneDNN stem conv 7x7"
        return "oneDNN dense conv 3x3"
    if "max_pool" in key:
        return "pooling"
    if "cpp_fused" in key and "constant_pad_nd" in key:
        return "fused depthwise stencil (+bias, ReLU, residual add)"
    if "cpp_fused" in key:
        return "other fused kernels (bias, ReLU, residual add, mean)"
    return None


def compiled_profile(model: nn.Module, x: torch.Tensor, calls: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from bsconv_surgery.inference import CompiledForInference

    # the Python wrapper: its calls of library kernels show in the profiler
    compiled = CompiledForInference(model, {"cpp.enable_kernel_profile": True, "cpp_wrapper": False}, channels_last=True)
    with torch.inference_mode():
        compiled(x)
        compiled(x)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            t0 = time.perf_counter()
            for _ in range(calls):
                compiled(x)
            total = (time.perf_counter() - t0) / calls
    ms = collections.defaultdict(float)
    for e in prof.key_averages(group_by_input_shape=True):
        kind = kernel_kind(e.key, e.input_shapes)
        if kind:
            ms[kind] += e.self_cpu_time_total / 1e3 / calls
    profiled = sum(ms.values())
    ms["other (allocation, wrapper, profiler)"] = max(total * 1e3 - profiled, 0.0)
    return {"total_ms": total * 1e3, "ms": dict(ms)}


def run(args) -> dict:
    import bsconv_surgery as bs
    from bsconv_surgery.inference.benchmark import environment
    from bsconv_surgery.inference import channels_last_input
    from bsconv_surgery.inference.preps import apply_preparation, preparation_from_flags, resolve_preparation
    from bsconv_surgery.models import create_model, parse_model_spec

    torch.set_num_threads(args.threads)
    spec = parse_model_spec(args.model)
    torch.manual_seed(0)
    original = create_model(spec).eval()
    result = bs.convert(copy.deepcopy(original), args.variant, example_inputs=(3, 224, 224),
                        kernel_sizes=args.kernel_sizes)
    data = {"environment": environment(), "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average_start": os.getloadavg(), "model": args.model, "variant": args.variant,
            "kernel_sizes": args.kernel_sizes, "threads": args.threads,
            "macs": [result.report.macs_before, result.report.macs_after], "rows": []}
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        calls = max(2, args.calls // batch)
        for which, model in (("original", original), ("converted", result.model)):
            for prep in ("fused", "channels_last"):
                p = resolve_preparation(prep)
                m = apply_preparation(copy.deepcopy(model), p)
                r = eager_profile(m, channels_last_input(x) if p.channels_last else x, calls)
                data["rows"].append({"batch": batch, "model": which, "prep": p.label, **r})
                print(f"b{batch} {which} {p.label}: {r['total_ms']:.2f} ms", file=sys.stderr, flush=True)
            for lower in ((True, False) if which == "converted" else (False,)):
                p = preparation_from_flags(fuse=True, channels_last=True, lower=lower)
                m = apply_preparation(copy.deepcopy(model), p)
                r = compiled_profile(m, channels_last_input(x), calls)
                label = f"compiled kernels ({'aot: lowered' if lower else 'aot_conv: BSConv steps as convs'})"
                data["rows"].append({"batch": batch, "model": which, "prep": label, **r})
                print(f"b{batch} {which} {label}: {r['total_ms']:.2f} ms", file=sys.stderr, flush=True)
    data["load_average_end"] = os.getloadavg()
    return data


def render(data: dict) -> str:
    env = data["environment"]
    lines = ["# Where the time goes: per-op profile, eager against compiled", "",
             "Written by `benchmarks/profile_ops.py`.", "",
             f"- {data['model']}, variant {data['variant']}"
             + (f" (kernel sizes {data['kernel_sizes']})" if data.get("kernel_sizes") else "")
             + f", 224 px, {data['threads']} thread(s); MACs {data['macs'][0] / 1e9:.2f} G original, "
             f"{data['macs'][1] / 1e9:.2f} G converted (ratio {data['macs'][0] / data['macs'][1]:.2f}x)",
             f"- Date: {data['date']}; CPU: {env['cpu']}, torch {env['torch']}; load average "
             f"{', '.join(f'{v:.2f}' for v in data['load_average_start'])} at the start, "
             f"{', '.join(f'{v:.2f}' for v in data['load_average_end'])} at the end",
             "- Eager rows: wall time per leaf module (forward hooks add a little to every call). Compiled rows: "
             "self CPU time of inductor's kernels and the library calls it makes (frozen weights, BSConv steps "
             "lowered or not); 'total' is the wall time of the profiled calls.", ""]
    for batch in sorted({r["batch"] for r in data["rows"]}):
        rows = [r for r in data["rows"] if r["batch"] == batch]
        lines += [f"## Batch {batch}", ""]
        for r in rows:
            lines += [f"**{r['model']}, {r['prep']}**: {r['total_ms']:.2f} ms per call", "",
                      "| op | ms | share |", "|---|---:|---:|"]
            for k, v in sorted(r["ms"].items(), key=lambda kv: -kv[1]):
                if v >= 0.005:
                    lines.append(f"| {k} | {v:.2f} | {v / r['total_ms'] * 100:.0f}% |")
            lines.append("")
    lines += data.get("notes", [])
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:resnet18")
    ap.add_argument("--variant", default="u")
    ap.add_argument("--kernel-sizes", default="3")
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=20, help="calls profiled at batch 1 (fewer at larger batches)")
    add_output_arguments(ap, "profile_ops")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    run_and_write(args, run, render)


if __name__ == "__main__":
    main()
