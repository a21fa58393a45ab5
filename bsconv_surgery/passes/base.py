"""What every pass shares: the context, the base class and the module swap by qualified name."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import List, Set

from torch import nn

from ..discovery import Discovery
from ..tracing import TraceResult, parent_name

__all__ = ["SurgeryContext", "SurgeryPass", "swap_module", "param_count"]


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def swap_module(model: nn.Module, name: str, new: nn.Module) -> List[str]:
    """Replace the submodule at ``name`` by ``new`` under every name that refers to the same
    object (aliases); returns the names replaced. Keeps the old module's train/eval mode."""
    old = model.get_submodule(name)
    new.train(old.training)
    aliases = [n for n, m in model.named_modules(remove_duplicate=False) if m is old]
    for alias in aliases:
        parent, child = parent_name(alias)
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return aliases


@dataclass
class SurgeryContext:
    """What the passes share: the graph, the conv facts, the user's selection and options."""

    trace: TraceResult
    discovery: Discovery
    options: "object"  # surgery.SurgeryOptions (kept loose to avoid an import cycle)
    claimed: Set[str] = field(default_factory=set)
    replaced: List[dict] = field(default_factory=list)
    skipped: List[dict] = field(default_factory=list)

    def selected(self, name: str) -> bool:
        """``--include`` / ``--exclude`` globs on the qualified name."""
        include = self.options.include
        if include and not any(fnmatch.fnmatchcase(name, g) for g in include):
            return False
        return not any(fnmatch.fnmatchcase(name, g) for g in self.options.exclude)

    def skip(self, name: str, kind: str, reason: str) -> None:
        self.skipped.append({"name": name, "kind": kind, "reason": reason})


class SurgeryPass:
    """Base class: ``kind`` names the rewrite in the report (e.g. ``conv->bsconv_u``)."""

    kind: str = ""

    def transform(self, model: nn.Module, ctx: SurgeryContext) -> None:
        raise NotImplementedError
