"""The BSConv steps in compiler-friendly form (inference under ``torch.compile``): inside every
``BSConvU`` / ``BSConvS`` the pointwise steps become ``PointwiseAsLinear`` and the depthwise step
``DepthwiseAsStencil`` (``layers/lowered.py``); the steps of 1-D and 3-D BSConvs are left as they
are, with that reason. Parameters are shared, so the state dict does not
change; outputs stay the same up to float rounding. ``lower_bsconv`` runs the ``LowerBSConv`` pass
and reports in ``LoweringReport``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Type

from torch import nn

from ..fx.modules import param_count, swap_module
from ..layers import BSConvS, BSConvU, DepthwiseAsStencil, PointwiseAsLinear
from ..core.records import SiteRecord
from .base import SurgeryContext, SurgeryPass

__all__ = ["LowerBSConv", "LoweringReport", "lower_bsconv", "STEPS"]

#: The kinds of BSConv step ``lower_bsconv`` can lower.
STEPS = ("pointwise", "depthwise")


_TWO_D_ONLY = "lowering is for 2-D BSConv steps only; this is a {cls}"


def _pointwise_unlowerable(conv: nn.Module) -> Optional[str]:
    if isinstance(conv, (nn.Conv1d, nn.Conv3d)):
        return _TWO_D_ONLY.format(cls=type(conv).__name__)
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1:
        return "not a 1x1, stride-1, single-group conv"
    if conv.padding not in ((0, 0), "valid"):
        return "padded"
    return None


def _depthwise_unlowerable(conv: nn.Module) -> Optional[str]:
    if isinstance(conv, (nn.Conv1d, nn.Conv3d)):
        return _TWO_D_ONLY.format(cls=type(conv).__name__)
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

    @classmethod
    def from_context(cls, ctx: SurgeryContext) -> "LoweringReport":
        return cls([{"name": r.name, "as": r.details["as"]} for r in ctx.replaced],
                   [{"name": s.name, "reason": s.reason} for s in ctx.skipped])


@dataclass
class StepSite:
    """One step of a BSConv block (``name``: its qualified name) and the class it would become."""

    name: str
    lowered: Type[nn.Conv2d]


class LowerBSConv(SurgeryPass):
    """The steps of every ``BSConvU`` / ``BSConvS`` -> ``PointwiseAsLinear`` (``pw``, ``pw1``,
    ``pw2``) and ``DepthwiseAsStencil`` (``dw``), sharing their parameters. Walks the module tree
    (no graph); an unfolded inner BatchNorm stays as it is."""

    kind = "bsconv->lowered"
    preserves_computation = True  # up to float rounding

    def __init__(self, steps: Sequence[str] = STEPS) -> None:
        unknown = sorted(set(steps) - set(STEPS))
        if unknown:
            raise ValueError(f"unknown BSConv steps {unknown}; valid: {', '.join(STEPS)}")
        self.steps = tuple(steps)

    def match(self, model: nn.Module, ctx: SurgeryContext) -> Iterator[StepSite]:
        for block_name, block in model.named_modules():
            if not isinstance(block, (BSConvU, BSConvS)):
                continue
            prefix = f"{block_name}." if block_name else ""
            for child_name, _ in block.named_children():
                if child_name == "dw" and "depthwise" in self.steps:
                    yield StepSite(prefix + child_name, DepthwiseAsStencil)
                elif child_name in ("pw", "pw1", "pw2") and "pointwise" in self.steps:
                    yield StepSite(prefix + child_name, PointwiseAsLinear)

    def guard(self, model: nn.Module, site: StepSite, ctx: SurgeryContext) -> Optional[str]:
        step = model.get_submodule(site.name)
        return _depthwise_unlowerable(step) if site.lowered is DepthwiseAsStencil else _pointwise_unlowerable(step)

    def swap(self, model: nn.Module, site: StepSite, ctx: SurgeryContext) -> SiteRecord:
        step = model.get_submodule(site.name)
        new = site.lowered.from_conv(step)
        swap_module(model, site.name, new)
        return SiteRecord(site.name, self.kind, type(step).__name__, step.in_channels, step.out_channels,
                          list(step.kernel_size), list(step.stride), param_count(step), param_count(new), None,
                          details={"as": site.lowered.__name__})


def lower_bsconv(model: nn.Module, steps: Sequence[str] = STEPS) -> LoweringReport:
    """Swap the pointwise and depthwise steps of every BSConv in ``model`` (in place) for
    ``PointwiseAsLinear`` / ``DepthwiseAsStencil`` (only the kinds in ``steps``). Outputs stay
    the same up to float rounding; it pays under ``torch.compile`` with channels_last input
    (see ``inference/preps.py``)."""
    ctx = SurgeryContext()
    LowerBSConv(steps).transform(model, ctx)
    return LoweringReport.from_context(ctx)
