"""Name -> object tables with one error for unknown names (timm's ``_registry.py`` in small).

``VARIANTS`` maps a variant name to the passes it runs (filled by ``surgery.py``);
``INITIALIZERS`` maps an ``--init`` name to the initialiser of converted sites (filled by
``initializers.py``). Both are read through ``get``, so an unknown name always gets the same
message: ``Unknown variant 'x'. Valid variants: s, u.``
"""

from __future__ import annotations

from typing import Dict, Generic, Iterator, List, Optional, TypeVar

from .errors import SurgeryError

__all__ = ["Registry", "VARIANTS", "INITIALIZERS"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects by name; ``what`` names the kind of object in messages (``variant``, ``init``)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: Dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        self._items[name] = obj
        return obj

    def get(self, name: str, label: Optional[str] = None) -> T:
        """The object registered as ``name``; an unknown name raises ``SurgeryError`` naming the
        valid ones (``label`` names what was given, e.g. a command-line option)."""
        if name not in self._items:
            raise SurgeryError(
                f"Unknown {label or self.what} '{name}'. Valid {self.what}s: {', '.join(self.names())}."
            )
        return self._items[name]

    __getitem__ = get

    def names(self) -> List[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"


#: Variant name -> ``make_passes(options) -> [SurgeryPass, ...]``, run in order (``surgery.py``).
VARIANTS: Registry = Registry("variant")

#: Init name -> initialiser ``init(conv, new) -> report extras or None``, or ``None`` for fresh
#: weights (``initializers.py``).
INITIALIZERS: Registry = Registry("init")
