"""``SurgeryOptions``: what a conversion does, validated once, stored in ``surgery.json``.

Every pass reads its selection from here: ``selects(*names)`` is the one ``--include`` /
``--exclude`` matcher and ``selects_kernel(kernel)`` the one ``--kernel-sizes`` test.
``allow_growth`` lets the conv pass convert a conv whose replacement would not be smaller (in
parameters or MACs), and the depthwise-separable pass reorder a pair that would grow; by default
such a site is skipped with that reason. ``sites``, when set, is
the exact list of sites (by the qualified name their record carries) to convert out of the
candidates these leave: a budget target (``--target-macs``) resolves to such a list, and
``surgery.json`` stores it, so a rebuild converts the same sites without measuring anything again.

``bounded_threads`` is the one check of a thread count (``benchmark --threads``, the API's
``threads=``): at least one, at most the machine's CPUs.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from typing import Any, Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from .bounds import bounded_number, flag, shown
from .errors import SurgeryError, arg, close_matches
from .registry import INITIALIZERS, VARIANTS

__all__ = ["SurgeryOptions", "Option", "SURGERY_OPTIONS", "CLI_FLAGS", "Scope", "Target", "SITE_TYPES", "make_options", "parse_kernel_sizes", "parse_p",
           "bounded_threads"]

#: The kinds of site a conversion can touch (``Scope.types``): standard convs, depthwise-separable pairs
#: (reordered into BSConv-U) and linear bottlenecks (BSConv-S projections).
SITE_TYPES = ("conv", "dsc", "bottleneck")


def bounded_threads(threads: int, label: str = "threads") -> int:
    """``threads`` if it is a whole number from 1 to the machine's CPU count; otherwise a
    ``SurgeryError`` naming the range (a thread pool of 100000 threads crashes the process)."""
    cpus = os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= cpus:
        raise SurgeryError(f"{label} {threads!r} is not a thread count for this machine: give a whole number from "
                           f"1 to {cpus} (its CPUs).")
    return threads


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
        raise SurgeryError(f"{arg('kernel_sizes')} needs at least one size, e.g. 3,5.")
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
                           "number in (0, 1] such as 0.25 or 1/6, or 'auto'.", argument="p")
    return p


@dataclass(frozen=True)
class Option:
    """One option of a conversion, declared once: its Python keyword (``convert(**options)``,
    ``SurgeryOptions``) and recipe key ``name``, its default and help, the type a recipe's YAML
    value may have, and how the command line spells it (``flag``; ``--kernel-sizes`` for
    ``kernel_sizes`` unless given). The click options, the recipe schema, the compare command's
    variant SPEC keys and the CLI's names in messages are all made from ``SURGERY_OPTIONS``."""

    name: str
    default: Any
    help: str
    annotation: Any = str
    metavar: Optional[str] = None
    flag: Optional[str] = None
    is_flag: bool = False
    multiple: bool = False

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def key(self) -> str:
        """The key in a variant SPEC of ``compare`` (``kernel-sizes``)."""
        return self.cli_flag[2:]


#: Every option of a conversion (the fields of ``SurgeryOptions`` a user sets), in the order the
#: command line shows them.
SURGERY_OPTIONS: Dict[str, Option] = {o.name: o for o in (
    Option("variant", "u", "u: BSConv-U (standard convs, depthwise-separable pairs); s: BSConv-S (standard convs, "
           "linear bottlenecks)."),
    Option("kernel_sizes", None, "Only standard convs with these kernels (3 = 3x3, 1x7 = rectangular).",
           Optional[Union[int, str, List[Union[int, str]]]], metavar="K[,K...]"),
    Option("include", (), "Only sites whose qualified name matches (repeatable).", List[str], "GLOB", multiple=True),
    Option("exclude", (), "Leave sites whose qualified name matches (repeatable).", List[str], "GLOB", multiple=True),
    Option("types", None, "Only these kinds of site: conv, dsc, bottleneck (repeatable; default: all).",
           Optional[List[str]], "TYPE", flag="--type", multiple=True),
    Option("p", "1/4", "BSConv-S subspace ratio M'/M: a float, a fraction such as 1/6, or auto.", Union[float, str]),
    Option("with_bn", False, "BatchNorm inside BSConv (stabilises deep ResNets; not in the paper's derivation).", bool,
           is_flag=True),
    Option("min_mid_channels", 4, "Lower bound on BSConv-S M'.", int),
    Option("init", "auto", "svd: start from the source's own filters (best rank-1 / truncated-SVD fit); default: fresh "
           "weights (as the reference implementation); auto: svd when trained weights are loaded (a checkpoint or "
           "published weights), else default."),
    Option("allow_growth", False, "Also convert standard convs whose replacement would not have fewer parameters or "
           "MACs (one input channel; patchify convs whose kernel equals their stride), and reorder depthwise-separable "
           "pairs that would grow (a stride-2 pair, N > M). By default they are skipped with that reason; a budget "
           "never chooses them.", bool, is_flag=True),
    Option("allow_unmatched", False, "Accept --include/--exclude patterns that match no candidate conv (by default "
           "such a pattern is an error listing the closest names).", bool, is_flag=True),
)}

