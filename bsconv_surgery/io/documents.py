"""The one YAML loader (recipes, ``--set`` values) and the one JSON loader (``surgery.json``, caches).

Both are bounded, so a hostile or damaged file is a clear error, never a hang or a
``RecursionError``:

- nesting deeper than ``MAX_DEPTH`` levels is refused (checked while reading: YAML as it is
  composed, JSON by a scan of its brackets outside strings before it is parsed);
- a YAML document whose aliases expand to more than ``MAX_VALUES`` values (an alias bomb: nine
  aliases of nine aliases ... of a list), or deeper than ``MAX_DEPTH``, or that refers to itself,
  is refused before anything walks it (the expansion is counted on the composed nodes, each
  node once);
- an integer beyond ``bounds.MAX_INT`` (or written with more than ``bounds.MAX_TEXT`` digits) is
  refused where it is read, with its line.

``load_yaml`` raises ``yaml.YAMLError`` (``LimitError``, with ``problem`` and ``problem_mark``,
for the limits) and ``load_json`` raises ``ValueError``: each reader words the
message for its file.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict

import yaml
from yaml import MarkedYAMLError

from ..core.bounds import MAX_INT, MAX_TEXT

__all__ = ["MAX_DEPTH", "MAX_VALUES", "LimitError", "load_yaml", "load_json"]

#: The deepest nesting of mappings and lists a document may have.
MAX_DEPTH = 64
#: The most values (scalars, lists, mappings) a YAML document may expand to, aliases included.
MAX_VALUES = 100_000


class LimitError(MarkedYAMLError):
    """A YAML document beyond a limit of this module (``problem`` says which, ``problem_mark`` where)."""

    def __init__(self, problem: str, mark) -> None:
        super().__init__(problem=problem, problem_mark=mark)


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with the limits above."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise LimitError(f"nested more than {MAX_DEPTH} levels deep",
                                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_yaml_int(self, node):
        if len(node.value) > MAX_TEXT:
            raise LimitError(f"an integer of {len(node.value)} characters is too large",
                                   node.start_mark)
        value = super().construct_yaml_int(node)
        if abs(value) > MAX_INT:
            raise LimitError(f"the integer {node.value} is too large (at most {MAX_INT})",
                                   node.start_mark)
        return value


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [item for pair in node.value for item in pair]
    return []


def _check_expansion(root) -> None:
    """Refuse a node graph that expands (aliases followed) to more than ``MAX_VALUES`` values or
    ``MAX_DEPTH`` levels, or that contains itself; each node is visited once (no recursion)."""
    size: Dict[int, int] = {}
    depth: Dict[int, int] = {}
    on_path = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            on_path.discard(key)
            kids = _children(node)
            size[key] = min(1 + sum(size[id(k)] for k in kids), MAX_VALUES + 1)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_VALUES:
                raise LimitError(f"its aliases expand to more than {MAX_VALUES:,} values (an alias "
                                    "bomb?)", node.start_mark)
            if depth[key] > MAX_DEPTH:
                raise LimitError(f"its aliases expand to more than {MAX_DEPTH} levels of nesting",
                                    node.start_mark)
            continue
        if key in size:
            continue
        if key in on_path:
            raise LimitError("an alias refers to the value that contains it", node.start_mark)
        on_path.add(key)
        stack.append((node, True))
        stack.extend((kid, False) for kid in _children(node) if id(kid) not in size)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)`` within the limits of this module."""
    loader = _BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _json_depth_ok(text: str) -> bool:
    depth = 0
    for match in _TOKENS.finditer(text):
        token = match.group()
        if token in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif token in "]}":
            depth -= 1
    return True


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_TEXT or abs(int(text)) > MAX_INT:
        raise ValueError(f"the integer {text[:20]}{'...' if len(text) > 20 else ''} is too large")
    return int(text)


def load_json(text: str) -> Any:
    """``json.loads(text)`` within the limits of this module (``ValueError`` beyond them)."""
    if not _json_depth_ok(text):
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
    return json.loads(text, parse_int=_bounded_int)
