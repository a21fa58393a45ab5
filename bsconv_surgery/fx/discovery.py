"""Find and classify every convolution of a model, from its FX graph when it traces.

Each conv ``call_module`` node gets ``node.meta["bsconv"]`` (a ``ConvInfo``), the way
``torch.fx.passes.shape_prop`` records ``tensor_meta``. Convs that exist as modules but never
appear as their own call in the graph are *hidden* (inside a leaf module, or used functionally).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple, Type

from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from torch import nn

from .tracing import TraceResult, module_call_counts

__all__ = ["META_KEY", "ConvInfo", "Discovery", "discover", "conv_kind", "conv_maths", "depthwise_class_for"]

META_KEY = "bsconv"

_WEIGHT_STANDARDISED = {"StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"}
#: Padding-only ``nn.Conv2d`` subclasses: timm's dynamic TF 'same' padding.
_SAME_PADDING = (Conv2dSame, Conv2dSameExport)


def conv_kind(conv: nn.Conv2d) -> str:
    """``standard`` (groups 1, kernel > 1), ``pointwise``, ``depthwise`` (groups == in_channels,
    depth multipliers included) or ``grouped``."""
    if conv.groups == 1:
        return "pointwise" if tuple(conv.kernel_size) == (1, 1) else "standard"
    if conv.groups == conv.in_channels and conv.out_channels % conv.in_channels == 0:
        return "depthwise"
    return "grouped"


def conv_maths(conv: nn.Conv2d) -> str:
    """What the module computes: ``plain`` conv, ``same`` (dynamic TF 'same' padding, timm
    ``Conv2dSame``), ``weight-standardised`` or ``custom`` (a forward we do not know)."""
    cls = type(conv)
    if cls is nn.Conv2d or cls.forward is nn.Conv2d.forward:
        return "plain"
    if issubclass(cls, _SAME_PADDING):
        return "same"
    if cls.__name__ in _WEIGHT_STANDARDISED:
        return "weight-standardised"
    return "custom"


def depthwise_class_for(conv: nn.Conv2d) -> Type[nn.Conv2d]:
    """The conv class that keeps ``conv``'s padding behaviour in a depthwise step."""
    return type(conv) if conv_maths(conv) == "same" else nn.Conv2d


@dataclass
class ConvInfo:
    """Facts about one ``nn.Conv2d`` module."""

    name: str
    cls: str
    kind: str
    maths: str
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int
    bias: bool
    calls: Optional[int]  # None when the graph is unknown (tracing failed)
    hidden_reason: Optional[str] = None

    @property
    def hidden(self) -> bool:
        return self.hidden_reason is not None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["kernel_size"] = list(self.kernel_size)
        out["stride"] = list(self.stride)
        out["dilation"] = list(self.dilation)
        return out


@dataclass
class Discovery:
    """All convs of a model; ``convs`` is keyed by qualified name, in graph order first."""

    convs: Dict[str, ConvInfo]
    traced: bool
    trace_error: Optional[str] = None
    other_convs: List[Dict[str, str]] = field(default_factory=list)

    def visible(self, kind: Optional[str] = None) -> List[ConvInfo]:
        return [c for c in self.convs.values() if not c.hidden and (kind is None or c.kind == kind)]

    def census(self) -> Dict[str, int]:
        """Counts by kind; hidden convs are counted as ``hidden`` whatever their shape."""
        counts = {"standard": 0, "pointwise": 0, "depthwise": 0, "grouped": 0, "hidden": 0}
        for c in self.convs.values():
            counts["hidden" if c.hidden else c.kind] += 1
        return counts


def _info(name: str, conv: nn.Conv2d, calls: Optional[int], hidden_reason: Optional[str] = None) -> ConvInfo:
    return ConvInfo(
        name=name,
        cls=type(conv).__name__,
        kind=conv_kind(conv),
        maths=conv_maths(conv),
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=tuple(conv.kernel_size),
        stride=tuple(conv.stride),
        dilation=tuple(conv.dilation),
        groups=conv.groups,
        bias=conv.bias is not None,
        calls=calls,
        hidden_reason=hidden_reason,
    )


def _hidden_reason(name: str, called: Dict[str, int], get_attrs: set) -> str:
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        ancestor = ".".join(parts[:i])
        if ancestor in called:
            return f"inside leaf module '{ancestor}' (not traced through)"
    if f"{name}.weight" in get_attrs:
        return "its weight is used functionally, not through the module"
    return "never called in the traced forward"


def _other_convs(model: nn.Module) -> List[Dict[str, str]]:
    out = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if cls == "CondConv2d":
            out.append({"name": name, "cls": cls, "reason": "CondConv2d mixes per-sample expert kernels; not an nn.Conv2d, not converted"})
        elif cls == "MixedConv2d":
            out.append({"name": name, "cls": cls, "reason": "MixedConv2d splits channels over several convs; each child conv is handled on its own"})
        elif isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.Conv2d):
            out.append({"name": name, "cls": cls, "reason": f"{cls} is not a 2-d convolution; not converted"})
    return out


def discover(model: nn.Module, trace: TraceResult) -> Discovery:
    """Classify every ``nn.Conv2d`` of ``model``; annotate conv nodes of ``trace`` in place."""
    modules = dict(model.named_modules())
    if not trace.ok:
        convs = {
            name: _info(name, m, None)
            for name, m in modules.items()
            if isinstance(m, nn.Conv2d)
        }
        return Discovery(convs, traced=False, trace_error=trace.error, other_convs=_other_convs(model))

    called = module_call_counts(trace)
    convs: Dict[str, ConvInfo] = {}
    graphs = [("", trace.graph)] + [(f"{prefix}.", g) for prefix, g in trace.subgraphs.items()]
    for prefix, graph in graphs:
        for node in graph.nodes:
            name = f"{prefix}{node.target}" if node.op == "call_module" else None
            module = modules.get(name)
            if isinstance(module, nn.Conv2d):
                info = convs.get(name) or _info(name, module, called[name])
                convs[name] = info
                node.meta[META_KEY] = info
    get_attrs = {f"{prefix}{n.target}" for prefix, g in graphs for n in g.nodes if n.op == "get_attr"}
    for name, module in modules.items():
        if isinstance(module, nn.Conv2d) and name not in convs:
            convs[name] = _info(name, module, 0, _hidden_reason(name, called, get_attrs))
    return Discovery(convs, traced=True, other_convs=_other_convs(model))
