"""Running a converted model fast: ``prepare.py`` (eval mode, BatchNorm folding, lowering,
channels_last, ``torch.compile`` with frozen weights) and ``export.py`` (ONNX, ``torch.export``,
AOTInductor), each checked against the eager model."""

from ..passes.batchnorm import FoldReport, fold_batchnorm
from .export import compile_aot, export_onnx, export_program, onnx_parity, relative_error
from .prepare import CompiledForInference, channels_last_input, compiler_available, prepare_for_inference

__all__ = [
    "FoldReport",
    "fold_batchnorm",
    "prepare_for_inference",
    "CompiledForInference",
    "compiler_available",
    "channels_last_input",
    "export_onnx",
    "onnx_parity",
    "export_program",
    "compile_aot",
    "relative_error",
]
