"""ONNX Runtime as a preparation (``ort`` in ``preps.py``) and as the benchmark's backend: a model
exported with ``export_onnx`` (BatchNorm folded first by the caller), an ``InferenceSession``
with as many intra-op threads as torch uses (``ort_session``), wrapped in ``OrtModule``: an
eval-only ``nn.Module`` that takes and returns torch tensors. onnxruntime is a dependency,
imported lazily (it takes a while)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..core.errors import SurgeryError, describe_exception
from ..core.options import bounded_threads
from .export import INSTALL_HINT, export_onnx, relative_error

__all__ = ["OrtModule", "ort_module", "ort_session", "onnxruntime_version", "ort_unavailable", "INSTALL_HINT",
           "PARITY_TOLERANCE"]

#: An export whose output differs more than this (relative, ``relative_error``) from the model's is refused.
PARITY_TOLERANCE = 1e-3


def onnxruntime_version() -> Optional[str]:
    """The installed onnxruntime's version, or ``None`` when it cannot be imported."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return str(getattr(onnxruntime, "__version__", "unknown"))


def ort_unavailable() -> Optional[str]:
    """Why ONNX Runtime cannot run here (with the install hint), or ``None``."""
    if onnxruntime_version() is None:
        return f"onnxruntime is not installed. {INSTALL_HINT}"
    return None


def ort_session(path: Union[str, Path], threads: Optional[int] = None) -> Any:
    """An ONNX Runtime CPU session for the model at ``path`` with ``threads`` intra-op threads
    (default: torch's count), one inter-op thread, sequential execution, all graph optimisations."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise SurgeryError(f"ONNX Runtime is needed here but onnxruntime is not installed ({exc}). "
                           f"{INSTALL_HINT}") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads() if threads is None else bounded_threads(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


class OrtModule(nn.Module):
    """An ONNX Runtime session run like an eval-mode module on one CPU tensor: it returns a
    tensor, or a tuple of tensors when the exported model returned a tuple (or list).

    Inference only: a call in training mode or with an input that requires grad is an error
    (no gradient flows through ONNX Runtime). With ``dynamic_batch`` any batch size runs;
    otherwise only ``batch_size`` (the export's)."""

    def __init__(self, session: Any, *, tuple_output: bool, dynamic_batch: bool, batch_size: int,
                 threads: int) -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.tuple_output = tuple_output
        self.dynamic_batch = dynamic_batch
        self.batch_size = batch_size
        self.threads = threads
        self.eval()

    def extra_repr(self) -> str:
        batch = "dynamic batch" if self.dynamic_batch else f"batch {self.batch_size} only"
        return f"onnxruntime, {batch}, {self.threads} intra-op thread(s)"

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        if self.training:
            raise SurgeryError("OrtModule runs ONNX Runtime for inference only and cannot train (no gradients flow "
                               "through it); call .eval(), or train the PyTorch model and prepare it again.")
        if not isinstance(x, torch.Tensor):
            raise SurgeryError(f"OrtModule takes one tensor, not {type(x).__name__}.")
        if x.requires_grad:
            raise SurgeryError("OrtModule got an input that requires grad: ONNX Runtime computes no gradients. "
                               "Run it under torch.inference_mode() or torch.no_grad() on a detached input.")
        if x.device.type != "cpu":
            raise SurgeryError(f"OrtModule runs on CPU; move the input from {x.device} to the CPU first.")
        if not self.dynamic_batch and x.shape[0] != self.batch_size:
            raise SurgeryError(f"This ONNX export has a fixed batch of {self.batch_size} (the dynamic-batch export "
                               f"failed), so it cannot run a batch of {x.shape[0]}; prepare the model again with an "
                               "example input of that batch size.")
        outputs = self.session.run(None, {self.input_name: x.detach().contiguous().numpy()})
        tensors = tuple(torch.from_numpy(o) for o in outputs)
        return tensors if self.tuple_output else tensors[0]


def _output_structure(output: Any) -> bool:
    """Whether the model returns a tuple (``True``) or one tensor (``False``); else an error."""
    if isinstance(output, torch.Tensor):
        return False
    if isinstance(output, (tuple, list)) and output and all(isinstance(o, torch.Tensor) for o in output):
        return True
    raise SurgeryError(f"The ort preparation runs models that return a tensor or a tuple of tensors, not "
                       f"{type(output).__name__}.")


def ort_module(model: nn.Module, example_input: Any, *, threads: Optional[int] = None,
               report: Optional[Dict[str, Any]] = None) -> OrtModule:
    """``model`` (prepare it first: eval mode, BatchNorm folded) exported with ``export_onnx``
    (batch dimension dynamic; a fixed batch when that export fails), loaded in an ONNX Runtime
    session (``ort_session``: ``threads`` intra-op threads, default torch's count) and checked
    against ``model`` on ``example_input`` (one CPU tensor): a relative error above
    ``PARITY_TOLERANCE`` is an error. ``report`` receives the export's facts."""
    reason = ort_unavailable()
    if reason:
        raise SurgeryError(f"The ort preparation needs ONNX Runtime: {reason}")
    if not isinstance(example_input, torch.Tensor) or example_input.device.type != "cpu":
        raise SurgeryError("The ort preparation runs models fed one tensor, on CPU.")
    model.eval()
    x = example_input.contiguous()
    with torch.no_grad():
        expected = model(x)
    tuple_output = _output_structure(expected)
    threads = threads or torch.get_num_threads()
    dynamic_error = None
    with tempfile.TemporaryDirectory(prefix="bsconv-ort-") as folder:
        path = Path(folder) / "model.onnx"
        try:
            export_onnx(model, path, x, dynamic_batch=True)
            dynamic = True
        except SurgeryError:
            raise  # the export extra is missing: no point in a second try
        except Exception as exc:  # some models only export with a fixed batch
            dynamic_error = describe_exception(exc)
            export_onnx(model, path, x, dynamic_batch=False)
            dynamic = False
        module = OrtModule(ort_session(path, threads), tuple_output=tuple_output, dynamic_batch=dynamic,
                           batch_size=int(x.shape[0]), threads=threads)
    actual = module(x)
    pairs = zip(actual, expected) if tuple_output else [(actual, expected)]
    error = max(relative_error(a, e) for a, e in pairs)
    if error > PARITY_TOLERANCE:
        raise SurgeryError(f"The ONNX Runtime form of {type(model).__name__} differs from the model (relative error "
                           f"{error:.2e}, more than {PARITY_TOLERANCE:g}); not using it.")
    if report is not None:
        report["ort"] = {"onnxruntime": onnxruntime_version(), "dynamic_batch": dynamic, "threads": threads,
                         "parity": error, **({"dynamic_export_failed": dynamic_error} if dynamic_error else {})}
    return module
