"""Find and classify every convolution of a model, from its FX graph when it traces.

Each conv ``call_module`` node gets ``node.meta["bsconv"]`` (a ``ConvInfo``), the way
``torch.fx.passes.shape_prop`` records ``tensor_meta``. Convs that exist as modules but never
appear as their own call in the graph are *hidden* (inside a leaf module, or used functionally).
Convs outside every traced part (the model, or the submodules that traced when it did not) are
taken from ``named_modules()`` with ``calls=None``. ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``
are all discovered (``ConvInfo.dims``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple, Type

from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from torch import nn

from .tracing import CONV_TYPES, TraceResult, module_call_counts

__all__ = ["META_KEY", "ConvInfo", "Discovery", "discover", "conv_kind", "conv_maths", "depthwise_class_for",
           "plain_conv_class", "is_conv"]

META_KEY = "bsconv"

_WEIGHT_STANDARDISED = {"StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"}
#: Padding-only ``nn.Conv2d`` subclasses: timm's dynamic TF 'same' padding.
_SAME_PADDING = (Conv2dSame, Conv2dSameExport)


def conv_kind(conv: nn.Module) -> str:
    """``standard`` (groups 1, kernel > 1), ``pointwise``, ``depthwise`` (groups == in_channels,
    depth multipliers included) or ``grouped``; for convs of any spatial dimension."""
    if conv.groups == 1:
        return "pointwise" if all(k == 1 for k in conv.kernel_size) else "standard"
    if conv.groups == conv.in_channels and conv.out_channels % conv.in_channels == 0:
        return "depthwise"
    return "grouped"


def conv_maths(conv: nn.Module) -> str:
    """What the module computes: ``plain`` conv, ``same`` (dynamic TF 'same' padding, timm
    ``Conv2dSame``), ``weight-standardised`` or ``custom`` (a forward we do not know)."""
    cls = type(conv)
    if cls in CONV_TYPES or any(issubclass(cls, base) and cls.forward is base.forward for base in CONV_TYPES):
        return "plain"
    if issubclass(cls, _SAME_PADDING):
        return "same"
    if cls.__name__ in _WEIGHT_STANDARDISED:
        return "weight-standardised"
    return "custom"


def plain_conv_class(conv: nn.Module) -> Type[nn.Module]:
    """``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``: the plain conv of ``conv``'s dimension."""
    return next(base for base in CONV_TYPES if isinstance(conv, base))


def depthwise_class_for(conv: nn.Module) -> Type[nn.Module]:
    """The conv class that keeps ``conv``'s padding behaviour in a depthwise step."""
    return type(conv) if conv_maths(conv) == "same" else plain_conv_class(conv)


def is_conv(module: Optional[nn.Module]) -> bool:
    """An ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` (or a subclass): what the surgery converts."""
    return isinstance(module, CONV_TYPES)


@dataclass
class ConvInfo:
    """Facts about one conv module (``nn.Conv1d``, ``nn.Conv2d`` or ``nn.Conv3d``)."""

    name: str
    cls: str
    kind: str
    maths: str
    in_channels: int
    out_channels: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    groups: int
    bias: bool
    calls: Optional[int]  # None when the graph is unknown (outside every traced part)
    hidden_reason: Optional[str] = None
    #: ``(input, output)`` spatial size of each call, once ``shapes.conv_call_sizes`` has run
    #: (``None``: not recorded or not reached).
    call_sizes: Optional[List[Tuple[Tuple[int, ...], Tuple[int, ...]]]] = None

    @property
    def hidden(self) -> bool:
        return self.hidden_reason is not None

    @property
    def dims(self) -> int:
        """Spatial dimensions: 1 (``Conv1d``), 2 or 3 (``Conv3d``)."""
        return len(self.kernel_size)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["kernel_size"] = list(self.kernel_size)
        out["stride"] = list(self.stride)
        out["dilation"] = list(self.dilation)
        return out


@dataclass
class Discovery:
    """All convs of a model; ``convs`` is keyed by qualified name, in graph order first.
    ``traced``: the whole model traced; ``parts``: the traced parts (``[""]`` when whole);
    ``fallbacks``: modules that did not trace, with why."""

    convs: Dict[str, ConvInfo]
    traced: bool
    trace_error: Optional[str] = None
    other_convs: List[Dict[str, str]] = field(default_factory=list)
    parts: List[str] = field(default_factory=list)
    fallbacks: Dict[str, str] = field(default_factory=dict)
    leaf_parts: List[str] = field(default_factory=list)

    @property
    def untraced(self) -> List[ConvInfo]:
        """Convs outside every traced part (``calls`` unknown)."""
        return [c for c in self.convs.values() if c.calls is None]

    def visible(self, kind: Optional[str] = None) -> List[ConvInfo]:
        return [c for c in self.convs.values() if not c.hidden and (kind is None or c.kind == kind)]

    def census(self) -> Dict[str, int]:
        """Counts by kind; hidden convs are counted as ``hidden`` whatever their shape."""
        counts = {"standard": 0, "pointwise": 0, "depthwise": 0, "grouped": 0, "hidden": 0}
        for c in self.convs.values():
            counts["hidden" if c.hidden else c.kind] += 1
        return counts


def _info(name: str, conv: nn.Module, calls: Optional[int], hidden_reason: Optional[str] = None) -> ConvInfo:
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
        elif isinstance(module, nn.modules.conv._ConvNd) and not is_conv(module):
            out.append({"name": name, "cls": cls, "reason": f"{cls} is a transposed convolution; not converted"})
    return out


def discover(model: nn.Module, trace: TraceResult) -> Discovery:
    """Classify every conv of ``model``; annotate the conv nodes of every traced part in place.
    Convs outside every traced part get ``calls=None`` (the named_modules fallback)."""
    modules = dict(model.named_modules())
    called = module_call_counts(trace)
    convs: Dict[str, ConvInfo] = {}
    for node in trace.module_nodes():
        module = modules.get(node.target)
        if is_conv(module):
            info = convs.get(node.target) or _info(node.target, module, called[node.target])
            convs[node.target] = info
            node.meta[META_KEY] = info
    get_attrs = {n.target for g in trace.graphs() for n in g.nodes if n.op == "get_attr"}
    for name, module in modules.items():
        if is_conv(module) and name not in convs:
            if trace.covers(name):
                convs[name] = _info(name, module, 0, _hidden_reason(name, called, get_attrs))
            else:
                convs[name] = _info(name, module, None)
    return Discovery(convs, traced=trace.ok, trace_error=trace.error, other_convs=_other_convs(model),
                     parts=list(trace.parts), fallbacks=dict(trace.failed),
                     leaf_parts=[p for p in trace.parts if p in trace.leaf_parts])