#: How the command line spells each Python argument a library message may name (``arg()`` in
#: ``core/errors.py``): the options above, and the other arguments of ``load_model``/``convert``.
CLI_FLAGS: Dict[str, str] = {
    **{o.name: o.cli_flag for o in SURGERY_OPTIONS.values()},
    "example_inputs": "--input-size", "input_size": "--input-size", "calibration": "--calib", "limit": "--calib-batches",
    "target.macs": "--target-macs", "target.params": "--target-params", "recalibrate_bn": "--recalibrate-bn",
    "metric": "--metric",
    "memory_check=False": "--no-memory-check", "num_classes": "--num-classes", "checkpoint": "--checkpoint",
    "pretrained": "--pretrained", "pretrained=True": "--pretrained", "weights": "--weights", "force=True": "--force",
    "plot": "--plot", "dynamic_batch=False": "--static-batch",
    "allow_unmatched=True": "--allow-unmatched", "trust_code=True": "--trust-code", "model_args": "--model-arg",
    "resume=True": "--resume",
    "batch_size": "--batch-size", "backend": "--backend", "device": "--device", "threads": "--threads",
}


def _default(name: str) -> Any:
    return SURGERY_OPTIONS[name].default


@dataclass(frozen=True)
class SurgeryOptions:
    """What a conversion does (``SURGERY_OPTIONS`` says what each option means); everything here
    is stored in ``surgery.json``. ``sites`` is set by a budget target, not by the user.

    >>> import bsconv_surgery as bs
    >>> bs.SurgeryOptions.create("s", p="1/6", kernel_sizes="3").p
    Fraction(1, 6)
    """

    variant: str = _default("variant")
    kernel_sizes: Optional[FrozenSet[Tuple[int, ...]]] = _default("kernel_sizes")
    include: Tuple[str, ...] = _default("include")
    exclude: Tuple[str, ...] = _default("exclude")
    p: Union[Fraction, str] = parse_p(_default("p"))
    with_bn: bool = _default("with_bn")
    min_mid_channels: int = _default("min_mid_channels")
    init: str = _default("init")
    allow_growth: bool = _default("allow_growth")
    sites: Optional[Tuple[str, ...]] = None
    types: Optional[Tuple[str, ...]] = _default("types")
    allow_unmatched: bool = _default("allow_unmatched")

    @classmethod
    def create(cls, variant: str = "u", **options: Any) -> "SurgeryOptions":
        """Validate and normalise user options; unknown names and bad values raise ``SurgeryError``."""
        valid = [f.name for f in fields(cls) if f.name != "variant"]
        scope = options.pop("scope", None)
        if scope is not None:  # a Scope stands for the four options it holds
            if not isinstance(scope, Scope):
                raise SurgeryError(f"scope must be a Scope(include=..., exclude=..., types=...), not {type(scope).__name__}.")
            given = sorted({"include", "exclude", "types", "allow_unmatched"} & set(options))
            if given:
                raise SurgeryError(f"Pass {', '.join(given)} in the scope or as keywords, not both.")
            options.update(include=scope.include, exclude=scope.exclude, types=scope.types,
                           allow_unmatched=scope.allow_unmatched)
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise SurgeryError(f"Unknown option(s) {', '.join(unknown)}. Valid options: {', '.join(valid)}.")
        VARIANTS.check(variant)
        if options.get("kernel_sizes") is not None:
            options["kernel_sizes"] = parse_kernel_sizes(options["kernel_sizes"])
        if "p" in options:
            options["p"] = parse_p(options["p"])
        for key in ("include", "exclude"):
            if key in options:
                value = options[key]
                options[key] = (value,) if isinstance(value, str) else tuple(value or ())
        if options.get("types") is not None:
            options["types"] = Scope(types=options["types"]).types
        if options.get("sites") is not None:
            value = options["sites"]
            options["sites"] = (value,) if isinstance(value, str) else tuple(str(v) for v in value)
        if "min_mid_channels" in options:
            options["min_mid_channels"] = bounded_number(options["min_mid_channels"], "min_mid_channels", integer=True,
                                                         low=1, high=2**20)
        INITIALIZERS.check(options.get("init", "auto"))
        for key in ("with_bn", "allow_growth", "allow_unmatched"):
            if key in options:
                flag(options[key], key)
        return cls(variant=variant, **options)

    def to_json(self) -> Dict[str, Any]:
        out = asdict(self)
        out["kernel_sizes"] = None if self.kernel_sizes is None else sorted(list(k) for k in self.kernel_sizes)
        out["include"], out["exclude"] = list(self.include), list(self.exclude)
        out["sites"] = None if self.sites is None else list(self.sites)
        out["p"] = str(self.p)
        if self.types is None:  # written only when set: files without them read the same
            del out["types"]
        else:
            out["types"] = list(self.types)
        if not self.allow_unmatched:
            del out["allow_unmatched"]
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

    @property
    def scope(self) -> "Scope":
        """The include/exclude globs and site types as a ``Scope`` (strict unless ``allow_unmatched``)."""
        return Scope(self.include, self.exclude, self.types, self.allow_unmatched)

    def selects(self, *names: str) -> bool:
        """The ``Scope``'s include/exclude globs on qualified names: a site with several modules is
        included when any of its names matches an include glob, excluded when any matches an
        exclude glob."""
        return self.scope.selects(*names)

    def selects_type(self, kind: str) -> bool:
        """Whether the pass of ``kind`` runs (``Scope.types``)."""
        return self.scope.selects_type(kind)

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


