"""Name -> object tables with one error for unknown names (timm's ``_registry.py`` in small).

``VARIANTS`` maps a variant name to the passes it runs (filled by ``passes/variants.py``);
``INITIALIZERS`` maps an ``--init`` name to the initialiser of converted sites (filled by
``initializers.py``); ``METRICS`` maps a ``--metric`` name to the loss a converted model is
ranked by (filled by ``recovery/losses.py``); ``PREPARATIONS`` maps a preparation name to how a model is prepared for
inference (filled by ``inference/preps.py``). Each declares its built-in names here, so checking a
name (``check``, the command line's choices) needs neither torch nor any import order; ``get``
returns the object, and an unknown name always gets the same message:
``Unknown variant 'x'. Valid variants: s, u.``
"""

from __future__ import annotations

from typing import Dict, Generic, Iterable, Iterator, List, Optional, TypeVar

from .errors import SurgeryError

__all__ = ["Registry", "VARIANTS", "INITIALIZERS", "PREPARATIONS", "METRICS", "AUTO", "BACKENDS"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Objects by name; ``what`` names the kind of object in messages (``variant``, ``init``);
    ``builtin`` the names that modules of the package register (valid before they are imported)."""

    def __init__(self, what: str, builtin: Iterable[str] = ()) -> None:
        self.what = what
        self.builtin = tuple(builtin)
        self._items: Dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        self._items[name] = obj
        return obj

    def check(self, name: str, label: Optional[str] = None) -> str:
        """``name`` if it is valid; otherwise ``SurgeryError`` naming the valid ones (``label``
        names what was given, e.g. a command-line option)."""
        if name not in self:
            raise SurgeryError(
                f"Unknown {label or self.what} '{name}'. Valid {self.what}s: {', '.join(self.names())}."
            )
        return name

    def get(self, name: str, label: Optional[str] = None) -> T:
        """The object registered as ``name`` (an unknown name: ``check``'s error)."""
        self.check(name, label)
        if name not in self._items:  # a bug: the module that registers it was not imported
            raise LookupError(f"The built-in {self.what} '{name}' is not registered yet.")
        return self._items[name]

    __getitem__ = get

    def names(self) -> List[str]:
        return sorted({*self.builtin, *self._items})

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self.builtin

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"


#: Variant name -> ``make_passes(options) -> [SurgeryPass, ...]``, run in order (``passes/variants.py``).
VARIANTS: Registry = Registry("variant", ("s", "u"))

#: Init name -> initialiser ``init(conv, new) -> report extras or None``, or ``None`` for fresh
#: weights (``initializers.py``).
INITIALIZERS: Registry = Registry("init", ("auto", "default", "svd"))

#: Metric name -> how a fidelity result becomes the one loss sensitivity ranks sites by
#: (``recovery/losses.py``).
METRICS: Registry = Registry("metric", ("auto", "bce", "disagreement", "kl", "relative-error"))

#: Preparation name -> ``Preparation`` (``inference/preps.py``); ``AUTO`` is the measured choice among them.
PREPARATIONS: Registry = Registry("preparation", ("aot", "aot_conv", "channels_last", "compiled", "eager", "fused", "ort"))
AUTO = "auto"

#: Where the benchmark times the models (``benchmark.py``).
BACKENDS = ("torch", "ort", "both")
