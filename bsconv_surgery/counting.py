"""Parameter and MAC counting with fvcore, cross-checked against torch's FlopCounterMode.

fvcore counts one multiply-add as one "flop" (its totals are MACs) and counts BatchNorm too;
``FlopCounterMode`` counts two FLOPs per MAC and only conv/matmul. Operators fvcore does not
know are counted as zero: they are returned, and those that carry real compute are flagged.
"""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import torch
from torch import nn

__all__ = ["Budget", "count_params", "count_budget", "flop_counter_conv_macs", "counter_info"]

# Operators whose cost is real arithmetic (not data movement or elementwise work).
_COMPUTE_OP = re.compile(r"(conv|matmul|bmm|mm$|addmm|einsum|linear|scaled_dot_product|attention|baddbmm)")


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


@dataclass
class Budget:
    """Params and MACs of one model at one input size."""

    params: int
    macs: Optional[int]
    by_module: Dict[str, int] = field(default_factory=dict)
    by_operator: Dict[str, int] = field(default_factory=dict)
    unsupported_ops: Dict[str, int] = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def conv_macs(self) -> Optional[int]:
        return None if self.macs is None else int(self.by_operator.get("conv", 0))

    @property
    def uncounted_compute_ops(self) -> Dict[str, int]:
        """Unsupported operators that are matmul- or conv-like: fvcore counted them as zero."""
        return {op: n for op, n in self.unsupported_ops.items() if _COMPUTE_OP.search(op.split("::")[-1])}


def counter_info() -> Dict[str, str]:
    """Which counter produced the MACs, and its version."""
    try:
        from importlib.metadata import version

        fv = version("fvcore")
    except Exception:
        fv = "unknown"
    return {"name": "fvcore", "version": fv, "unit": "MACs (one multiply-add = 1)"}


@contextmanager
def _eval_no_grad(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


def _example_input(model: nn.Module, input_size: Sequence[int], batch_size: int = 1) -> torch.Tensor:
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, *input_size, generator=gen).to(device=device, dtype=dtype)


def count_budget(model: nn.Module, input_size: Sequence[int]) -> Budget:
    """Params, and fvcore MACs at batch 1 and ``input_size`` (C, H, W), in eval mode.

    A model fvcore cannot trace gets ``macs=None`` and the reason in ``error``.
    """
    from fvcore.nn import FlopCountAnalysis

    params = count_params(model)
    x = _example_input(model, input_size)
    logging.getLogger("fvcore").setLevel(logging.ERROR)
    try:
        with _eval_no_grad(model), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            analysis = FlopCountAnalysis(model, x)
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            analysis.tracer_warnings("none")
            total = int(analysis.total())
            by_module = {k: int(v) for k, v in analysis.by_module().items()}
            by_operator = {k: int(v) for k, v in analysis.by_operator().items()}
            unsupported = {k: int(v) for k, v in analysis.unsupported_ops().items()}
    except Exception as exc:  # fvcore's jit trace fails on some models
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return Budget(params, None, error=f"fvcore could not count this model ({type(exc).__name__}: {first[:200]})")
    return Budget(params, total, by_module, by_operator, unsupported)


def flop_counter_conv_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Conv MACs by ``torch.utils.flop_counter.FlopCounterMode`` (its conv FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = _example_input(model, input_size)
    with _eval_no_grad(model), FlopCounterMode(display=False) as counter:
        model(x)
    counts = counter.get_flop_counts().get("Global", {})
    conv_flops = sum(v for op, v in counts.items() if "convolution" in str(op))
    return int(conv_flops) // 2