def _patterns(value: Union[str, Iterable[str], None], name: str) -> Tuple[str, ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else tuple(value)
    bad = [v for v in items if not isinstance(v, str) or not v.strip()]
    if bad:
        raise SurgeryError(f"Bad {name} pattern {bad[0]!r}: expected glob patterns on qualified module names such as "
                           "'layer4.*'.")
    return items


@dataclass(frozen=True)
class Scope:
    """Which candidate sites a conversion considers: ``include`` / ``exclude`` globs on qualified
    module names (a site with several modules matches when any of them does) and the site
    ``types`` (``"conv"``, ``"dsc"``, ``"bottleneck"``; default all). A pattern that matches no
    candidate is an error naming the closest names (a mistyped ``exclude`` would otherwise
    convert everything), unless ``allow_unmatched``. ``convert(model, scope=Scope(...))`` takes
    one in place of the ``include``/``exclude``/``types`` keywords.

    >>> import bsconv_surgery as bs
    >>> scope = bs.Scope(exclude=("layer4.*",))
    >>> scope.selects("layer3.0.conv1"), scope.selects("layer4.1.conv2")
    (True, False)
    >>> bs.Scope(include=("layer9.*",)).check(["layer1.0.conv1", "layer2.0.conv1"])
    Traceback (most recent call last):
    ...
    bsconv_surgery.core.errors.SurgeryError: include pattern 'layer9.*' matches no candidate conv (close names: layer2.0.conv1, layer1.0.conv1). Pass allow_unmatched=True to allow it.
    """

    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    types: Optional[Tuple[str, ...]] = None
    allow_unmatched: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "include", _patterns(self.include, "include"))
        object.__setattr__(self, "exclude", _patterns(self.exclude, "exclude"))
        if self.types is not None:
            types = (self.types,) if isinstance(self.types, str) else tuple(self.types)
            unknown = [t for t in types if t not in SITE_TYPES]
            if unknown or not types:
                raise SurgeryError(f"Unknown site type(s) {', '.join(map(repr, unknown)) or '(none given)'}. Valid "
                                   f"types: {', '.join(SITE_TYPES)}.")
            object.__setattr__(self, "types", types)
        if not isinstance(self.allow_unmatched, bool):
            raise SurgeryError(f"allow_unmatched must be true or false, not {self.allow_unmatched!r}.")

    def selects(self, *names: str) -> bool:
        """Whether a site made of the modules ``names`` is in scope."""
        if self.include and not any(fnmatch.fnmatchcase(n, g) for n in names for g in self.include):
            return False
        return not any(fnmatch.fnmatchcase(n, g) for n in names for g in self.exclude)

    def selects_type(self, kind: str) -> bool:
        """Whether sites of a pass's ``kind`` (``"dsc->bsconv_u"``: type ``dsc``) are in scope."""
        return self.types is None or kind.split("->")[0] in self.types

    def check(self, candidates: Iterable[str]) -> None:
        """Refuse a pattern that matches none of the ``candidates`` (qualified conv names)."""
        if self.allow_unmatched:
            return
        names = list(dict.fromkeys(candidates))
        for option, patterns in (("include", self.include), ("exclude", self.exclude)):
            for pattern in patterns:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                    raise SurgeryError(f"{arg(option)} pattern '{pattern}' matches no candidate conv "
                                       f"({_close(pattern, names)}). Pass {arg('allow_unmatched=True')} to allow it.")


