"""What every pass shares: the context, the base class and the module swap by qualified name."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import List, Set

from torch import nn

from ..fx.discovery import Discovery
from ..fx.tracing import TraceResult

__all__ = ["SurgeryContext", "SurgeryPass"]


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
