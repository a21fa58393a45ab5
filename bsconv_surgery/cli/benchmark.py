"""``bsconv-surgery benchmark``: time the original and the converted model side by side."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import click
from rich.table import Table

from ..core.errors import SurgeryError, arg
from ..core.registry import AUTO, BACKENDS, PREPARATIONS
from .console import console
from .format import human, name_column, number_columns
from .lazy import lazy_module
from .options import (TEXT, json_option, load_source, memory_check_option, model_args_option, num_classes_option,
                      options_from, pretrained_option, surgery_options, threads_option, trust_code_option,
                      weights_option)

torch = lazy_module("torch")
library = lazy_module("bsconv_surgery.inference.benchmark")
compiled = lazy_module("bsconv_surgery.inference.compiled")
counting = lazy_module("bsconv_surgery.analysis.counting")
memory = lazy_module("bsconv_surgery.analysis.memory")
preps = lazy_module("bsconv_surgery.inference.preps")
surgery = lazy_module("bsconv_surgery.surgery")
zoo = lazy_module("bsconv_surgery.models.zoo")


def _from_dir(directory: Path, input_size: Optional[str], trust_code: bool) -> Tuple[str, Any, Any, Any, Dict[str, Any]]:
    """``(label, original, converted, example inputs, extra)`` for a folder written by ``convert --out``."""
    converted = surgery.load_converted(directory, trust_code=trust_code)
    source, report = converted.source, converted.report
    # the same architecture (and head) as the conversion's source
    original = zoo.model_from_source(source, trust_code=trust_code)
    setattr(original, zoo.SOURCE_ATTRIBUTE, source)
    inputs = zoo.example_inputs_for(original, input_size) if input_size else converted.inputs
    macs = {}
    if list(report.input_size) == list(inputs.size):  # the MACs counted at conversion apply
        macs = {"before": report.macs_before, "after": report.macs_after}
    return source.spec, original, converted.model, inputs, {"variant": converted.options.variant, "macs": macs,
                                                            "source_dir": str(directory)}


def _macs(model, inputs) -> Optional[int]:
    return counting.count_budget(model, inputs).macs


def _render(result: Dict[str, Any]) -> None:
    b = result["timing"]
    env = result["environment"]
    table = Table(
        title=f"{result['model']}  variant {result['variant']}  {b['backend'] if b['backend'] == 'ort' else b['prep']}",
        caption=(f"batch {b['batch_size']}, input {'x'.join(map(str, b['input_size']))}, {b['device']}, "
                 f"{b['threads']} thread(s)"),
    )
    name_column(table, "model")
    number_columns(table, "params", "MACs", "median ms", "p90 ms", "samples/s")
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
    unavailable: Dict[str, str] = {}
    for name, info in b.get("auto", {}).items():
        candidates = info["candidates"]
        unavailable.update({n: c["unavailable"] for n, c in candidates.items() if "unavailable" in c})
        tried = ", ".join(f"{n} {c['median_ms']:.2f} ms" if "median_ms" in c
                          else f"{n} (= {c['same_as']})" if "same_as" in c
                          else f"{n} (failed)"
                          for n, c in candidates.items() if "unavailable" not in c)
        how = "cached choice" if info.get("cached") else "measured"
        console.info(f"{name}: {b['preps'][name]['name']} ({how}; {tried})", style="dim")
    for name, reason in unavailable.items():  # the same for both models: once each
        console.info(f"Not measured, unavailable here: {name}: {reason}.")
    console.info(f"{b['original']['runs']} interleaved runs after warm-up; torch {env['torch']}, {env['cpu']}.", style="dim")


@click.command()
@click.argument("spec_or_dir", metavar="SPEC_OR_DIR", type=TEXT)
@surgery_options("variant", "kernel_sizes", "p", "with_bn", "allow_growth", note="model spec only")
@num_classes_option
@pretrained_option
@weights_option
@model_args_option
@trust_code_option
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--input-size", type=TEXT, default=None, metavar="C,H,W",
              help="Input size: C,H,W (C,T,H,W for video models); default: the model's own, or the one in surgery.json.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--prep", "prep_name", type=click.Choice([AUTO, *PREPARATIONS.names()]), default=None,
              help="Preparation of both models (default: auto, the fastest measured for each model on this machine; "
                   "the choice is cached): eager, fused (BatchNorm folded), channels_last, compiled (inductor), "
                   "aot (AOTInductor, BSConv steps lowered), aot_conv (AOTInductor, BSConv steps as oneDNN convs), "
                   "ort (fused, exported to ONNX, run in ONNX Runtime).")
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
@threads_option
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed calls per model first.")
@click.option("--runs", type=click.IntRange(min=1), default=30, show_default=True, help="Timed, interleaved calls per model.")
@click.option("--max-seconds", type=click.FloatRange(min=0), default=None, help="Stop timing early after this long (at least 5 runs).")
@memory_check_option
@json_option
def benchmark(spec_or_dir, variant, kernel_sizes, p, with_bn, allow_growth, num_classes, pretrained, weights, model_args,
              trust_code, batch_size,
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
        preps.resolve_preparation(n, "candidate")
    if flags:
        prep = library.PrepOptions(fuse=fuse, channels_last=channels_last, compile=compile_ or aot, aot=aot,
                           lower=(compile_ or aot) if lower is None else lower)
    else:
        prep = prep_name or AUTO
    compiling = compile_ or aot or prep in ("compiled", "aot") or (prep == AUTO and backend != "ort")
    if device == "cuda" and not torch.cuda.is_available():
        raise SurgeryError("--device cuda was asked for, but torch sees no CUDA device here.")
    if (compile_ or aot or prep in ("compiled", "aot", "aot_conv")) and device == "cpu" and not compiled.compiler_available():
        raise SurgeryError("--compile, --aot and --prep compiled/aot/aot_conv on CPU need a C++ compiler (g++ or clang++) "
                           f"on PATH; {compiled.COMPILER_HINT}, or choose another preparation.")
    if prep == "ort":
        reason = preps.resolve_preparation("ort").unavailable(torch.device(device))
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
        label, original, converted, inputs, extra = _from_dir(path, input_size, trust_code)
        macs_before, macs_after = extra["macs"].get("before"), extra["macs"].get("after")
        variant = extra["variant"]
        if not no_memory_check:
            memory.check_memory(original, inputs, batch=batch_size, device=device,
                                what=f"{arg('input_size')} or {arg('batch_size')}")
    else:
        options = options_from(variant, kernel_sizes=kernel_sizes, p=p, with_bn=with_bn, allow_growth=allow_growth)
        original, inputs = load_source(spec_or_dir, num_classes, None, input_size, pretrained, weights, model_args)
        label = zoo.model_source(original).spec
        if not no_memory_check:
            memory.check_memory(original, inputs, batch=batch_size, device=device,
                                what=f"{arg('input_size')} or {arg('batch_size')}")
        result = surgery.convert(copy.deepcopy(original), options, example_inputs=inputs, memory_check=False)
        converted = result.model
        macs_before, macs_after = result.report.macs_before, result.report.macs_after
        extra = {}
    if macs_before is None:
        macs_before = _macs(original, inputs)
    if macs_after is None:
        macs_after = _macs(converted, inputs)
    params = {"original": counting.count_params(original), "converted": counting.count_params(converted)}
    console.info(f"Timing {label} (original and converted, interleaved) ...")
    timing = library.benchmark(
        original, converted, inputs, batch_size=batch_size, device=device,
        prep=prep, backend=backend, candidates=names, cache=not no_cache,
        log=None if as_json else (lambda m: console.info(m, style="dim")),
        warmup=warmup, runs=runs, max_seconds=max_seconds, copy_models=False,
    )
    warning = library.busy_warning() if device == "cpu" else None
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
        "environment": library.environment(),
    }
    if warning:
        out["warning"] = warning
    if as_json:
        console.print_json(out)
        return
    _render(out)
    if warning:
        console.warn(warning)
