"""Walks over a traced graph and the roles of its nodes: what the passes ask of the graph.

- roles: ``layer_role`` (norm / act / identity / drop), ``activation_of`` (the nonlinearity a
  module applies), ``function_activation``, ``conv_info`` (discovery's facts on a conv node),
  ``describe`` and ``innermost_module`` (for skip reasons);
- backward: ``walk_back`` from a conv to the conv that feeds it (``Chain``: the norm/act/gate
  nodes between, or why the walk stopped), ``pointwise_after_depthwise`` (every pointwise conv
  fed by a depthwise conv), ``nearest_depthwise_upstream``;
- products: ``split_product`` / ``gate_branch`` (``x * gate(x)``, a squeeze-excite) and
  ``in_gate_branch``;
- forward: ``walk_forward`` through identities, drop-path and residual adds, ``sole_reader``;
- ``breadth_first``: the one bounded breadth-first walk the others use.
"""

from __future__ import annotations

import operator
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import torch
from torch import fx, nn

from .discovery import META_KEY, ConvInfo, is_conv
from .tracing import FROZEN_BATCHNORM_NAMES

__all__ = [
    "DROP_NAMES",
    "layer_role",
    "activation_of",
    "function_activation",
    "conv_info",
    "describe",
    "innermost_module",
    "Chain",
    "split_product",
    "gate_branch",
    "walk_back",
    "breadth_first",
    "nearest_depthwise_upstream",
    "pointwise_after_depthwise",
    "is_mul",
    "is_add",
    "in_gate_branch",
    "in_drop_module",
    "walk_forward",
    "sole_reader",
]


# --------------------------------------------------------------------------------------------
# Norm / activation recognition
# --------------------------------------------------------------------------------------------

_NOT_ELEMENTWISE = (nn.MultiheadAttention, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d)
_ACT_MODULE_PREFIXES = ("torch.nn.modules.activation", "timm.layers.activations")
DROP_NAMES = {"DropPath", "StochasticDepth", "DropBlock2d"}


def layer_role(module: Optional[nn.Module]) -> Optional[str]:
    """``norm`` (channel norms: BatchNorm and subclasses such as timm ``BatchNormAct2d``,
    GroupNorm, InstanceNorm, timm ``LayerNorm2d``), ``act`` (torch and timm activation modules),
    ``identity``, ``drop`` (dropout, drop-path) or ``None`` for anything else."""
    if module is None:
        return None
    cls = type(module)
    if isinstance(module, nn.Identity):
        return "identity"
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)):
        return "norm"
    if isinstance(module, nn.LayerNorm) and "2d" in cls.__name__:  # timm LayerNorm2d: channels-first
        return "norm"
    if cls.__name__ in FROZEN_BATCHNORM_NAMES:
        return "norm"
    if isinstance(module, nn.modules.dropout._DropoutNd) or cls.__name__ in DROP_NAMES:
        return "drop"
    if isinstance(module, _NOT_ELEMENTWISE):
        return None
    if cls.__module__.startswith(_ACT_MODULE_PREFIXES):
        return "act"
    return None


def activation_of(module: Optional[nn.Module]) -> Optional[str]:
    """The class name of the nonlinearity ``module`` applies, ``None`` when it is linear.

    A norm with a fused activation (timm ``BatchNormAct2d``) applies its ``act`` unless that is
    ``nn.Identity`` (timm's linear-bottleneck norms are ``BatchNormAct2d(act=Identity)``).
    """
    role = layer_role(module)
    if role == "act":
        return type(module).__name__
    if role == "norm":
        act = getattr(module, "act", None)
        if isinstance(act, nn.Module) and layer_role(act) not in ("identity", None):
            return type(act).__name__
    return None


_ACT_FUNCTIONS = {
    "relu", "relu_", "relu6", "silu", "silu_", "hardswish", "hardswish_", "hardsigmoid", "gelu",
    "sigmoid", "sigmoid_", "tanh", "tanh_", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu",
    "celu", "mish", "hardtanh", "hardtanh_", "clamp", "clamp_", "clip", "swish", "hard_swish",
    "hard_sigmoid", "hard_mish", "softplus", "prelu", "rrelu", "threshold",
}


