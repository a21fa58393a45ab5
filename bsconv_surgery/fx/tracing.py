"""FX tracing that sees timm and torchvision models the way the surgery needs them.

Leaves: every convolution (``nn.Conv1d``/``Conv2d``/``Conv3d`` and subclasses, so ``Conv2dSame``
or ``StdConv2d`` stay one ``call_module`` node instead of dissolving into functional ``conv2d``),
every BatchNorm (timm's ``BatchNormAct2d`` keeps its fused activation), timm's registered no-trace
modules, and torch's own leaves. timm's registered no-trace functions are auto-wrapped.

**Parts.** A model is traced whole when it can be. When it cannot (torchvision's detection models
iterate over lists of images, RAFT loops over refinement steps), its children that hold
convolutions are tried one by one, recursively, stopping at the first level that traces: the
largest submodules that trace become *parts* (for Faster R-CNN: ``backbone`` whole, the RPN
head's ``conv``). Leaf modules of a traced graph that hold convs (timm's no-trace blocks such as
``MobileVitBlock``) are traced on their own the same way. Every part's graph names modules by
their qualified name in the whole model (``node.target``, and the ``nn_module_stack`` FX records),
so discovery and the passes treat all parts alike.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Set, Tuple, Type

import torch
from timm.layers import CondConv2d, get_notrace_functions, get_notrace_modules
from torch import fx, nn

from ..core.errors import describe_exception
from .modules import temporary_mode

__all__ = ["SurgeryTracer", "TraceResult", "trace_model", "trace_graph", "FROZEN_BATCHNORM_NAMES", "module_call_counts",
           "CONV_TYPES"]


#: The convolutions the surgery works on (subclasses included): one, two and three spatial dims.
CONV_TYPES: Tuple[Type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Frozen BatchNorms (torchvision ops, timm) are not ``_BatchNorm`` subclasses; kept whole too.
FROZEN_BATCHNORM_NAMES = frozenset({"FrozenBatchNorm2d", "FrozenBatchNormAct2d"})

#: Always leaves: convs (transposed ones too), BatchNorms, and timm's ``CondConv2d`` (it takes
#: routing weights and is not an ``nn.Conv2d``: kept whole so discovery can report it).
_LEAF_TYPES: Tuple[Type[nn.Module], ...] = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, CondConv2d)


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
    """The graphs of a model, or why there are none.

    ``parts`` maps the qualified name of each traced module (``""``: the whole model) to its
    graph, in the order they were traced (a part before the parts inside it). ``failed`` maps the
    modules that did not trace, and whose children holding convs were tried instead, to the
    reason. ``leaf_parts`` are the parts that are leaf modules of another part's graph (timm's
    no-trace blocks); the other parts below the root were traced alone because their parent failed.
    """

    parts: Dict[str, fx.Graph] = field(default_factory=dict)
    failed: Dict[str, str] = field(default_factory=dict)
    leaf_types: Tuple[Type[nn.Module], ...] = field(default_factory=tuple)
    leaf_parts: Set[str] = field(default_factory=set)

    @property
    def graph(self) -> Optional[fx.Graph]:
        """The whole model's graph (``None`` when it did not trace whole)."""
        return self.parts.get("")

    @property
    def ok(self) -> bool:
        """The whole model traced."""
        return "" in self.parts

    @property
    def traced(self) -> bool:
        """At least one part traced (the whole model, or submodules of it)."""
        return bool(self.parts)

    @property
    def partial(self) -> bool:
        return self.traced and not self.ok

    @property
    def error(self) -> Optional[str]:
        """Why the whole model did not trace."""
        return self.failed.get("")

    @property
    def standalone_parts(self) -> List[str]:
        """Parts traced alone because the module around them did not trace."""
        return [p for p in self.parts if p and p not in self.leaf_parts]

    def graphs(self) -> List[fx.Graph]:
        return list(self.parts.values())

    def module_nodes(self) -> Iterator[fx.Node]:
        """Every ``call_module`` node of every part."""
        for graph in self.parts.values():
            for node in graph.nodes:
                if node.op == "call_module":
                    yield node

    def nodes_by_module(self) -> Dict[str, List[fx.Node]]:
        """Qualified module name -> the ``call_module`` nodes that call it, in every part."""
        out: Dict[str, List[fx.Node]] = {}
        for node in self.module_nodes():
            out.setdefault(node.target, []).append(node)
        return out

    def covers(self, name: str) -> bool:
        """Whether module ``name`` lies inside a traced part."""
        return any(p == "" or name == p or name.startswith(p + ".") for p in self.parts)


def trace_graph(module: nn.Module) -> Tuple[Optional[fx.Graph], Optional[str]]:
    """The graph of ``module`` alone (no parts), or ``None`` and the reason."""
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
    return any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def _qualify(graph: fx.Graph, prefix: str) -> fx.Graph:
    """Name modules and attributes in ``graph`` (traced from the module at ``prefix``) by their
    qualified name in the whole model."""
    if not prefix:
        return graph
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            node.target = f"{prefix}.{node.target}"
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: ((f"{prefix}.{value[0]}" if value[0] else prefix, value[1]) if isinstance(value, tuple) else value)
                for key, value in stack.items()
            }
    return graph


def _is_container(module: nn.Module) -> bool:
    """``nn.ModuleList`` / ``nn.ModuleDict`` and other modules without a forward of their own."""
    return type(module).forward is nn.Module.forward


def _trace_tree(model: nn.Module, name: str, result: TraceResult, leaf: bool) -> None:
    """Trace the module at ``name``; if it fails, its children that hold convs, recursively.
    A traced part's leaf modules that hold convs are traced the same way (``leaf_parts``)."""
    module = model.get_submodule(name) if name else model
    if isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
        return  # a conv alone: found by named_modules, nothing to trace
    graph = None
    if not _is_container(module):
        graph, error, tracer = _trace(module)
        result.leaf_types = result.leaf_types or tracer.leaf_types
        if graph is None:
            result.failed[name] = error
    if graph is None:
        for child, sub in module.named_children():
            if _holds_convs(sub):
                _trace_tree(model, f"{name}.{child}" if name else child, result, leaf=False)
        return
    result.parts[name] = _qualify(graph, name)
    if leaf:
        result.leaf_parts.add(name)
    for target in dict.fromkeys(n.target for n in graph.nodes if n.op == "call_module"):
        sub = model.get_submodule(target)
        if target in result.parts or target in result.failed:
            continue  # a leaf called from several parts: traced once
        if not isinstance(sub, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)) and _holds_convs(sub):
            _trace_tree(model, target, result, leaf=True)


def trace_model(model: nn.Module) -> TraceResult:
    """Symbolically trace ``model`` whole, else the largest submodules that trace, and on their
    own the leaf modules that hold convs (see the module docstring); failures are returned in
    ``failed``, never raised."""
    result = TraceResult()
    _trace_tree(model, "", result, leaf=False)
    if not result.leaf_types:
        result.leaf_types = SurgeryTracer().leaf_types
    return result


def module_call_counts(trace: TraceResult) -> Dict[str, int]:
    """How often each module (by qualified name) is called in the traced parts. A call inside a
    leaf part counts once per call of the leaf; a part traced alone (its parent did not trace)
    counts as called once: calls are then counted within that part."""
    counts: Counter = Counter()
    for prefix, graph in trace.parts.items():
        times = counts[prefix] if prefix in trace.leaf_parts else 1
        for node in graph.nodes:
            if node.op == "call_module":
                counts[node.target] += times
    return dict(counts)
