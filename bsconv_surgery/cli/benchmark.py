"""``bsconv-surgery benchmark``: time the original and the converted model side by side."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import click
import torch
from rich.table import Table

from ..benchmark import BACKENDS, PrepOptions, benchmark_pair, busy_warning, environment
from ..counting import count_budget, count_params
from ..errors import SurgeryError
from ..inference.compiled import compiler_available
from ..inference.preps import AUTO, PREPARATIONS, resolve_preparation
from ..memory import check_memory
from ..models.zoo import check_input_size, model_from_source, parse_input_size, parse_model_spec
from ..options import SurgeryOptions
from ..registry import VARIANTS
from ..surgery import convert as run_convert, load_converted
from .console import console
from .format import human
from .options import (TEXT, allow_growth_option, build_source, json_option, memory_check_option, num_classes_option,
                      pretrained_option, weights_option)


def _from_dir(directory: Path, input_size: Optional[str]) -> Tuple[str, torch.nn.Module, torch.nn.Module, tuple, Dict[str, Any]]:
    converted = load_converted(directory)
    source, report = converted.source, converted.report
    spec = parse_model_spec(source.spec)
    original = model_from_source(source)  # the same architecture (and head) as the conversion's source
    size = check_input_size(spec, parse_input_size(input_size) if input_size else tuple(converted.input_size))
    macs = {}
    if list(report.input_size) == list(size):  # the MACs counted at conversion apply
        macs = {"before": report.macs_before, "after": report.macs_after}
    return source.spec, original, converted.model, size, {"variant": converted.options.variant, "macs": macs,
                                                          "source_dir": str(directory), "family": spec.family}


def _macs(model: torch.nn.Module, size, family: str) -> Optional[int]:
    return count_budget(model, size, family=family).macs


def _render(result: Dict[str, Any]) -> None:
    b = result["timing"]
    env = result["environment"]
    table = Table(
        title=f"{result['model']}  variant {result['variant']}  {b['backend'] if b['backend'] == 'ort' else b['prep']}",
        caption=(f"batch {b['batch_size']}, input {'x'.join(map(str, b['input_size']))}, {b['device']}, "
                 f"{b['threads']} thread(s)"),
    )
    for col, justify in (("model", "left"), ("params", "right"), ("MACs", "right"), ("median ms", "right"),
                         ("p90 ms", "right"), ("samples/s", "right")):
        table.add_column(col, justify=justify)
    for name in ("original", "converted"):
        t = b[name]
        table.add_row(name, human(result["params"][name]), human(result["macs"][name]), f"{t['median_ms']:.2f}",
                      f"{t['p90_ms']:.2f}", f"{t['throughput_per_s']:.1f}")
    console.print(table)
    mac_ratio = result["mac_ratio"]
    cpu = f"; CPU time {b['speedup_cpu_time']:.2f}x" if b.get("speedup_cpu_time") else ""
    line = (f"Measured speed-up {b['speedup_median']:.2f}x (median; p90 {b['speedup_p90']:.2f}x; "
            f"paired per round {b['speedup_paired']:.2f}x{cpu})")
    if mac_ratio:
        line += f", MAC ratio {mac_ratio:.2f}x: {result['speedup_over_mac_ratio']:.2f} of it."
    console.print(line)
    ort = b.get("ort")
    if ort and "speedup_median" in ort:
        share = f" ({ort['speedup_median'] / mac_ratio:.2f} of the MAC ratio)" if mac_ratio else ""
        console.print(f"ONNX Runtime: original {ort['original']['median_ms']:.2f} ms, converted "
                      f"{ort['converted']['median_ms']:.2f} ms, {ort['speedup_median']:.2f}x{share}.")
    cross = b.get("cross_backend")
    if cross:
        share = f" ({cross['speedup'] / mac_ratio:.2f} of the MAC ratio)" if mac_ratio else ""
        console.print(f"Across backends: best original {cross['original']['median_ms']:.2f} ms "
                      f"({cross['original']['backend']}) vs best converted {cross['converted']['median_ms']:.2f} ms "
                      f"({cross['converted']['backend']}): {cross['speedup']:.2f}x{share}.")
    for name, info in b.get("auto", {}).items():
        tried = ", ".join(f"{n} {c['median_ms']:.2f} ms" if "median_ms" in c
                          else f"{n} (= {c['same_as']})" if "same_as" in c
                          else f"{n} ({'failed' if 'failed' in c else 'unavailable'})"
                          for n, c in info["candidates"].items())
        how = "cached choice" if info.get("cached") else "measured"
        console.info(f"{name}: {b['preps'][name]['name']} ({how}; {tried})", style="dim")
    console.info(f"{b['original']['runs']} interleaved runs after warm-up; torch {env['torch']}, {env['cpu']}.", style="dim")


@click.command(short_help="Time the original and the converted model side by side")
@click.argument("spec_or_dir", metavar="SPEC_OR_DIR", type=TEXT)
@click.option("--variant", type=click.Choice(sorted(VARIANTS)), default="u", show_default=True,
              help="Variant for a model spec converted on the fly (ignored for a directory).")
@click.option("--kernel-sizes", type=TEXT, default=None, metavar="K[,K...]", help="Only standard convs with these kernels (model spec only).")
@click.option("--p", "p", type=TEXT, default="1/4", show_default=True, help="BSConv-S subspace ratio (model spec only).")
@click.option("--with-bn", is_flag=True, help="BatchNorm inside BSConv (model spec only).")
@allow_growth_option
@num_classes_option
@pretrained_option
@weights_option
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--input-size", type=TEXT, default=None, metavar="C,H,W",
              help="Input size: C,H,W (C,T,H,W for video models); default: the model's own, or the one in surgery.json.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--prep", "prep_name", type=click.Choice([AUTO, *PREPARATIONS.names()]), default=None,
              help="Preparation of both models (default: auto, the fastest measured for each model on this machine; "
                   "the choice is cached): eager, fused (BatchNorm folded), channels_last, compiled (inductor), "
                   "aot (AOTInductor, BSConv steps lowered), aot_conv (AOTInductor, BSConv steps as oneDNN convs), "
                   "ort (fused, exported to ONNX, run in ONNX Runtime; the 'export' extra).")
@click.option("--candidates", type=TEXT, default=None, metavar="NAME[,NAME...]",
              help="The preparations --prep auto measures (default: fused, channels_last, with a C++ compiler aot "
                   "and aot_conv, with onnxruntime installed ort).")
@click.option("--no-cache", is_flag=True, help="Measure the auto choice again instead of reusing the cached one.")
@click.option("--backend", type=click.Choice(BACKENDS), default="torch", show_default=True,
              help="torch; ort (both models exported to ONNX, BatchNorm folded, timed in ONNX Runtime); both "
                   "(all four in one loop, and the best original against the best converted).")
@click.option("--fuse", is_flag=True, help="Fold eval-mode BatchNorm into the convs before timing (both models).")
@click.option("--channels-last", is_flag=True, help="channels_last weights and input (both models).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile both models (inductor, weight freezing).")
@click.option("--aot", is_flag=True,
              help="Compile both models ahead of time with AOTInductor (torch.export, frozen weights) instead.")
@click.option("--lower/--no-lower", default=None,
              help="Compute BSConv steps as matmul + depthwise stencil for the compiler (default: when compiling).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch intra-op threads (default: torch's own).")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed calls per model first.")
@click.option("--runs", type=click.IntRange(min=1), default=30, show_default=True, help="Timed, interleaved calls per model.")
@click.option("--max-seconds", type=click.FloatRange(min=0), default=None, help="Stop timing early after this long (at least 5 runs).")
@memory_check_option
@json_option
def benchmark(spec_or_dir, variant, kernel_sizes, p, with_bn, allow_growth, num_classes, pretrained, weights, batch_size,
              input_size, device, prep_name, candidates, no_cache, backend, fuse, channels_last, compile_, aot, lower,
              threads, warmup, runs, max_seconds, no_memory_check, as_json):
    """Time SPEC_OR_DIR before and after conversion: a model spec (timm:NAME, tv:NAME, NAME) is
    converted on the fly with --variant; a directory written by 'convert --out' is loaded and
    its source model rebuilt. Each model gets the fastest preparation measured for it here (--prep auto,
    the default: eager fused, channels_last, compiled where a C++ compiler is present, ONNX Runtime where
    onnxruntime is installed; never one slower than eager fused), or the one --prep names, or the flags --fuse, --channels-last, --lower, --compile,
    --aot ask for; then both are timed interleaved on the same input and the measured speed-up is shown
    next to the MAC ratio. --backend ort times the ONNX Runtime forms instead, --backend both all four."""
    flags = fuse or channels_last or compile_ or aot or lower is not None
    if flags and prep_name:
        raise SurgeryError("Give either --prep or the flags --fuse/--channels-last/--lower/--compile/--aot, not both.")
    names = [n.strip() for n in candidates.split(",") if n.strip()] if candidates else None
    for n in names or ():
        resolve_preparation(n, "candidate")
    if flags:
        prep = PrepOptions(fuse=fuse, channels_last=channels_last, compile=compile_ or aot, aot=aot,
                           lower=(compile_ or aot) if lower is None else lower)
    else:
        prep = prep_name or AUTO
    compiling = compile_ or aot or prep in ("compiled", "aot") or (prep == AUTO and backend != "ort")
    if device == "cuda" and not torch.cuda.is_available():
        raise SurgeryError("--device cuda was asked for, but torch sees no CUDA device here.")
    if (compile_ or aot or prep in ("compiled", "aot", "aot_conv")) and device == "cpu" and not compiler_available():
        raise SurgeryError("--compile, --aot and --prep compiled/aot/aot_conv on CPU need a C++ compiler (g++ or clang++) "
                           "on PATH; install one or choose another preparation.")
    if prep == "ort":
        reason = resolve_preparation("ort").unavailable(torch.device(device))
        if reason:
            raise SurgeryError(f"--prep ort is not available here: {reason.rstrip('.')}. Or leave out --prep: auto picks the "
                               "fastest preparation available.")
    if threads:
        torch.set_num_threads(threads)
    if compiling:  # inductor's C++ build logs "No CUDA runtime is found" on CPU-only machines
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    path = Path(spec_or_dir)
    if path.is_dir() and (pretrained or weights):
        raise SurgeryError(f"'{path}' is a converted model: its weights are in model.safetensors, so --pretrained and "
                           "--weights do not apply.")
    if path.is_dir():
        label, original, converted, size, extra = _from_dir(path, input_size)
        macs_before, macs_after = extra["macs"].get("before"), extra["macs"].get("after")
        variant, family = extra["variant"], extra["family"]
        if not no_memory_check:
            check_memory(original, size, batch=batch_size, device=device, family=family,
                         what="--input-size or --batch-size")
    else:
        options = SurgeryOptions.create(variant, kernel_sizes=kernel_sizes, p=p, with_bn=with_bn,
                                        allow_growth=allow_growth)
        spec, original, size, _source = build_source(spec_or_dir, num_classes, None, input_size, pretrained, weights)
        label = str(spec)
        if not no_memory_check:
            check_memory(original, size, batch=batch_size, device=device, family=spec.family,
                         what="--input-size or --batch-size")
        result = run_convert(copy.deepcopy(original), options, input_size=size, source=spec, num_classes=num_classes,
                             memory_check=False)
        converted = result.model
        macs_before, macs_after = result.report.macs_before, result.report.macs_after
        extra, family = {}, spec.family
    if macs_before is None:
        macs_before = _macs(original, size, family)
    if macs_after is None:
        macs_after = _macs(converted, size, family)
    params = {"original": count_params(original), "converted": count_params(converted)}
    console.info(f"Timing {label} (original and converted, interleaved) ...")
    timing = benchmark_pair(
        original, converted, size, batch_size=batch_size, device=device,
        prep=prep, backend=backend, candidates=names, cache=not no_cache,
        log=None if as_json else (lambda m: console.info(m, style="dim")),
        warmup=warmup, runs=runs, max_seconds=max_seconds, copy_models=False, family=family,
    )
    warning = busy_warning() if device == "cpu" else None
    mac_ratio = macs_before / macs_after if macs_before and macs_after else None
    out = {
        "model": label,
        "variant": variant,
        **({"source_dir": extra["source_dir"]} if "source_dir" in extra else {}),
        "params": params,
        "macs": {"original": macs_before, "converted": macs_after},
        "mac_ratio": round(mac_ratio, 4) if mac_ratio else None,
        "speedup": timing["speedup_median"],
        "speedup_over_mac_ratio": round(timing["speedup_median"] / mac_ratio, 4) if mac_ratio else None,
        "timing": timing,
        "environment": environment(),
    }
    if warning:
        out["warning"] = warning
    if as_json:
        console.print_json(out)
        return
    _render(out)
    if warning:
        console.warn(warning)
