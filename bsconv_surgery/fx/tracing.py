"""FX tracing that sees timm and torchvision models the way the surgery needs them.

Leaves: every ``nn.Conv2d`` (subclasses included, so ``Conv2dSame`` or ``StdConv2d`` stay one
``call_module`` node instead of dissolving into functional ``conv2d``), every BatchNorm
(timm's ``BatchNormAct2d`` keeps its fused activation), timm's registered no-trace modules,
and torch's own leaves. timm's registered no-trace functions are auto-wrapped.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Tuple, Type

import torch
from timm.layers import CondConv2d, get_notrace_functions, get_notrace_modules
from torch import fx, nn

from ..errors import describe_exception
from .modules import temporary_mode

__all__ = ["SurgeryTracer", "TraceResult", "trace_model", "trace_graph", "FROZEN_BATCHNORM_NAMES", "module_call_counts"]


#: Frozen BatchNorms (torchvision ops, timm) are not ``_BatchNorm`` subclasses; kept whole too.
FROZEN_BATCHNORM_NAMES = frozenset({"FrozenBatchNorm2d", "FrozenBatchNormAct2d"})

#: Always leaves: convs, BatchNorms, and timm's ``CondConv2d`` (it takes routing weights and is
#: not an ``nn.Conv2d``: kept whole so discovery can report it).
_LEAF_TYPES: Tuple[Type[nn.Module], ...] = (nn.Conv2d, nn.modules.batchnorm._BatchNorm, CondConv2d)


class SurgeryTracer(fx.Tracer):
    """A leaf-module-aware tracer fed with timm's no-trace modules and functions (read when the
    tracer is made: models registered later are seen too)."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.leaf_types = tuple(set(get_notrace_modules()) | set(_LEAF_TYPES))

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self.leaf_types) or type(m).__name__ in FROZEN_BATCHNORM_NAMES:
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class TraceResult:
    """The graph of a model, or why there is none.

    ``subgraphs`` maps the qualified name of a leaf module that holds convs (timm's no-trace
    blocks such as ``MobileVitBlock``) to its own graph, traced on its own, so the convs inside it
    are visible too; node targets in a subgraph are relative to that module.
    """

    graph: Optional[fx.Graph]
    error: Optional[str] = None
    leaf_types: Tuple[Type[nn.Module], ...] = field(default_factory=tuple)
    subgraphs: Dict[str, fx.Graph] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.graph is not None

    def module_nodes(self) -> Iterator[fx.Node]:
        if self.graph is not None:
            for node in self.graph.nodes:
                if node.op == "call_module":
                    yield node

    def nodes_by_module(self) -> Dict[str, List[fx.Node]]:
        """Qualified module name -> the ``call_module`` nodes that call it, subgraphs included."""
        out: Dict[str, List[fx.Node]] = {}
        graphs = [("", self.graph)] if self.graph is not None else []
        for prefix, graph in graphs + [(f"{name}.", g) for name, g in self.subgraphs.items()]:
            for node in graph.nodes:
                if node.op == "call_module":
                    out.setdefault(f"{prefix}{node.target}", []).append(node)
        return out


def trace_graph(module: nn.Module) -> Tuple[Optional[fx.Graph], Optional[str]]:
    """The graph of ``module`` alone (no leaf subgraphs), or ``None`` and the reason."""
    graph, error, _ = _trace(module)
    return graph, error


def _trace(module: nn.Module) -> Tuple[Optional[fx.Graph], Optional[str], SurgeryTracer]:
    tracer = SurgeryTracer()
    try:
        # Trace in train mode: eval-mode caches (levit / efficientformer attention biases)
        # index dicts with proxies and break tracing. Each module's mode is restored afterwards.
        with temporary_mode(module, training=True), torch.no_grad():
            return tracer.trace(module), None, tracer
    except Exception as exc:  # any user model code can fail under tracing
        return None, describe_exception(exc), tracer


def _holds_convs(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def trace_model(model: nn.Module) -> TraceResult:
    """Symbolically trace ``model`` (and, on their own, the leaf modules that hold convs); on
    failure return the error instead of raising."""
    graph, error, tracer = _trace(model)
    result = TraceResult(graph, error, tracer.leaf_types)
    if graph is None:
        return result
    modules = dict(model.named_modules())
    for target in dict.fromkeys(n.target for n in result.module_nodes()):
        leaf = modules.get(target)
        if isinstance(leaf, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)) or leaf is None:
            continue
        if _holds_convs(leaf):
            subgraph, _, _ = _trace(leaf)
            if subgraph is not None:
                result.subgraphs[target] = subgraph
    return result


def module_call_counts(trace: TraceResult) -> Dict[str, int]:
    """How often each module (by qualified name) is called, subgraphs of leaf modules included
    (a call inside a leaf counts once per call of the leaf)."""
    counts = Counter(node.target for node in trace.module_nodes())
    for prefix, subgraph in trace.subgraphs.items():
        for node in subgraph.nodes:
            if node.op == "call_module":
                counts[f"{prefix}.{node.target}"] += counts[prefix]
    return dict(counts)
