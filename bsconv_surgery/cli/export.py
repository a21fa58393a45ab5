"""``bsconv-surgery export``: a converted model, or a train run's best checkpoint, as an ONNX file or a
``torch.export`` program, checked against PyTorch before it is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import click
from rich import box
from rich.table import Table

from ..core.errors import SurgeryError
from .console import console
from .format import name_column
from .lazy import lazy_module
from .options import TEXT, json_option, path, trust_code_option

exporting = lazy_module("bsconv_surgery.inference.export")
files = lazy_module("bsconv_surgery.io.files")
inputs_module = lazy_module("bsconv_surgery.models.inputs")
saving = lazy_module("bsconv_surgery.io.saving")
surgery = lazy_module("bsconv_surgery.surgery")
trained = lazy_module("bsconv_surgery.training.trained")
zoo = lazy_module("bsconv_surgery.models.zoo")

#: ``inference/export.py: FORMATS`` (here as text: ``--help`` imports no torch; a test checks they agree).
FORMATS = ("onnx", "pt2")


def _kind(folder: Path) -> str:
    """``converted`` (a ``convert --out`` folder) or ``run`` (a ``train`` run folder); else an error."""
    files.recover_swap(folder)  # a kill while convert/train --force replaced it
    what = "RUN_OR_DIR is a folder written by 'bsconv-surgery convert --out' or by 'bsconv-surgery train'"
    if not folder.exists():
        raise SurgeryError(f"'{folder}' does not exist: {what}.")
    if not folder.is_dir():
        raise SurgeryError(f"'{folder}' is a file: {what}.")
    if (folder / "surgery.json").is_file():
        return "converted"
    if trained.is_run_folder(folder):
        return "run"
    raise SurgeryError(f"'{folder}' is neither a folder written by 'bsconv-surgery convert --out' (surgery.json, "
                       "model.safetensors) nor a run folder written by 'bsconv-surgery train' (best.pt).")


def _load(folder: Path, kind: str, trust_code: bool) -> Tuple[Any, Any, Dict[str, Any]]:
    """``(model, example inputs, what it is)`` of a converted folder or a run folder (its best.pt)."""
    if kind == "converted":
        if saving.read_surgery_json(folder).source.spec is None:
            raise SurgeryError(f"'{folder}' holds a module converted in Python without a spec to rebuild it from; "
                               f"export it in Python: bs.export_converted(bs.load_converted('{folder}', "
                               "model=your_module), 'model.onnx').")
        result = surgery.load_converted(folder, trust_code=trust_code)
        model = f"{result.source.spec}, variant {result.options.variant}"
        return result.model, result.inputs, {"kind": kind, "folder": str(folder), "model": model}
    run = trained.load_trained(folder, trust_code=trust_code)
    return run.model, run.inputs, {"kind": kind, "folder": str(folder), "model": run.description,
                                   "checkpoint": str(run.checkpoint), "epoch": run.epoch, "val_acc": run.val_acc}


def _target(folder: Path, out: Optional[str], format: str) -> Path:
    """``--out``, or ``RUN_OR_DIR/model.FORMAT``; an ``--out`` that names the other format is refused."""
    if out is None:
        return folder / f"model.{format}"
    target = Path(out)
    other = {f".{f}" for f in FORMATS} - {f".{format}"}
    if target.suffix.lower() in other:
        raise SurgeryError(f"--out '{target}' ends in {target.suffix} but --format is {format}; name the file "
                           f"model.{format}, or pass --format {target.suffix[1:].lower()}.")
    return target


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


def _render(source: Dict[str, Any], report) -> None:
    table = Table(title="Export", box=box.SIMPLE_HEAVY, show_header=False)
    name_column(table, style="bold")
    name_column(table)  # a long path or model description folds, never cut
    model = source["model"]
    if source["kind"] == "run":
        score = f", val {100 * source['val_acc']:.2f}%" if source.get("val_acc") is not None else ""
        model += f"; trained: {Path(source['checkpoint']).name} of epoch {source['epoch']}{score}"
    batch = ("dynamic (1 to 4096)" if report.dynamic_batch else f"{report.batch} only")
    error = "NaN" if report.parity != report.parity else f"{report.parity:.2e}"
    checked = "onnxruntime" if report.format == "onnx" else "torch.export.load"
    rows = [
        ("format", "onnx" if report.format == "onnx" else "pt2 (torch.export program)"),
        ("file", str(report.path)),
        ("size", _size(report.size_bytes)),
        ("model", model),
        ("input", f"{report.inputs.label} ({report.inputs.name}), batch {batch}"),
        ("outputs", str(report.outputs)),
        ("BatchNorms folded", str(report.folded)),
        ("parity", f"max relative error {error} ({checked} vs PyTorch, batches "
                   f"{', '.join(map(str, report.parity_batches))}; tolerance {report.tolerance:g})"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)


@click.command()
@click.argument("run_or_dir", metavar="RUN_OR_DIR", type=path())
@click.option("--format", "format_", type=click.Choice(FORMATS), default="onnx", show_default=True,
              help="onnx (checked in onnxruntime) or pt2 (a torch.export program, torch.export.save; load it with "
                   "torch.export.load).")
@click.option("--out", type=path(dir_okay=False), default=None, metavar="FILE",
              help="The file to write (default RUN_OR_DIR/model.onnx or model.pt2); an existing one needs --force.")
@click.option("--force", is_flag=True, help="Replace an existing --out, and write the file even when its parity is "
              "above the tolerance.")
@click.option("--input-size", type=TEXT, default=None, metavar="C,H,W",
              help="Input size (default: the one in surgery.json; for a run folder, the training image size).")
@click.option("--batch", type=click.IntRange(min=1, max=4096), default=None,
              help="Samples in the traced example (default 2); with --static-batch the one batch the file takes "
                   "(default 1).")
@click.option("--static-batch", is_flag=True, help="A fixed batch (--batch) instead of a dynamic one (1 to 4096).")
@click.option("--tolerance", type=click.FloatRange(min=0), default=None,
              help="The largest relative error against PyTorch a file may have to be written (default 1e-4).")
@trust_code_option
@json_option
def export(run_or_dir, format_, out, force, input_size, batch, static_batch, tolerance, trust_code, as_json):
    """Export RUN_OR_DIR for deployment: a folder written by 'convert --out', or a 'train' run folder
    (its best.pt, the model rebuilt as the run built it). BatchNorm is folded into the convs, the
    batch dimension is dynamic unless --static-batch, and the input size is the one the model was
    converted (or trained) at unless --input-size. The file is written beside its name, loaded back
    (onnxruntime, torch.export.load) and compared with the PyTorch model on three random inputs
    (batches 1, 2 and 3); a file whose largest relative error is above --tolerance is not written,
    unless --force."""
    missing = exporting.export_unavailable(format_)
    if missing:
        raise SurgeryError(missing)
    exporting.traced_batch(batch, not static_batch)
    size = zoo.parse_input_size(input_size) if input_size else None
    folder = Path(run_or_dir)
    kind = _kind(folder)
    target = _target(folder, out, format_)
    files.check_new_file(target, "Export", force)  # before the model is built
    model, inputs, source = _load(folder, kind, trust_code)
    if size:
        inputs = inputs_module.ExampleInputs.of(inputs.family, size, source["model"])
    if not as_json:
        console.info(f"Exporting {source['model']} to {target} ...")
    report = exporting.export_model(
        model, target, format_, inputs, dynamic_batch=not static_batch, batch=batch, force=force,
        **({"tolerance": tolerance} if tolerance is not None else {}))
    if as_json:
        console.print_json({"source": source, **report.to_json()})
        return
    _render(source, report)
    if not report.within_tolerance:
        console.warn(f"Written with --force although its parity is above the tolerance {report.tolerance:g}: the "
                     "file does not compute what the model computes.")
