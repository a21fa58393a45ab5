"""Export of a (converted) model and checks of the exported one against eager PyTorch:
``export_onnx`` / ``onnx_parity`` (onnx, onnxruntime, onnxscript: dependencies, imported lazily),
``export_program`` (``torch.export``) and ``compile_aot`` (an AOTInductor ``.pt2`` package).

``export_model`` (``export_converted`` for a ``ConversionResult``) is what ``bsconv-surgery
export`` runs: BatchNorm folded on a copy, an ONNX file or a ``torch.export`` program (``.pt2``,
``torch.export.save``) written beside its name, loaded back and compared with the eager model on
random inputs at several batch sizes, and renamed into place only when it matches."""

from __future__ import annotations

import copy
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..core.bounds import bounded_number, flag
from ..core.errors import SurgeryError, arg, describe_exception
from ..io.files import atomic_file, check_new_file
from ..models.inputs import ExampleInputs, Inputs, tensors_in
from ..models.zoo import example_inputs_for
from ..passes.batchnorm import fold_batchnorm
from .compiled import COMPILER_HINT, compiler_available

__all__ = ["export_onnx", "onnx_parity", "export_program", "compile_aot", "relative_error", "INSTALL_HINT",
           "FORMATS", "EXPORT_TOLERANCE", "ExportReport", "export_model", "export_converted", "export_unavailable",
           "program_parity", "traced_batch"]

#: What to run when onnx, onnxruntime or onnxscript cannot be imported (they are dependencies,
#: so only an install without dependencies, or a broken one, lacks them).
INSTALL_HINT = ("onnx, onnxruntime and onnxscript are dependencies of bsconv-surgery; install them with: "
                "pip install onnx onnxruntime onnxscript")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |a - e| / max |e|`` (the scale-free error used by the parity checks)."""
    actual = torch.as_tensor(actual).detach().to(torch.float64)
    expected = torch.as_tensor(expected).detach().to(torch.float64)
    denom = expected.abs().max().clamp_min(1e-12)
    return float((actual - expected).abs().max() / denom)


def _onnxscript_available() -> bool:
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def _names(stem: str, count: int) -> List[str]:
    """``["input"]`` for one, ``["input0", "input1"]`` for two."""
    return [stem] if count == 1 else [f"{stem}{i}" for i in range(count)]


def export_onnx(
    model: nn.Module,
    path: Union[str, Path],
    example_input: Any,
    *,
    dynamo: Optional[bool] = None,
    dynamic_batch: bool = True,
    opset_version: Optional[int] = None,
) -> Path:
    """Export ``model`` (in eval mode) to ONNX at ``path``, input ``input``, output ``output``
    (``input0``, ``input1``, ... and ``output0``, ... when ``example_input`` is a tuple of several
    tensors or the model returns several).

    ``dynamo=None`` uses the torch.export-based exporter when ``onnxscript`` is installed and
    the TorchScript-based one otherwise. ``dynamic_batch`` makes the batch dimension symbolic
    (of every input and output).

    >>> import tempfile, torch, onnxruntime, bsconv_surgery as bs
    >>> net = torch.nn.Sequential(bs.BSConvU(3, 8, 3), torch.nn.ReLU())
    >>> with tempfile.TemporaryDirectory() as out:
    ...     path = bs.export_onnx(net, out + "/net.onnx", torch.randn(1, 3, 16, 16))
    ...     session = onnxruntime.InferenceSession(str(path))
    >>> x = torch.randn(4, 3, 16, 16)  # another batch size: the batch dimension is symbolic
    >>> torch.allclose(torch.from_numpy(session.run(None, {"input": x.numpy()})[0]), net(x), atol=1e-5)
    True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dynamo is None:
        dynamo = _onnxscript_available()
    model.eval()
    args = _as_args(example_input)
    with torch.no_grad():
        outputs = len(tensors_in(model(*args)))
    inputs, names = _names("input", len(args)), _names("output", max(outputs, 1))
    kwargs: Dict[str, Any] = {"input_names": inputs, "output_names": names, "dynamo": dynamo}
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    if dynamic_batch:
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
            kwargs["dynamic_shapes"] = tuple({0: batch} for _ in args)
        else:
            kwargs["dynamic_axes"] = {name: {0: "batch"} for name in (*inputs, *names)}
    if dynamo:
        kwargs["verbose"] = False
        kwargs["external_data"] = False
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, args, str(path), **kwargs)
    except ImportError as exc:
        raise SurgeryError(
            f"ONNX export needs onnx and onnxscript ({exc}). {INSTALL_HINT}"
        ) from exc
    return path


