"""Inference preparation of a (converted) model, in place: eval mode, BatchNorm folding
(``passes/batchnorm.py``), lowering of the BSConv blocks for the compiler
(``passes/lowering.py``), channels_last, and ``torch.compile`` with weight freezing
(``CompiledForInference``)."""

from __future__ import annotations

import shutil
from typing import Any, Dict, Optional

import torch
from torch import nn

from ..errors import SurgeryError
from ..passes.batchnorm import fold_batchnorm
from ..passes.lowering import lower_bsconv

__all__ = ["prepare_for_inference", "CompiledForInference", "compiler_available", "channels_last_input"]


def compiler_available() -> bool:
    """Inductor's CPU backend needs a C++ compiler."""
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


class CompiledForInference(nn.Module):
    """``torch.compile(model)`` called under ``torch.inference_mode()`` with inductor's weight
    freezing on, so inductor treats the weights as constants (prepacked oneDNN weights,
    constant folding). The flag is set around every call: dynamo reads the global
    ``torch._inductor.config.freezing`` when it traces, and ``torch.compile(options=
    {"freezing": True})`` alone does not freeze anything (torch 2.14). Later changes to the
    model's weights are not seen by the compiled code."""

    def __init__(self, model: nn.Module, options: Optional[Dict[str, Any]] = None, freezing: bool = True):
        super().__init__()
        self.freezing = freezing
        self.compiled = torch.compile(model, options=options or None)
        self.training = model.training

    def __getattr__(self, name: str) -> Any:
        # like torch.compile's OptimizedModule: attributes of the wrapped model stay reachable
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("compiled")._orig_mod, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        # inductor's config: compile-only machinery, imported when a compiled model first runs
        import torch._inductor.config as inductor_config

        with torch.inference_mode(), inductor_config.patch(freezing=self.freezing):
            return self.compiled(*args, **kwargs)


def prepare_for_inference(
    model: nn.Module,
    fuse: bool = True,
    channels_last: bool = False,
    compile: bool = False,
    compile_options: Optional[Dict[str, Any]] = None,
    report: Optional[Dict[str, Any]] = None,
    lower: Optional[bool] = None,
) -> nn.Module:
    """Put ``model`` in eval mode, fold its BatchNorms (``fuse``), lower its BSConv blocks for
    the compiler (``lower``; by default when compiling, see ``passes/lowering.py``),
    optionally convert it to channels_last (feed it ``channels_last_input(x)`` too) and wrap it
    with ``torch.compile`` (inductor with weight freezing, as ``CompiledForInference``).

    The model is changed in place (``copy.deepcopy`` it first to keep the original); the
    return value is the model, or its compiled wrapper. Pass a dict as ``report`` to receive
    the folding and lowering reports under ``report["fold"]`` and ``report["lower"]``.
    """
    model.eval()
    if fuse:
        folded = fold_batchnorm(model)
        if report is not None:
            report["fold"] = folded.as_dict()
    if lower is None:
        lower = compile
    if lower:
        lowered = lower_bsconv(model)
        if report is not None:
            report["lower"] = lowered.as_dict()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        if device.type == "cpu" and not compiler_available():
            raise SurgeryError(
                "torch.compile on CPU needs a C++ compiler (g++ or clang++) on PATH; install one "
                "or leave out --compile."
            )
        options = dict(compile_options or {})
        model = CompiledForInference(model, options, freezing=options.pop("freezing", True))
    return model
