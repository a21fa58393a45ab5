"""The spatial sizes every conv is called at, found on fake tensors and recorded on its ``ConvInfo``
(``call_sizes``), the way ``torch.fx.passes.shape_prop`` records ``tensor_meta`` on graph nodes.

One forward pass of the model's example arguments (``models/inputs.py``) runs under
``FakeTensorMode`` (shapes only: nothing is allocated or computed; on the meta device the meta
tensors themselves carry the shapes) with a forward hook on each conv asked about. Each call adds
``(input spatial size, output spatial size)``: what the closed-form MAC counts of a conv and of
its replacement need (``layers.bsconv``: the pointwise steps run at the input's resolution, the
depthwise at the output's). Forward passes that depend on the data (detection's box filtering)
stop part-way: the convs reached before that keep their sizes, the others get none (``None``:
unknown), the same way every time for the same model and size.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ..models.inputs import ExampleInputs
from .modules import temporary_mode

__all__ = ["CallSize", "conv_call_sizes"]

#: ``(input spatial size, output spatial size)`` of one call, e.g. ``((224, 224), (56, 56))``.
CallSize = Tuple[Tuple[int, ...], Tuple[int, ...]]


def _spatial(t) -> Optional[Tuple[int, ...]]:
    return tuple(int(s) for s in t.shape[2:]) if isinstance(t, torch.Tensor) and t.dim() >= 3 else None


def conv_call_sizes(model: nn.Module, names: Iterable[str], inputs: ExampleInputs) -> Dict[str, List[CallSize]]:
    """Qualified conv name -> the sizes of each of its calls in one eval-mode forward pass on the
    example ``inputs`` (batch 1); convs never reached are left out."""
    wanted = {name: model.get_submodule(name) for name in names}
    sizes: Dict[str, List[CallSize]] = {}

    def hook(name):
        def record(module, args, out):
            size_in, size_out = _spatial(args[0] if args else None), _spatial(out)
            if size_in is not None and size_out is not None:
                sizes.setdefault(name, []).append((size_in, size_out))
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in wanted.items()]
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    meta = param is not None and param.device.type == "meta"
    try:
        with temporary_mode(model, training=False), torch.no_grad():
            if meta:
                model(*inputs.make(1, device="meta", dtype=dtype))
            else:
                with FakeTensorMode(allow_non_fake_inputs=True):
                    model(*inputs.make(1, dtype=dtype))
    except Exception:  # data-dependent control flow and the like: the convs reached so far keep their sizes
        pass
    finally:
        for handle in handles:
            handle.remove()
    return sizes
