"""A memory guard: refuse an input size whose forward pass cannot fit, before running it.

``estimate_forward_bytes`` runs the model once under ``FakeTensorMode`` on its family's example
arguments (``models/inputs.py``; shapes only: no memory is allocated and nothing is computed) and
sums the bytes of every tensor an operator creates (views and in-place results, which share
memory, are not counted). Models whose forward depends on the data (detection's box filtering)
cannot run on fake tensors and get no estimate. That is what a forward pass
that records its graph (FX tracing, fvcore's jit trace, training) holds at its end, so it bounds
the activation memory of one forward from above. ``check_memory`` compares it with the memory
available (``MemAvailable`` of ``/proc/meminfo``; on CUDA, ``torch.cuda.mem_get_info``) and
raises a ``SurgeryError`` with the estimate when it does not fit.

The estimate takes about 0.1 s, so it runs only when a quick bound says it might matter: when the
input itself, times ``QUICK_FACTOR``, is more than the memory available. Set
``BSCONV_SURGERY_NO_MEMORY_CHECK=1`` (or pass ``--no-memory-check`` / ``memory_check=False``) to
skip the guard.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..core.errors import SurgeryError, arg
from ..fx.modules import temporary_mode
from ..models.inputs import Inputs, as_example_inputs, tensors_in

__all__ = ["available_memory", "estimate_forward_bytes", "check_memory", "QUICK_FACTOR", "ENV_SKIP"]

#: Activations of CNNs and ViTs at their own sizes sum to 30-60x their input (resnet18: 37x); the
#: exact estimate runs when input bytes x this factor exceed the memory available.
QUICK_FACTOR = 256
ENV_SKIP = "BSCONV_SURGERY_NO_MEMORY_CHECK"


def available_memory(device: Optional[torch.device] = None) -> Optional[int]:
    """Bytes available for new allocations: ``MemAvailable`` (Linux), free CUDA memory on a CUDA
    device; ``None`` when unknown."""
    if device is not None and torch.device(device).type == "cuda":
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


class _Bytes(TorchDispatchMode):
    """Sums the bytes of every new tensor an operator returns (views and in-place ops excluded)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.total += t.numel() * t.element_size()
        return out


def estimate_forward_bytes(model: nn.Module, inputs: Inputs, batch: int = 1) -> Optional[int]:
    """Bytes of the inputs and of the tensors one forward pass of ``batch`` samples of the example
    ``inputs`` creates, found without running it (``None`` when the model cannot run on fake
    tensors)."""
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    counter = _Bytes()
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), temporary_mode(model, training=False), torch.no_grad():
            args = as_example_inputs(inputs).make(batch, dtype=dtype)
            with counter:
                model(*args)
    except Exception:  # data-dependent control flow and the like: no estimate
        return None
    return counter.total + sum(t.numel() * t.element_size() for t in tensors_in(args))


def _gb(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def check_memory(model: nn.Module, inputs: Inputs, batch: int = 1, device=None,
                 available: Optional[int] = None, what: str = arg("example_inputs")) -> Optional[int]:
    """Refuse the example ``inputs`` when one forward pass of ``batch`` samples cannot fit in the
    memory available; returns the estimate (``None`` when it was not needed or not possible)."""
    inputs = as_example_inputs(inputs)
    if os.environ.get(ENV_SKIP):
        return None
    available = available if available is not None else available_memory(device)
    if not available:
        return None
    input_bytes = batch * math.prod(inputs.size) * 4
    if input_bytes * QUICK_FACTOR <= available:
        return None
    estimate = estimate_forward_bytes(model, inputs, batch)
    if estimate is not None and estimate > available:
        size = inputs.label
        raise SurgeryError(
            f"A forward pass at input {size} (batch {batch}) needs about {_gb(estimate)} for its activations "
            f"(estimated), more than the {_gb(available)} of memory available. Pass a smaller {what}, or "
            f"{arg('memory_check=False')} ({ENV_SKIP}=1) to run it anyway."
        )
    return estimate