def _worst_error(actual: Sequence[Any], expected: Any, what: str) -> float:
    """The largest ``relative_error`` over the output tensors (``tensors_in`` order); NaN (which no
    tolerance accepts) when an output is NaN."""
    want = tensors_in(expected)
    if len(actual) != len(want):
        raise SurgeryError(f"{what} gives {len(actual)} output tensor(s) where the model gives {len(want)}.")
    worst = 0.0
    for a, e in zip(actual, want):
        a = torch.as_tensor(a)
        if tuple(a.shape) != tuple(e.shape):
            raise SurgeryError(f"{what} gives an output of shape {tuple(a.shape)} where the model gives "
                               f"{tuple(e.shape)}.")
        worst = max(worst, relative_error(a, e), key=_nan_first)
    return worst


def onnx_parity(model: nn.Module, path: Union[str, Path], inputs: Sequence[Any]) -> float:
    """Run the ONNX file at ``path`` in onnxruntime (CPU) on each input (a tensor, or a tuple of
    the model's tensor arguments); return the largest relative error against eager ``model`` over
    every output tensor."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise SurgeryError(f"Checking an ONNX export needs onnxruntime ({exc}). {INSTALL_HINT}") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
    model.eval()
    for x in inputs:
        args = _as_args(x)
        with torch.no_grad():
            expected = model(*args)
        feed = {name: a.detach().cpu().numpy() for name, a in zip(names, args)}
        actual = [torch.from_numpy(o) for o in session.run(None, feed)]
        worst = max(worst, _worst_error(actual, expected, f"The ONNX file '{path}'"), key=_nan_first)
    return worst


def program_parity(model: nn.Module, path: Union[str, Path], inputs: Sequence[Any]) -> float:
    """Load the ``torch.export`` program saved at ``path`` (``torch.export.load``) and run it on
    each input (a tensor or a tuple of arguments); return the largest relative error against
    eager ``model`` over every output tensor."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.export.load(str(path)).module()
    worst = 0.0
    model.eval()
    for x in inputs:
        args = _as_args(x)
        with torch.no_grad():
            expected, actual = model(*args), loaded(*args)
        worst = max(worst, _worst_error(tensors_in(actual), expected, f"The program '{path}'"), key=_nan_first)
    return worst


def _nan_first(error: float) -> float:
    """``max`` key: NaN (an output that is not finite) beats every number."""
    return float("inf") if error != error else error


def _as_args(example_input: Any) -> tuple:
    """A model's example arguments: one tensor, or a tuple of them (two images for optical flow)."""
    return example_input if isinstance(example_input, tuple) else (example_input,)


#: The largest batch a dynamic-batch export takes.
MAX_BATCH = 4096


def export_program(model: nn.Module, example_input: Any, dynamic_batch: bool = False):
    """``torch.export.export`` of ``model`` in eval mode (an ``ExportedProgram``); ``example_input``
    is a tensor or a tuple of arguments (each tensor's first dimension is the batch)."""
    model.eval()
    args = _as_args(example_input)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    dynamic_shapes = tuple({0: batch} for _ in args) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.export.export(model, args, dynamic_shapes=dynamic_shapes)


