"""``SurgeryOptions``: what a conversion does, validated once, stored in ``surgery.json``.

Every pass reads its selection from here: ``selects(*names)`` is the one ``--include`` /
``--exclude`` matcher and ``selects_kernel(kernel)`` the one ``--kernel-sizes`` test.
``allow_growth`` lets the conv pass convert a conv whose replacement would not be smaller (in
parameters or MACs); by default such a conv is skipped with that reason. ``sites``, when set, is
the exact list of sites (by the qualified name their record carries) to convert out of the
candidates these leave: a budget target (``--target-macs``) resolves to such a list, and
``surgery.json`` stores it, so a rebuild converts the same sites without measuring anything again.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from typing import Any, Dict, FrozenSet, Iterable, Optional, Sequence, Tuple, Union

from .bounds import bounded_number, flag, shown
from .errors import SurgeryError
from .registry import INITIALIZERS, VARIANTS

__all__ = ["SurgeryOptions", "parse_kernel_sizes", "parse_p"]


def parse_kernel_sizes(text: Union[str, Iterable]) -> FrozenSet[Tuple[int, ...]]:
    """``"3,5"`` -> ``{(3, 3), (5, 5)}``; ``"1x7"`` selects a rectangular ``1x7`` kernel, ``"1x3x3"``
    a 3-D one. A square ``k`` (``kxk``) also selects the 1-D kernel ``k`` and the cube ``kxkxk``.
    ``3`` (an int, as recipes and the Python API may give it) is ``"3"``."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = [text]
    try:
        items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    except TypeError:
        items = [text]
    sizes = set()
    for item in items:
        try:
            if isinstance(item, (tuple, list)):
                size = tuple(int(v) for v in item)
            elif isinstance(item, int):
                size = (item, item)
            elif "x" in str(item):
                size = tuple(int(v) for v in str(item).lower().split("x"))
            else:
                size = (int(item),) * 2
        except (TypeError, ValueError):
            size = ()
        if not 2 <= len(size) <= 3 or min(size) < 1:
            raise SurgeryError(
                f"Bad kernel size '{item}' in '{text}': expected positive integers such as 3,5 "
                "(k selects k x k kernels, and k and k x k x k ones of 1-D and 3-D convs; 1x7 a rectangular "
                "one, 1x3x3 a 3-D one)."
            )
        sizes.add(size)
    if not sizes:
        raise SurgeryError("--kernel-sizes needs at least one size, e.g. 3,5.")
    return frozenset(sizes)


def parse_p(value: Union[str, float, Fraction]) -> Union[Fraction, str]:
    """``0.25``, ``"1/6"`` or ``"auto"`` -> an exact ``Fraction`` in (0, 1], or ``"auto"``."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        if isinstance(value, bool) or (isinstance(value, str) and len(value) > 40):
            raise ValueError(value)
        p = Fraction(value.strip()) if isinstance(value, str) else Fraction(value).limit_denominator(1_000_000)
    except (ValueError, ZeroDivisionError, TypeError, OverflowError):  # OverflowError: Fraction(inf)
        p = None
    if p is None or not 0 < p <= 1:
        raise SurgeryError(f"Bad p {shown(value) if not isinstance(value, str) else repr(value[:40])}: expected a "
                           "number in (0, 1] such as 0.25 or 1/6, or 'auto'.")
    return p


@dataclass(frozen=True)
class SurgeryOptions:
    """What a conversion does; everything here is stored in ``surgery.json``."""

    variant: str = "u"
    kernel_sizes: Optional[FrozenSet[Tuple[int, ...]]] = None
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    p: Union[Fraction, str] = Fraction(1, 4)
    with_bn: bool = False
    min_mid_channels: int = 4
    init: str = "default"
    allow_growth: bool = False
    sites: Optional[Tuple[str, ...]] = None

    @classmethod
    def create(cls, variant: str = "u", **options: Any) -> "SurgeryOptions":
        """Validate and normalise user options; unknown names and bad values raise ``SurgeryError``."""
        valid = [f.name for f in fields(cls) if f.name != "variant"]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise SurgeryError(f"Unknown option(s) {', '.join(unknown)}. Valid options: {', '.join(valid)}.")
        VARIANTS.get(variant)
        if options.get("kernel_sizes") is not None:
            options["kernel_sizes"] = parse_kernel_sizes(options["kernel_sizes"])
        if "p" in options:
            options["p"] = parse_p(options["p"])
        for key in ("include", "exclude"):
            if key in options:
                value = options[key]
                options[key] = (value,) if isinstance(value, str) else tuple(value or ())
        if options.get("sites") is not None:
            value = options["sites"]
            options["sites"] = (value,) if isinstance(value, str) else tuple(str(v) for v in value)
        if "min_mid_channels" in options:
            options["min_mid_channels"] = bounded_number(options["min_mid_channels"], "min_mid_channels", integer=True,
                                                         low=1, high=2**20)
        INITIALIZERS.get(options.get("init", "default"))
        for key in ("with_bn", "allow_growth"):
            if key in options:
                flag(options[key], key)
        return cls(variant=variant, **options)

    def to_json(self) -> Dict[str, Any]:
        out = asdict(self)
        out["kernel_sizes"] = None if self.kernel_sizes is None else sorted(list(k) for k in self.kernel_sizes)
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        out["sites"] = None if self.sites is None else list(self.sites)
        out["p"] = str(self.p)
        return out

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "SurgeryOptions":
        """Read ``to_json()`` back. Options saved before ``allow_growth`` existed converted every
        selected conv, growth or not: they read as ``allow_growth=True``, so a rebuild converts the
        same sites."""
        data = dict(data)
        data.setdefault("allow_growth", True)
        return cls.create(data.pop("variant", "u"), **data)

    # -- selection: the one matcher every pass uses ----------------------------------------------

    def selects(self, *names: str) -> bool:
        """``--include`` / ``--exclude`` globs on qualified names: a site with several modules is
        included when any of its names matches an include glob, excluded when any matches an
        exclude glob."""
        if self.include and not any(fnmatch.fnmatchcase(n, g) for n in names for g in self.include):
            return False
        return not any(fnmatch.fnmatchcase(n, g) for n in names for g in self.exclude)

    def in_selected_set(self, name: str) -> bool:
        """``sites``: whether the site recorded as ``name`` is in the exact list (always, without one)."""
        return self.sites is None or name in self.sites

    def selects_kernel(self, kernel: Sequence[int]) -> bool:
        """``--kernel-sizes``: every kernel when none were given; a square ``k x k`` also selects
        ``k`` (1-D) and ``k x k x k`` (3-D)."""
        kernel = tuple(kernel)
        if self.kernel_sizes is None or kernel in self.kernel_sizes:
            return True
        return len(set(kernel)) == 1 and (kernel[0], kernel[0]) in self.kernel_sizes

    @property
    def kernel_sizes_label(self) -> str:
        """``3x3,5x5``: the selected kernel sizes as skip reasons name them."""
        return ",".join("x".join(map(str, k)) for k in sorted(self.kernel_sizes or ()))
