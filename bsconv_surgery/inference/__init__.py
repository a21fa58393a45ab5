"""Running a converted model fast: ``preps.py`` (the named preparations and the automatic choice
of the fastest), ``prepare.py`` (``prepare_for_inference``), ``compiled.py`` (inductor with
frozen weights, AOTInductor packages as modules), ``timing.py`` (interleaved timing),
``export.py`` (ONNX, ``torch.export``, AOTInductor; ``export_model``: a deployable file checked
against the model) and ``ort.py`` (ONNX Runtime as a module), each
checked against the eager model."""

from ..passes.batchnorm import FoldReport, fold_batchnorm
from .compiled import AOTCompiled, CompiledForInference, channels_last_input, compiler_available
from .export import (ExportReport, compile_aot, export_converted, export_model, export_onnx, export_program, onnx_parity,
                     program_parity, relative_error)
from .ort import OrtModule, ort_module, ort_session
from .prepare import prepare_for_inference
from .preps import AUTO, PREPARATIONS, Preparation, choose_preparation, resolve_preparation

__all__ = [
    "FoldReport",
    "fold_batchnorm",
    "prepare_for_inference",
    "AUTO",
    "PREPARATIONS",
    "Preparation",
    "choose_preparation",
    "resolve_preparation",
    "CompiledForInference",
    "AOTCompiled",
    "compiler_available",
    "channels_last_input",
    "export_onnx",
    "export_model",
    "export_converted",
    "ExportReport",
    "program_parity",
    "onnx_parity",
    "export_program",
    "compile_aot",
    "relative_error",
    "OrtModule",
    "ort_module",
    "ort_session",
]