def compile_aot(
    model: nn.Module,
    example_input: Any,
    package_path: Optional[Union[str, Path]] = None,
    *,
    dynamic_batch: bool = False,
    options: Optional[Dict[str, Any]] = None,
):
    """Compile ``model`` ahead of time with AOTInductor and return the loaded package.

    The model is exported (``export_program``), compiled with its weights frozen into a
    ``.pt2`` package (written atomically to ``package_path``; to a temporary file when that is
    ``None``) and loaded back: a callable that runs without dynamo's guards or a Python
    wrapper, and the package loads in C++ (``torch::inductor::AOTIModelPackageLoader``) too.
    Prepare the model first (``prepare_for_inference(model, channels_last=True, lower=True)``
    and a channels_last ``example_input``); the input shape is fixed unless ``dynamic_batch``.
    """
    # AOTInductor: compile-only machinery, imported when a model is compiled ahead of time
    import torch._inductor
    import torch._inductor.config as inductor_config

    if _as_args(example_input)[0].device.type == "cpu" and not compiler_available():
        raise SurgeryError(f"AOTInductor on CPU needs a C++ compiler (g++ or clang++) on PATH; {COMPILER_HINT}.")
    settings = {"freezing": True, **(options or {})}
    # freezing applies only with grad disabled, during the export and the compile alike
    with tempfile.TemporaryDirectory(prefix="bsconv-aoti-") as tmp, torch.no_grad():
        try:
            program = export_program(model, example_input, dynamic_batch=dynamic_batch)
        except Exception as exc:
            raise SurgeryError(
                f"torch.export could not capture {type(model).__name__} for AOTInductor "
                f"({describe_exception(exc)}); use torch.compile (--compile) instead."
            ) from exc
        target = Path(package_path) if package_path is not None else Path(tmp) / "model.pt2"
        with atomic_file(target) as partial, inductor_config.patch(freezing=settings.pop("freezing")), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch._inductor.aoti_compile_and_package(program, package_path=str(partial), inductor_configs=settings)
        return torch._inductor.aoti_load_package(str(target))


# -- bsconv-surgery export -------------------------------------------------------------------------

#: What ``export_model`` writes: an ONNX file, or a ``torch.export`` program (``torch.export.save``).
FORMATS = ("onnx", "pt2")

#: The largest relative error (``relative_error``: max |exported - eager| / max |eager|, per output
#: tensor) ``export_model`` accepts for a float32 model. Folding BatchNorm into the conv weights
#: and the runtime's own kernels reorder float32 sums of thousands of products per output (unit
#: roundoff 6e-8): that moved the outputs of resnet18 (BSConv-U), mobilenetv2_100 (BSConv-S) and
#: efficientnet_b0 (BSConv-U) with random BatchNorm statistics by 2e-7 to 3e-6 at 224x224, ONNX and
#: pt2 alike (docs/guide/inference.md). An export that computes something else (a BatchNorm dropped,
#: a wrong padding or layout, a branch traced for one batch size) is off by 1e-2 or more. 1e-4
#: leaves more than an order of magnitude on either side; half-precision models need a looser one.
EXPORT_TOLERANCE = 1e-4

#: The batch sizes of the parity inputs of a dynamic-batch export: 1, the traced 2 and one never
#: seen (a static-batch export is checked on three inputs of its one batch).
DYNAMIC_PARITY_BATCHES = (1, 2, 3)
STATIC_PARITY_INPUTS = 3


@dataclass
class ExportReport:
    """What ``export_model`` wrote: the file (``format``, ``path``, ``size_bytes``), how it is fed
    (``inputs``; ``dynamic_batch``: any batch from 1 to 4096, else only ``batch``, the traced
    example's), the BatchNorms folded, and its parity: the largest relative error against the
    eager model (``parity``) on random inputs of ``parity_batches``, and the ``tolerance``."""

    format: str
    path: Path
    size_bytes: int
    inputs: ExampleInputs
    dynamic_batch: bool
    batch: int
    parity: float
    parity_batches: Tuple[int, ...]
    tolerance: float
    folded: int
    outputs: int

    @property
    def within_tolerance(self) -> bool:
        return self.parity <= self.tolerance  # NaN: False

    def to_json(self) -> Dict[str, Any]:
        return {
            "format": self.format, "file": str(self.path), "bytes": self.size_bytes, **self.inputs.to_json(),
            "batch": {"dynamic": self.dynamic_batch, "traced": self.batch,
                      **({"max": MAX_BATCH} if self.dynamic_batch else {})},
            "outputs": self.outputs, "batchnorms_folded": self.folded,
            "parity": {"max_relative_error": None if self.parity != self.parity else self.parity,
                       "tolerance": self.tolerance, "batches": list(self.parity_batches),
                       "within_tolerance": self.within_tolerance},
        }