def _close(pattern: str, names: List[str]) -> str:
    """The names a mistyped pattern most likely meant (its literal part compared with each)."""
    if not names:
        return "the model has no candidate conv"
    stem = pattern.rstrip("*?.[]")
    close = close_matches(stem, names, n=4, cutoff=0.5) or [n for n in names if n.startswith(stem[:3])][:4]
    if close:
        return f"close names: {', '.join(close)}"
    return f"{len(names)} candidate convs, e.g. {', '.join(names[:4])}"


@dataclass(frozen=True)
class Target:
    """A budget for ``convert``: ``macs`` and/or ``params``, each a fraction of the original in
    (0, 1] such as ``0.5``, or a count such as ``"300M"`` / ``2.5e6``. ``convert`` converts the set
    of sites that reaches it with the least measured loss.

    >>> import bsconv_surgery as bs
    >>> bs.Target(macs=0.5).metrics()
    [('macs', 0.5)]
    """

    macs: Optional[Union[float, int, str]] = None
    params: Optional[Union[float, int, str]] = None

    def __post_init__(self) -> None:
        if self.macs is None and self.params is None:
            raise SurgeryError("A Target needs macs or params (a fraction such as 0.5 or a count such as '300M').")

    def metrics(self) -> List[Tuple[str, Union[float, int, str]]]:
        """``(metric, value)`` for each budget given, MACs first."""
        return [(m, v) for m, v in (("macs", self.macs), ("params", self.params)) if v is not None]

    @classmethod
    def of(cls, value: Union["Target", Mapping[str, Any], None]) -> Optional["Target"]:
        """A ``Target``, a mapping such as ``{"macs": 0.5}``, or ``None``."""
        if value is None or isinstance(value, Target):
            return value
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - {"macs", "params"})
            if unknown:
                raise SurgeryError(f"Unknown target key(s) {', '.join(unknown)}: a target has macs and/or params.")
            return cls(**value)
        raise SurgeryError(f"target must be a Target(macs=..., params=...) or a mapping such as {{'macs': 0.5}}, not "
                           f"{type(value).__name__}.")


def make_options(options: Union[str, "SurgeryOptions"], keywords: Dict[str, Any]) -> "SurgeryOptions":
    """The options of a call such as ``convert(model, options, **keywords)``: a variant name with the
    options as keywords (``variant="s"`` may stand for the name), or a ``SurgeryOptions`` alone."""
    if "variant" in keywords:
        if options != _default("variant"):
            raise SurgeryError(f"Give the variant once: options={options!r} and variant={keywords['variant']!r}.")
        keywords = dict(keywords)
        options = keywords.pop("variant")
    if isinstance(options, SurgeryOptions):
        if keywords:
            raise SurgeryError("Pass the options in the SurgeryOptions or as keywords, not both.")
        return options
    if not isinstance(options, str):
        raise SurgeryError(f"options must be a variant name such as 'u' or a SurgeryOptions, not {type(options).__name__}.")
    return SurgeryOptions.create(options, **keywords)
