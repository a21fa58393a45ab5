"""Parameter and MAC counting with fvcore, cross-checked against torch's FlopCounterMode.

fvcore counts one multiply-add as one "flop" (its totals are MACs): convolutions and
linear/matmul layers, plus BatchNorm (in eval mode 2 per element with affine parameters, 1
without) and adaptive average pooling (1 per input element). Elementwise operators (ReLU, the
residual add) are not counted. ``FlopCounterMode`` counts two FLOPs per MAC and only
conv/matmul, so on convolutions the two must agree up to that factor: ``count_budget(...,
cross_check=True)`` checks exactly that. Operators fvcore does not know are counted as zero:
they are returned, and those that carry real compute (conv-, matmul-, attention- or FFT-like)
are flagged, never hidden.
"""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

with warnings.catch_warnings():  # fvcore scripts its focal loss at import: torch.jit.script's FutureWarning
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
from torch.utils.flop_counter import FlopCounterMode

from ..core.errors import SurgeryError, arg, describe_exception
from ..fx.modules import param_count, temporary_mode
from ..models.inputs import ExampleInputs, Inputs, as_example_inputs

__all__ = [
    "Budget",
    "ConvCheck",
    "count_params",
    "count_budget",
    "cross_check_conv_macs",
    "flop_counter_conv_macs",
    "counter_info",
    "is_compute_op",
    "example_input",
    "example_args",
    "output_structure",
    "check_runs",
]

# Operators whose cost is real arithmetic (not data movement or elementwise work), matched on
# the name after "aten::" with any trailing "_" (in-place) removed.
_COMPUTE_OP = re.compile(
    r"(conv|matmul|bmm|^mm$|addmm|^mv$|addmv|^dot$|vdot|tensordot|einsum|linear|bilinear|"
    r"scaled_dot_product|attention|^fft_|stft)"
)

# fvcore's operator names (``by_operator`` keys) for convolutions and matmul-like layers.
_CONV_LINEAR_OPERATORS = ("conv", "linear", "addmm", "matmul", "mm", "bmm", "einsum")


def is_compute_op(op: str) -> bool:
    """Whether an operator such as ``aten::addmm`` or ``aten::_convolution_mode`` is matmul-,
    conv-, attention- or FFT-like: real compute that a counter must not silently drop."""
    return bool(_COMPUTE_OP.search(op.split("::")[-1].lstrip("_").rstrip("_")))


#: Number of parameter elements (shared parameters counted once): ``fx.modules.param_count``.
count_params = param_count


@dataclass
class ConvCheck:
    """fvcore's conv MACs against ``FlopCounterMode``'s conv FLOPs / 2 on the same input."""

    fvcore: Optional[int]
    flop_counter: Optional[int]
    error: Optional[str] = None

    @property
    def agree(self) -> bool:
        return self.error is None and self.fvcore is not None and self.fvcore == self.flop_counter

    def to_dict(self) -> Dict[str, object]:
        out: Dict[str, object] = {"fvcore": self.fvcore, "flop_counter": self.flop_counter, "agree": self.agree}
        if self.error:
            out["error"] = self.error
        return out


@dataclass
class Budget:
    """Params and MACs of one model at one input size.

    >>> import torch, bsconv_surgery as bs
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16))
    >>> budget = bs.count_budget(net, (3, 8, 8))
    >>> budget.by_operator, budget.conv_macs, budget.warnings()  # BatchNorm: 6*6 * 16 * 2
    ({'conv': 15552, 'batch_norm': 1152}, 15552, [])
    """

    params: int
    macs: Optional[int]
    by_module: Dict[str, int] = field(default_factory=dict)
    by_operator: Dict[str, int] = field(default_factory=dict)
    unsupported_ops: Dict[str, int] = field(default_factory=dict)
    error: Optional[str] = None
    conv_check: Optional[ConvCheck] = None

    @property
    def conv_macs(self) -> Optional[int]:
        return None if self.macs is None else int(self.by_operator.get("conv", 0))

    @property
    def conv_linear_macs(self) -> Optional[int]:
        """MACs of convolutions and linear/matmul layers only (no BatchNorm, no pooling)."""
        if self.macs is None:
            return None
        return int(sum(self.by_operator.get(op, 0) for op in _CONV_LINEAR_OPERATORS))

    @property
    def uncounted_compute_ops(self) -> Dict[str, int]:
        """Unsupported operators that are matmul- or conv-like: fvcore counted them as zero."""
        return {op: n for op, n in self.unsupported_ops.items() if is_compute_op(op)}

    def warnings(self) -> List[str]:
        """What makes ``macs`` incomplete or doubtful, one sentence each (empty when all is well)."""
        out = []
        if self.error:
            out.append(self.error)
        compute = self.uncounted_compute_ops
        if compute:
            ops = ", ".join(f"{op} x{n}" for op, n in sorted(compute.items()))
            out.append(f"fvcore does not count these compute operators (counted as 0, MACs are too low): {ops}")
        check = self.conv_check
        if check is not None and not check.agree:
            why = check.error or f"fvcore {check.fvcore:,} vs FlopCounterMode {check.flop_counter:,}"
            out.append(f"conv MACs cross-check failed: {why}")
        return out

    def to_dict(self) -> Dict[str, object]:
        """The JSON-able numbers (``by_module`` left out: it is per-module detail)."""
        out: Dict[str, object] = {
            "params": self.params,
            "macs": self.macs,
            "conv_macs": self.conv_macs,
            "conv_linear_macs": self.conv_linear_macs,
            "by_operator": dict(self.by_operator),
            "unsupported_ops": dict(self.unsupported_ops),
            "uncounted_compute_ops": self.uncounted_compute_ops,
        }
        if self.conv_check is not None:
            out["conv_check"] = self.conv_check.to_dict()
        if self.error:
            out["error"] = self.error
        return out