def function_activation(node: fx.Node) -> Optional[str]:
    """The name of the activation a functional node applies (``F.relu``, ``x.relu()``...)."""
    if node.op == "call_method":
        name = str(node.target)
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")
    else:
        return None
    return name if name in _ACT_FUNCTIONS else None


def conv_info(node: Optional[fx.Node]) -> Optional[ConvInfo]:
    """The ``ConvInfo`` discovery attached to a conv node, else ``None``."""
    return node.meta.get(META_KEY) if node is not None and node.op == "call_module" else None


def describe(node: fx.Node, modules: Dict[str, nn.Module]) -> str:
    """``'blocks.0.bn1' (BatchNormAct2d)``, ``functional mul``, ``method mean``, ``the model input``."""
    if node.op == "call_module":
        return f"'{node.target}' ({type(modules.get(node.target)).__name__})"
    if node.op == "call_function":
        return f"functional {getattr(node.target, '__name__', node.target)}"
    if node.op == "call_method":
        return f"method .{node.target}()"
    if node.op == "placeholder":
        return "the model input"
    return f"{node.op} {node.target}"


def innermost_module(node: fx.Node) -> Optional[Tuple[str, type]]:
    """``(qualified name, class)`` of the module whose forward produced ``node`` (FX records it)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    value = list(stack.values())[-1]
    return (value[0], value[1]) if isinstance(value, tuple) and len(value) == 2 else None


# --------------------------------------------------------------------------------------------
# Backward walk from a conv to the conv that feeds it
# --------------------------------------------------------------------------------------------

_MUL = {operator.mul, torch.mul, operator.imul}
_ADD = {operator.add, operator.iadd, torch.add}


def _ancestors(node: fx.Node) -> Set[fx.Node]:
    seen: Set[fx.Node] = set()
    stack = list(node.all_input_nodes)
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


@dataclass
class Chain:
    """What lies between an upstream conv node and a downstream conv node.

    ``path`` holds the nodes on the main path in forward order (``call_module`` norm/act/identity
    /drop nodes and gating ``mul`` nodes); ``gates`` maps each gating ``mul`` to the nodes of its
    gate branch (a squeeze-excite: pool, reduce, act, expand, sigmoid). ``problem`` says why the
    walk stopped before reaching a conv, or why the chain is not private (other users).
    """

    end: fx.Node
    conv: Optional[fx.Node] = None
    path: List[fx.Node] = field(default_factory=list)
    gates: Dict[fx.Node, Set[fx.Node]] = field(default_factory=dict)
    problem: Optional[str] = None
    problem_node: Optional[fx.Node] = None

    def modules_between(self, modules: Dict[str, nn.Module]) -> List[str]:
        """Qualified names of the modules called between the two convs (gate modules included)."""
        names: List[str] = []
        for node in self.path:
            if node.op == "call_module":
                if layer_role(modules.get(node.target)) != "identity":
                    names.append(node.target)
            elif node in self.gates:
                owner = innermost_module(node)
                if owner and owner[0] not in names:
                    names.append(owner[0])
        return names


def split_product(mul: fx.Node) -> Tuple[Optional[fx.Node], Set[fx.Node], Optional[str]]:
    """For ``mul(a, b)`` where one side is computed from the other (``x * gate(x)``): returns
    ``(x, nodes of the gate branch, None)``, else ``(None, set(), reason)``."""
    tensors = [a for a in mul.args if isinstance(a, fx.Node)]
    if len(tensors) != 2 or mul.kwargs:
        return None, set(), f"{describe(mul, {})} with {len(tensors)} tensor argument(s)"
    a, b = tensors
    anc_a, anc_b = _ancestors(a), _ancestors(b)
    if a in anc_b:
        main, gate, anc_gate, anc_main = a, b, anc_b, anc_a
    elif b in anc_a:
        main, gate, anc_gate, anc_main = b, a, anc_a, anc_b
    else:
        return None, set(), "a product of two tensors neither of which is computed from the other"
    return main, ({gate} | anc_gate) - anc_main - {main}, None


def gate_branch(mul: fx.Node) -> Tuple[Optional[fx.Node], Optional[Set[fx.Node]], Optional[str]]:
    """``split_product`` plus the check that the gate branch reads only ``x`` and feeds only
    the product: returns ``(x, branch, None)`` or ``(None, None, reason)``."""
    main, branch, reason = split_product(mul)
    if reason:
        return None, None, reason
    for n in branch:
        for i in n.all_input_nodes:
            if i is not main and i not in branch and i.op != "get_attr":
                return None, None, f"the gate of this product also reads '{i.name}'"
        for u in n.users:
            if u is not mul and u not in branch:
                return None, None, f"'{n.name}' of the gate branch has another user '{u.name}'"
    return main, branch, None


def walk_back(end: fx.Node, modules: Dict[str, nn.Module], allow_gates: bool = True,
              allow_drop: bool = True) -> Chain:
    """Walk from the input of conv node ``end`` back to the conv that produces it.

    Accepted on the way: ``call_module`` norm, activation and identity modules (and dropout /
    drop-path with ``allow_drop``), and with ``allow_gates`` squeeze-excite style products
    ``x * gate(x)`` whose gate branch reads only ``x``. Every node from the upstream conv to
    ``end`` must feed only the next node of the chain (or its gate branch); otherwise
    ``problem`` names the node and its other users.
    """
    chain = Chain(end)
    back: List[fx.Node] = []
    cur = end.args[0] if end.args else None
    while True:
        if not isinstance(cur, fx.Node):
            chain.problem = "the input is not a tensor node"
            return chain
        if cur.op == "call_module":
            module = modules.get(cur.target)
            if is_conv(module):
                chain.conv = cur
                break
            role = layer_role(module)
            if role in ("norm", "act", "identity") or (role == "drop" and allow_drop):
                back.append(cur)
                cur = cur.args[0] if cur.args else None
                continue
            chain.problem, chain.problem_node = f"{describe(cur, modules)} is not a norm or activation module", cur
            return chain
        if allow_gates and is_mul(cur):
            main, branch, reason = gate_branch(cur)
            if reason:
                chain.problem, chain.problem_node = reason, cur
                return chain
            chain.gates[cur] = branch
            back.append(cur)
            cur = main
            continue
        chain.problem, chain.problem_node = f"{describe(cur, modules)} sits on the path", cur
        return chain
    chain.path = list(reversed(back))
    # privacy: each node feeds only its successor on the path (or a gate branch hanging off it)
    gate_nodes = set().union(*chain.gates.values()) if chain.gates else set()
    sequence = [chain.conv] + chain.path + [end]
    for node, nxt in zip(sequence[:-1], sequence[1:]):
        others = [u for u in node.users if u is not nxt and u not in gate_nodes]
        if others:
            shown = ", ".join(describe(u, modules) for u in others[:3])
            chain.problem, chain.problem_node = (
                f"the output of {describe(node, modules)} also goes to {shown}", node)
            return chain
    return chain


def breadth_first(
    start: Iterable[fx.Node], neighbours: Callable[[fx.Node], Iterable[fx.Node]], limit: int
) -> Iterator[fx.Node]:
    """The nodes reached from ``start`` breadth-first, each once, at most ``limit`` of them;
    ``neighbours(n)`` gives the nodes to go on to from ``n`` (nothing: stop there)."""
    seen: Set[fx.Node] = set()
    queue = deque(start)
    while queue and len(seen) < limit:
        n = queue.popleft()
        if n in seen:
            continue
        seen.add(n)
        yield n
        queue.extend(neighbours(n))


def nearest_depthwise_upstream(node: Optional[fx.Node], limit: int = 32) -> Optional[fx.Node]:
    """The first depthwise conv node met walking the inputs of ``node`` breadth-first, without
    walking through other convs (at most ``limit`` nodes): tells whether a chain walk that
    stopped at ``node`` started below a depthwise conv."""
    if node is None:
        return None
    def inputs_unless_conv(n: fx.Node) -> List[fx.Node]:
        return [] if conv_info(n) is not None else n.all_input_nodes

    for n in breadth_first(node.all_input_nodes, inputs_unless_conv, limit):
        info = conv_info(n)
        if info is not None and info.kind == "depthwise":
            return n
    return None


def pointwise_after_depthwise(
    graph: fx.Graph, modules: Dict[str, nn.Module], allow_gates: bool
) -> Iterable[Tuple[fx.Node, ConvInfo, "Chain", fx.Node]]:
    """``(pointwise node, its ConvInfo, the chain walked back from it, depthwise node)`` for every
    pointwise conv whose input comes from a depthwise conv: directly through the chain, or from
    upstream of where the chain walk stopped (the chain's ``problem`` then says why). Convs
    inside a squeeze-excite gate are left out. ``allow_gates`` also allows drop-path."""
    for node in list(graph.nodes):
        pw = conv_info(node)
        if pw is None or pw.kind != "pointwise":
            continue
        chain = walk_back(node, modules, allow_gates=allow_gates, allow_drop=allow_gates)
        if chain.conv is not None:
            dw_node = chain.conv
        elif in_gate_branch(node):
            continue  # a conv inside a squeeze-excite gate
        else:
            dw_node = nearest_depthwise_upstream(chain.problem_node)
        dw = conv_info(dw_node)
        if dw is not None and dw.kind == "depthwise":
            yield node, pw, chain, dw_node


def is_mul(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _MUL
    return node.op == "call_method" and node.target in ("mul", "mul_")


def is_add(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD
    return node.op == "call_method" and node.target in ("add", "add_")


def in_gate_branch(node: fx.Node, radius: int = 12) -> bool:
    """Whether ``node`` belongs to the gate branch of a product ``x * gate(x)`` downstream of it
    (the reduce/expand convs inside a squeeze-excite): such convs are no pair's pointwise."""
    return any(is_mul(n) and node in split_product(n)[1]
               for n in breadth_first(node.users, lambda n: n.users, radius))


# --------------------------------------------------------------------------------------------
# Forward walks
# --------------------------------------------------------------------------------------------


def in_drop_module(node: fx.Node) -> bool:
    """A node of a drop-path / stochastic-depth module traced through (timm ``DropPath`` in
    train mode dissolves into ``new_empty``/``bernoulli_``/``mul``)."""
    owner = innermost_module(node)
    return bool(owner) and owner[1].__name__ in DROP_NAMES


def walk_forward(start: fx.Node, modules: Dict[str, nn.Module],
                 limit: int = 400) -> Tuple[List[fx.Node], List[Tuple[int, fx.Node]]]:
    """Walk forward from the users of ``start`` through identity/dropout/drop-path modules and
    residual adds. Returns the activations met and the conv nodes where the walk stopped, with
    their depth (1 for a direct user)."""
    acts: List[fx.Node] = []
    convs: List[Tuple[int, fx.Node]] = []
    seen = set()
    queue = [(u, 1) for u in start.users]
    while queue and len(seen) < limit:
        node, depth = queue.pop(0)
        if node in seen:
            continue
        seen.add(node)
        if conv_info(node) is not None:
            convs.append((depth, node))
            continue
        if node.op == "call_module":
            module = modules.get(node.target)
            if activation_of(module):
                acts.append(node)
            elif layer_role(module) in ("identity", "drop"):
                queue.extend((u, depth + 1) for u in node.users)
            continue
        if function_activation(node) and not in_drop_module(node):
            acts.append(node)
        elif is_add(node) or in_drop_module(node):
            queue.extend((u, depth + 1) for u in node.users)
    return acts, convs


def sole_reader(node: fx.Node, modules: Dict[str, nn.Module], calls: Dict[str, int]) -> Optional[nn.Module]:
    """The module that is the only user of ``node`` and is called nowhere else, else ``None``."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and calls.get(users[0].target) == 1:
        return modules.get(users[0].target)
    return None
