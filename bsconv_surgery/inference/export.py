"""Export of a (converted) model and checks of the exported one against eager PyTorch:
``export_onnx`` / ``onnx_parity`` (onnx, onnxruntime, onnxscript: dependencies, imported lazily),
``export_program`` (``torch.export``) and ``compile_aot`` (an AOTInductor ``.pt2`` package)."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch
from torch import nn

from ..core.errors import SurgeryError, describe_exception
from ..io.files import atomic_file
from .compiled import COMPILER_HINT, compiler_available

__all__ = ["export_onnx", "onnx_parity", "export_program", "compile_aot", "relative_error", "INSTALL_HINT"]

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


def export_onnx(
    model: nn.Module,
    path: Union[str, Path],
    example_input: torch.Tensor,
    *,
    dynamo: Optional[bool] = None,
    dynamic_batch: bool = True,
    opset_version: Optional[int] = None,
) -> Path:
    """Export ``model`` (in eval mode) to ONNX at ``path``, input ``input``, output ``output``.

    ``dynamo=None`` uses the torch.export-based exporter when ``onnxscript`` is installed and
    the TorchScript-based one otherwise. ``dynamic_batch`` makes the batch dimension symbolic.

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
    kwargs: Dict[str, Any] = {"input_names": ["input"], "output_names": ["output"], "dynamo": dynamo}
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    if dynamic_batch:
        if dynamo:
            kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=4096)},)
        else:
            kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    if dynamo:
        kwargs["verbose"] = False
        kwargs["external_data"] = False
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example_input,), str(path), **kwargs)
    except ImportError as exc:
        raise SurgeryError(
            f"ONNX export needs onnx and onnxscript ({exc}). {INSTALL_HINT}"
        ) from exc
    return path


def onnx_parity(model: nn.Module, path: Union[str, Path], inputs: Sequence[torch.Tensor]) -> float:
    """Run the ONNX file at ``path`` in onnxruntime (CPU) on each input; return the largest
    relative error against eager ``model``."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise SurgeryError(f"Checking an ONNX export needs onnxruntime ({exc}). {INSTALL_HINT}") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    worst = 0.0
    model.eval()
    for x in inputs:
        with torch.no_grad():
            expected = model(x)
        (actual,) = session.run(None, {name: x.detach().cpu().numpy()})[:1]
        worst = max(worst, relative_error(torch.from_numpy(actual), expected))
    return worst


def _as_args(example_input: Any) -> tuple:
    """A model's example arguments: one tensor, or a tuple of them (two images for optical flow)."""
    return example_input if isinstance(example_input, tuple) else (example_input,)


def export_program(model: nn.Module, example_input: Any, dynamic_batch: bool = False):
    """``torch.export.export`` of ``model`` in eval mode (an ``ExportedProgram``); ``example_input``
    is a tensor or a tuple of arguments (each tensor's first dimension is the batch)."""
    model.eval()
    args = _as_args(example_input)
    batch = torch.export.Dim("batch", min=1, max=4096)
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