def _version(package: str) -> str:
    try:
        return version(package)
    except Exception:
        return "unknown"


def counter_info() -> Dict[str, str]:
    """Which counter produced the MACs, its version, what it counts, and the cross-check."""
    return {
        "name": "fvcore",
        "version": _version("fvcore"),
        "unit": "MACs (one multiply-add = 1)",
        "counts": "conv, linear/matmul, BatchNorm (eval: 2 per element with affine), adaptive avg pool; "
        "elementwise ops (ReLU, add) are not counted",
        "cross_check": f"torch.utils.flop_counter.FlopCounterMode (torch {torch.__version__}), conv FLOPs / 2",
    }


@contextmanager
def _eval_no_grad(model: nn.Module):
    with temporary_mode(model, training=False), torch.no_grad():
        yield


def _place(model: nn.Module):
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    return device, dtype


def example_input(model: nn.Module, input_size: Sequence[int], batch_size: int = 1) -> torch.Tensor:
    """A fixed standard-normal batch ``(batch_size, *input_size)`` on the model's device, in its
    floating dtype."""
    device, dtype = _place(model)
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, *input_size, generator=gen).to(device=device, dtype=dtype)


def example_args(model: nn.Module, inputs: Inputs, batch_size: int = 1) -> tuple:
    """The example arguments (``models/inputs.py``: one tensor, a list of images for detection,
    two images for optical flow, or the caller's own) on ``model``'s device and dtype."""
    device, dtype = _place(model)
    return as_example_inputs(inputs).make(batch_size, device=device, dtype=dtype)


def output_structure(model: nn.Module, args: tuple, inputs: ExampleInputs):
    """The shapes of ``model``'s eval-mode output on ``args`` (``InputFamily.structure``: a
    detection count shows as ``n``)."""
    with temporary_mode(model, training=False), torch.no_grad():
        return inputs.structure(model(*args))


def check_runs(model: nn.Module, inputs: Inputs) -> tuple:
    """``(args, output structure)`` of one forward pass on the example ``inputs``; a model that does
    not run on them is a ``SurgeryError`` naming ``example_inputs`` (before any other work)."""
    inputs = as_example_inputs(inputs)
    args = example_args(model, inputs)
    try:
        return args, output_structure(model, args, inputs)
    except Exception as exc:  # the user's model at the user's (or default) input size
        layout = f" {inputs.family.layout}" if inputs.family.layout else ""
        raise SurgeryError(
            f"The model does not run on a {inputs.label} input before any surgery "
            f"({describe_exception(exc, 200)}). Pass an input size it accepts with {arg('example_inputs')}{layout}."
        ) from exc


def count_budget(model: nn.Module, inputs: Inputs, *, cross_check: bool = False) -> Budget:
    """Params, and fvcore MACs at batch 1 on the example ``inputs`` (an ``ExampleInputs``, the
    model's arguments, or an input size of one tensor), in eval mode.

    A model fvcore cannot trace gets ``macs=None`` and the reason in ``error``. With
    ``cross_check``, the conv MACs are recounted by ``FlopCounterMode`` (``Budget.conv_check``).

    >>> import torch, bsconv_surgery as bs
    >>> budget = bs.count_budget(torch.nn.Conv2d(3, 16, 3), (3, 8, 8))
    >>> budget.params, budget.macs  # 3*16*9 + 16; 6*6 outputs * 16 * 3*9
    (448, 15552)
    >>> bs.count_budget(bs.BSConvU(3, 16, 3), (3, 8, 8)).macs  # 8*8 * 3*16 + 6*6 * 16*9
    8256
    """
    params = count_params(model)
    x = example_args(model, inputs)
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
        return Budget(params, None, error=f"fvcore could not count this model ({describe_exception(exc, 200)})")
    budget = Budget(params, total, by_module, by_operator, unsupported)
    if cross_check:
        budget.conv_check = cross_check_conv_macs(model, inputs, budget)
    return budget


def cross_check_conv_macs(model: nn.Module, inputs: Inputs, budget: Optional[Budget] = None) -> ConvCheck:
    """Count conv MACs with ``FlopCounterMode`` and compare with fvcore's (``budget``, counted
    here when not given). A failure of either counter is reported in ``error``, not raised."""
    if budget is None:
        budget = count_budget(model, inputs)
    if budget.macs is None:
        return ConvCheck(None, None, error=budget.error)
    try:
        other = flop_counter_conv_macs(model, inputs)
    except Exception as exc:
        return ConvCheck(budget.conv_macs, None, error=f"FlopCounterMode failed ({describe_exception(exc, 200)})")
    return ConvCheck(budget.conv_macs, other)


def flop_counter_conv_macs(model: nn.Module, inputs: Inputs) -> int:
    """Conv MACs by ``torch.utils.flop_counter.FlopCounterMode`` (its conv FLOPs / 2)."""
    x = example_args(model, inputs)
    with _eval_no_grad(model), FlopCounterMode(display=False) as counter:
        model(*x)
    counts = counter.get_flop_counts().get("Global", {})
    conv_flops = sum(v for op, v in counts.items() if "convolution" in str(op))
    return int(conv_flops) // 2
