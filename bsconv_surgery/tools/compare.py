"""``compare``: the parameter and MAC budgets of several BSConv variants of one model, side by
side, in total and per stage.

A variant SPEC is ``orig`` (the model as built) or a surgery variant with options:
``u``, ``s``, ``s:p=1/6``, ``s:p=auto``, ``u:kernel-sizes=3,5``, ``s:p=1/4,with-bn``,
``s:p=1/6,exclude=stem.conv``. Every variant is counted on a freshly built model converted by
``surgery.convert``; nothing is hand-built.

Stages are those of ``stages.py``: timm's feature stages where the model has them, else its
top-level children; they add up to the totals exactly.
"""

from __future__ import annotations

import copy
import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from torch import nn

from ..analysis.counting import Budget, count_budget, counter_info
from ..core.errors import SurgeryError
from ..io.files import atomic_file, check_new_file
from ..analysis.memory import check_memory
from ..models.inputs import ExampleInputs
from ..models.zoo import ModelSpec, example_inputs_for, load_model, model_source, parse_model_spec
from ..core.options import SURGERY_OPTIONS, SurgeryOptions
from ..core.records import ConversionReport, count_by_kind
from ..core.registry import VARIANTS
from ..analysis.stages import Stage, model_stages, stage_budgets
from ..surgery import convert

__all__ = [
    "ORIGINAL",
    "DEFAULT_VARIANTS",
    "VariantSpec",
    "parse_variant",
    "parse_variants",
    "VariantBudget",
    "Comparison",
    "compare",
    "check_csv_path",
    "write_csv",
]

ORIGINAL = "orig"
DEFAULT_VARIANTS = ("orig", "u", "s")

#: The option keys of a variant SPEC (``kernel-sizes=3,5``), made from the one declaration of the
#: conversion options (``core/options.py``); the variant is the SPEC's name.
_OPTIONS = {o.key: o.name for o in SURGERY_OPTIONS.values() if o.name != "variant"}
_LIST_OPTIONS = {o.key for o in SURGERY_OPTIONS.values() if o.multiple or o.name == "kernel_sizes"}
_FLAG_OPTIONS = {o.key for o in SURGERY_OPTIONS.values() if o.is_flag}
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


# ---------------------------------------------------------------------------------------------
# variant SPECs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VariantSpec:
    """One column of a comparison: ``variant`` is ``None`` for the original model; ``options``
    are the SPEC's options as written, ``surgery`` the ``SurgeryOptions`` they validated to."""

    label: str
    variant: Optional[str]
    options: Tuple[Tuple[str, Any], ...] = ()
    surgery: Optional[SurgeryOptions] = field(default=None, compare=False, repr=False)

    @property
    def kwargs(self) -> Dict[str, Any]:
        """The SPEC's options as ``SurgeryOptions.create`` keywords."""
        return dict(self.options)

    def surgery_options(self) -> SurgeryOptions:
        """The options this variant converts with (validated once, by ``parse_variant``)."""
        return self.surgery if self.surgery is not None else SurgeryOptions.create(self.variant, **self.kwargs)


def _spec_help() -> str:
    names = ", ".join([ORIGINAL] + sorted(VARIANTS))
    keys = ", ".join(sorted(_OPTIONS))
    return (
        f"A variant SPEC is NAME or NAME:OPTION[,OPTION...] with NAME one of {names} and OPTION one of "
        f"{keys} written key=value (with-bn and allow-growth also bare), e.g. orig, u, s:p=1/6, s:p=auto, "
        "u:kernel-sizes=3,5, s:p=1/4,with-bn."
    )


