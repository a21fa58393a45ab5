"""The BSConv steps in compiler-friendly form (inference under ``torch.compile``): inside every
``BSConvU`` / ``BSConvS`` the pointwise steps become ``PointwiseAsLinear`` and the depthwise step
``DepthwiseAsStencil`` (``layers/lowered.py``). Parameters are shared, so the state dict does not
change; outputs stay the same up to float rounding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from torch import nn

from ..fx.modules import swap_module
from ..layers import BSConvS, BSConvU, DepthwiseAsStencil, PointwiseAsLinear

__all__ = ["LoweringReport", "lower_bsconv"]


def _pointwise_unlowerable(conv: nn.Module) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
        return "not a 1x1, stride-1, single-group conv"
    if conv.padding not in ((0, 0), "valid"):
        return "padded"
    return None


def _depthwise_unlowerable(conv: nn.Module) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d (it may pad on the fly)"
    if not conv.groups == conv.in_channels == conv.out_channels:
        return "not depthwise with one filter per channel"
    if conv.padding_mode != "zeros":
        return f"padding mode {conv.padding_mode!r}"
    return None


@dataclass
class LoweringReport:
    """The BSConv steps ``lower_bsconv`` swapped, and the ones it left (with why)."""

    lowered: List[Dict[str, str]] = field(default_factory=list)
    skipped: List[Dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> Dict[str, Any]:
        return {"lowered": list(self.lowered), "skipped": list(self.skipped)}


def lower_bsconv(model: nn.Module) -> LoweringReport:
    """Swap the pointwise and depthwise steps of every BSConv in ``model`` (in place) for
    ``PointwiseAsLinear`` / ``DepthwiseAsStencil``. Outputs stay the same up to float rounding;
    it pays under ``torch.compile`` with channels_last input (see ``prepare_for_inference``)."""
    report = LoweringReport()
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, (BSConvU, BSConvS))]
    for block_name, block in blocks:
        prefix = f"{block_name}." if block_name else ""
        for child_name, child in block.named_children():
            if child_name == "dw":
                cls, reason = DepthwiseAsStencil, _depthwise_unlowerable(child)
            elif child_name in ("pw", "pw1", "pw2"):
                cls, reason = PointwiseAsLinear, _pointwise_unlowerable(child)
            else:
                continue  # an unfolded inner BatchNorm stays as it is
            name = prefix + child_name
            if reason:
                report.skipped.append({"name": name, "reason": reason})
                continue
            swap_module(model, name, cls.from_conv(child))
            report.lowered.append({"name": name, "as": cls.__name__})
    return report