def export_unavailable(format: str) -> Optional[str]:
    """Why ``format`` cannot be exported and checked here (one line with what to install), or ``None``."""
    if format != "onnx":
        return None
    missing, errors = [], []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError as exc:
            missing.append(name)
            errors.append(str(exc))
    if not missing:
        return None
    needs = " and ".join(missing)
    return f"Exporting to ONNX needs {needs}, which cannot be imported here ({errors[0]}). {INSTALL_HINT}"


def _check_format(format: Any) -> str:
    if format not in FORMATS:
        raise SurgeryError(f"Unknown format {str(format)[:40]!r}: expected one of {', '.join(FORMATS)}.",
                           argument="format")
    return format


def traced_batch(batch: Any, dynamic_batch: bool) -> int:
    """The traced example's batch: default 2 with a dynamic batch (``torch.export`` takes a traced
    batch of 1 for a constant), else 1."""
    if batch is None:
        return 2 if dynamic_batch else 1
    batch = bounded_number(batch, "batch", integer=True, low=1, high=MAX_BATCH)
    if dynamic_batch and batch < 2:
        raise SurgeryError(f"A dynamic batch is traced on 2 or more samples (torch.export fixes a traced batch of 1 "
                           f"as a constant): give {arg('batch')} 2 or more, or export a fixed batch of 1 with "
                           f"{arg('dynamic_batch=False')}.")
    return batch


def _float_dtype(model: nn.Module) -> Optional[torch.dtype]:
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return param.dtype if param is not None else None


def _tensor_args(args: tuple, inputs: ExampleInputs) -> tuple:
    if not all(isinstance(a, torch.Tensor) for a in args):
        raise SurgeryError(f"Export takes models fed tensors; a {inputs.name} model is fed "
                           f"{', '.join(type(a).__name__ for a in args)}.")
    return args


def _write(format: str, model: nn.Module, args: tuple, path: Path, dynamic_batch: bool) -> None:
    """``model`` exported to ``path`` (ONNX, or a ``torch.export`` program saved with ``torch.export.save``)."""
    try:
        if format == "onnx":
            export_onnx(model, path, args, dynamic_batch=dynamic_batch)
        else:
            with torch.no_grad():
                program = export_program(model, args, dynamic_batch=dynamic_batch)
            torch.export.save(program, str(path))
    except (SurgeryError, OSError):
        raise
    except Exception as exc:
        hint = (f"; a model whose code fixes its batch size exports with {arg('dynamic_batch=False')}"
                if dynamic_batch else "")
        raise SurgeryError(f"Could not export {type(model).__name__} to {format} ({describe_exception(exc)})"
                           f"{hint}.") from None