def _flag(key: str, value: str, text: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise SurgeryError(f"Bad value '{value}' for {key} in variant SPEC '{text}': expected true or false. {_spec_help()}")


def _convert_value(key: str, value: str, text: str) -> Any:
    if key in _FLAG_OPTIONS:
        return _flag(key, value, text)
    if key == "min-mid-channels":
        try:
            return int(value)
        except ValueError:
            raise SurgeryError(f"Bad min-mid-channels '{value}' in variant SPEC '{text}': expected an integer.") from None
    if key in _LIST_OPTIONS and key != "kernel-sizes":
        return tuple(v for v in value.split(",") if v)
    return value


def parse_variant(text: str) -> VariantSpec:
    """``"s:p=1/6"`` -> ``VariantSpec("s:p=1/6", "s", (("p", "1/6"),))``; options are validated
    with ``SurgeryOptions.create`` so a bad SPEC fails here, naming what is allowed."""
    text = text.strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    if name == ORIGINAL:
        if rest.strip():
            raise SurgeryError(f"Variant SPEC '{text}': '{ORIGINAL}' takes no options. {_spec_help()}")
        return VariantSpec(ORIGINAL, None)
    if name not in VARIANTS:
        raise SurgeryError(f"Unknown variant '{name}' in SPEC '{text}'. {_spec_help()}")
    raw: Dict[str, str] = {}
    last = None
    for token in (t.strip() for t in rest.replace(":", ",").split(",")) if rest.strip() else ():
        key, eq, value = token.partition("=")
        key = key.strip()
        if eq and key in _OPTIONS:
            if key in raw:
                raise SurgeryError(f"Option '{key}' given twice in variant SPEC '{text}'.")
            raw[key], last = value.strip(), key
        elif not eq and token in _FLAG_OPTIONS:
            raw[token], last = "true", None
        elif not eq and token and last in _LIST_OPTIONS:
            raw[last] += "," + token  # kernel-sizes=3,5 / exclude=a,b: the comma continues the value
        else:
            raise SurgeryError(f"Bad option '{token}' in variant SPEC '{text}'. {_spec_help()}")
    values = {k: _convert_value(k, v, text) for k, v in raw.items()}
    options = tuple((_OPTIONS[k], v) for k, v in values.items())
    try:
        surgery = SurgeryOptions.create(name, **dict(options))
    except SurgeryError as exc:
        raise SurgeryError(f"Variant SPEC '{text}': {exc}") from None
    shown = [k if v is True else f"{k}=false" if v is False else f"{k}={raw[k]}" for k, v in values.items()]
    return VariantSpec(name + (":" + ",".join(shown) if shown else ""), name, options, surgery)


def _starts_spec(token: str) -> bool:
    return token.partition(":")[0].strip() in {ORIGINAL, *VARIANTS}


def parse_variants(texts: Iterable[Union[str, VariantSpec]]) -> List[VariantSpec]:
    """Parse ``--variant`` values; each may also list several SPECs separated by commas
    (``orig,u,s``); a comma followed by something that is not a variant name continues the
    previous SPEC's option (``u:kernel-sizes=3,5,s`` is two SPECs). Labels must be unique."""
    specs: List[VariantSpec] = []
    for text in texts:
        if isinstance(text, VariantSpec):
            specs.append(text)
            continue
        parts: List[str] = []
        for token in text.split(","):
            if parts and not _starts_spec(token):
                parts[-1] += "," + token
            else:
                parts.append(token)
        specs.extend(parse_variant(p) for p in parts if p.strip() or len(parts) == 1)
    seen = set()
    for spec in specs:
        if spec.label in seen:
            raise SurgeryError(f"Variant '{spec.label}' is given twice.")
        seen.add(spec.label)
    if not specs:
        raise SurgeryError(f"No variant given. {_spec_help()}")
    return specs


# ---------------------------------------------------------------------------------------------
# the comparison
# ---------------------------------------------------------------------------------------------


def _ratio(value: Optional[int], base: Optional[int]) -> Optional[float]:
    return None if value is None or not base else value / base


@dataclass
class VariantBudget:
    """The counted result of one variant."""

    spec: VariantSpec
    budget: Budget
    stages: Dict[str, Tuple[int, Optional[int]]]
    report: Optional[ConversionReport] = None  # the conversion report (None for the original)

    @property
    def params(self) -> int:
        return self.budget.params

    @property
    def macs(self) -> Optional[int]:
        return self.budget.macs

    def sites(self) -> Dict[str, int]:
        """Converted sites by kind (``conv->bsconv_u``: 19, ...), plus ``skipped``."""
        if self.report is None:
            return {}
        return {**count_by_kind(self.report.replaced), "skipped": len(self.report.skipped)}


@dataclass
class Comparison:
    """Budgets of several variants of one model at one input size."""

    model: str
    input_size: Tuple[int, ...]
    num_classes: Optional[int]
    stages: List[Stage]
    original: Budget
    variants: List[VariantBudget] = field(default_factory=list)

    def rows(self) -> List[Stage]:
        """Breakdown rows with parameters or MACs in at least one variant, in order."""
        return [st for st in self.stages if any(v.stages[st.name][0] or v.stages[st.name][1] for v in self.variants)]

    def to_json(self) -> Dict[str, Any]:
        variants = []
        for v in self.variants:
            entry: Dict[str, Any] = {
                "spec": v.spec.label,
                "variant": v.spec.variant,
                "options": {k: list(val) if isinstance(val, tuple) else val for k, val in v.spec.options},
                "params": v.params,
                "macs": v.macs,
                "params_ratio": _ratio(v.params, self.original.params),
                "macs_ratio": _ratio(v.macs, self.original.macs),
            }
            entry.update({k: val for k, val in v.budget.to_dict().items() if k not in ("params", "macs")})
            entry["warnings"] = v.budget.warnings()
            if v.report is not None:
                entry["sites"] = v.sites()
                entry["surgery_options"] = v.report.options.to_json()
            entry["stages"] = [{"name": st.name, "params": v.stages[st.name][0], "macs": v.stages[st.name][1]}
                               for st in self.rows()]
            variants.append(entry)
        return {
            "model": self.model,
            "input_size": list(self.input_size),
            "num_classes": self.num_classes,
            "counter": counter_info(),
            "original": {"params": self.original.params, "macs": self.original.macs},
            "stages": [
                {"name": st.name, "reduction": st.reduction, "channels": st.channels, "also": list(st.also)}
                for st in self.rows()
            ],
            "variants": variants,
        }

    def csv_rows(self) -> List[Dict[str, Any]]:
        """One row per variant and stage; stage ``total`` first."""
        rows = []
        for v in self.variants:
            base = {"model": self.model, "input_size": "x".join(map(str, self.input_size)), "variant": v.spec.label}
            rows.append({**base, "stage": "total", "params": v.params, "macs": v.macs,
                         "params_ratio": _ratio(v.params, self.original.params),
                         "macs_ratio": _ratio(v.macs, self.original.macs)})
            for st in self.rows():
                p, m = v.stages[st.name]
                rows.append({**base, "stage": st.name, "params": p, "macs": m, "params_ratio": None, "macs_ratio": None})
        return rows


def _count(model: nn.Module, spec: VariantSpec, stages: List[Stage], inputs: ExampleInputs, cross_check: bool,
           report: Optional[ConversionReport] = None) -> VariantBudget:
    budget = count_budget(model, inputs, cross_check=cross_check)
    return VariantBudget(spec, budget, stage_budgets(model, budget, stages), report)


def compare(
    model: Union[str, ModelSpec],
    variants: Iterable[Union[str, VariantSpec]] = DEFAULT_VARIANTS,
    *,
    input_size: Optional[Sequence[int]] = None,
    num_classes: Optional[int] = None,
    cross_check: bool = True,
    memory_check: bool = True,
    pretrained: bool = False,
    weights: Optional[str] = None,
    model_args: Optional[Dict[str, Any]] = None,
) -> Comparison:
    """Count ``model`` (a spec such as ``"cifar_resnet20"`` or ``"timm:resnet18"``) as each
    variant: a fresh model per variant, converted by ``surgery.convert``, counted by fvcore at
    batch 1 and ``input_size`` (default: the model's own, e.g. 3x32x32 for the CIFAR models),
    conv MACs cross-checked with ``FlopCounterMode`` unless ``cross_check=False``; an input whose
    forward pass cannot fit in memory is refused first unless ``memory_check=False``. With
    ``pretrained`` (or ``weights``) the model is built with its published weights once and each
    variant converts a copy of it (an ``init="svd"`` variant then starts from them)."""
    spec = model if isinstance(model, ModelSpec) else parse_model_spec(model)
    specs = parse_variants([variants] if isinstance(variants, str) else variants)
    original = load_model(spec, num_classes=num_classes, pretrained=pretrained, weights=weights, model_args=model_args)
    source = model_source(original)
    pristine = copy.deepcopy(original) if source.pretrained is not None else None  # before any forward pass
    inputs = example_inputs_for(original, input_size)
    if memory_check:
        check_memory(original, inputs)
    stages = model_stages(original)
    classes = getattr(original, "num_classes", None) or source.num_classes
    want_original = any(s.variant is None for s in specs)
    base = _count(original, VariantSpec(ORIGINAL, None), stages, inputs, cross_check and want_original)
    result = Comparison(str(spec), inputs.size, classes, stages, base.budget)
    for s in specs:
        if s.variant is None:
            result.variants.append(base)
            continue
        fresh = copy.deepcopy(pristine) if pristine is not None else load_model(spec, num_classes=num_classes, model_args=model_args)
        converted = convert(fresh, s.surgery_options(), example_inputs=inputs, count=False)
        result.variants.append(_count(converted.model, s, stages, inputs, cross_check, converted.report))
    return result


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------

CSV_FIELDS = ("model", "input_size", "variant", "stage", "params", "macs", "params_ratio", "macs_ratio")


def check_csv_path(path: Union[str, Path], force: bool = False) -> Path:
    """Refuse an existing file unless ``force``, and anything that is not a file."""
    return check_new_file(path, "CSV", force)


def write_csv(comparison: Comparison, path: Union[str, Path], force: bool = False) -> Path:
    """Write ``comparison.csv_rows()`` to ``path`` atomically; an existing file is refused
    unless ``force``."""
    path = check_csv_path(path, force)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in comparison.csv_rows():
        writer.writerow({k: "" if v is None else (f"{v:.6f}" if isinstance(v, float) else v) for k, v in row.items()})
    with atomic_file(path) as tmp:
        tmp.write_text(buf.getvalue(), newline="")
    return path