def export_model(
    model: nn.Module,
    path: Union[str, Path],
    format: str = "onnx",
    example_inputs: Inputs = None,
    *,
    dynamic_batch: bool = True,
    batch: Optional[int] = None,
    tolerance: float = EXPORT_TOLERANCE,
    force: bool = False,
) -> ExportReport:
    """Export ``model`` for deployment to ``path``: ``format`` ``"onnx"`` or ``"pt2"`` (a
    ``torch.export`` program, ``torch.export.save``; load it with ``torch.export.load``).

    A CPU copy of the model in eval mode gets its BatchNorms folded (``fold_batchnorm``) and is
    exported on ``example_inputs`` (an ``ExampleInputs``, a size such as ``"3,224,224"``, or the
    model's own arguments; default: the model's own input size), ``batch`` samples (default 2;
    with ``dynamic_batch=False``, 1). The batch dimension is dynamic (1 to 4096) unless
    ``dynamic_batch=False``. The file is written beside ``path``, loaded back (onnxruntime, or
    ``torch.export.load``) and compared with the unfolded eval model on three random inputs (of
    batch 1, 2 and 3; a fixed batch: three of it): when the largest relative error is above
    ``tolerance`` (``EXPORT_TOLERANCE``, 1e-4) nothing is written, unless ``force``. An existing
    ``path`` is replaced only with ``force``. ``model`` itself is not changed.

    >>> import tempfile, torch, bsconv_surgery as bs
    >>> from bsconv_surgery.inference.export import export_model
    >>> net = torch.nn.Sequential(bs.BSConvU(3, 8, 3, with_bn=True), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    >>> with tempfile.TemporaryDirectory() as out:
    ...     report = export_model(net, out + "/net.pt2", "pt2", "3,16,16")
    ...     program = torch.export.load(out + "/net.pt2").module()
    >>> report.folded, report.parity < 1e-6, report.parity_batches
    (2, True, (1, 2, 3))
    >>> x = torch.randn(5, 3, 16, 16)
    >>> torch.allclose(program(x), net.eval()(x), atol=1e-5)
    True
    """
    format = _check_format(format)
    dynamic_batch, force = flag(dynamic_batch, "dynamic_batch"), flag(force, "force")
    tolerance = bounded_number(tolerance, "tolerance", low=0)
    batch = traced_batch(batch, dynamic_batch)
    missing = export_unavailable(format)
    if missing:
        raise SurgeryError(missing)
    inputs = example_inputs_for(model, example_inputs)
    target = check_new_file(path, "Export", force)
    reference = copy.deepcopy(model).cpu().eval()
    dtype = _float_dtype(reference)
    example = _tensor_args(inputs.make(batch, dtype=dtype), inputs)
    try:
        with torch.no_grad():
            outputs = len(tensors_in(reference(*example)))
    except Exception as exc:
        raise SurgeryError(f"{type(model).__name__} does not run on {batch} example input(s) of {inputs.label} "
                           f"({describe_exception(exc)}); give the input size it takes "
                           f"({arg('example_inputs')}).") from None
    deployed = copy.deepcopy(reference)
    folded = len(fold_batchnorm(deployed).folded)
    batches = DYNAMIC_PARITY_BATCHES if dynamic_batch else (batch,) * STATIC_PARITY_INPUTS
    probes = [inputs.make(b, generator=torch.Generator().manual_seed(1 + i), dtype=dtype)
              for i, b in enumerate(batches)]
    with atomic_file(target) as partial:
        _write(format, deployed, example, partial, dynamic_batch)
        parity = (onnx_parity if format == "onnx" else program_parity)(reference, partial, probes)
        report = ExportReport(format, target, partial.stat().st_size, inputs, dynamic_batch, batch, parity,
                              tuple(batches), tolerance, folded, outputs)
        if not report.within_tolerance and not force:
            error = "not a number (NaN)" if parity != parity else f"{parity:.2e}"
            hint = (f" A model whose code depends on the batch size exports with {arg('dynamic_batch=False')}."
                    if dynamic_batch else "")
            raise SurgeryError(
                f"The {format} export of {type(model).__name__} does not compute what the model computes: the largest "
                f"relative error on {len(batches)} random inputs (batches {', '.join(map(str, batches))}) is {error}, "
                f"above the tolerance {tolerance:g}. '{target}' was not written; pass {arg('force=True')} to write it "
                f"anyway.{hint}")
    return report


def export_converted(result: Any, path: Union[str, Path], format: str = "onnx", **kwargs: Any) -> ExportReport:
    """``export_model`` of a ``ConversionResult`` (``convert``, ``load_converted``) at the input
    size it was converted for (``example_inputs=`` to change it); see ``export_model`` for the
    options (``dynamic_batch``, ``batch``, ``tolerance``, ``force``).

    >>> import tempfile, torch, bsconv_surgery as bs
    >>> result = bs.convert(bs.load_model("timm:test_resnet", num_classes=3), "u", example_inputs=(3, 32, 32))
    >>> with tempfile.TemporaryDirectory() as out:
    ...     report = bs.export_converted(result, out + "/model.onnx")
    >>> report.format, report.inputs.size, report.dynamic_batch, report.within_tolerance, report.size_bytes > 0
    ('onnx', (3, 32, 32), True, True, True)
    """
    kwargs.setdefault("example_inputs", result.inputs)
    return export_model(result.model, path, format, **kwargs)
