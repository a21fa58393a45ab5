"""Typed records of what a conversion did, and their JSON, in one place.

- ``SiteRecord``: one site a pass changed (``replaced``), with pass-specific ``details``;
- ``SkipRecord``: one site a pass left alone, and why (``skipped``);
- ``ModelSource``: where the converted model came from (spec, class count, checkpoint and its
  SHA-256, or the published weights: ``PretrainedWeights``), so a saved conversion can be rebuilt
  and its teacher found;
- ``ConversionReport``: everything ``convert`` reports; ``to_json()`` is the object
  ``convert --json`` prints and ``surgery.json`` stores, ``from_json()`` reads it back;
- ``count_by_kind``: the one "sites by kind" counter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from .options import SurgeryOptions

__all__ = [
    "SiteRecord",
    "SkipRecord",
    "ModelSource",
    "PretrainedWeights",
    "TracingInfo",
    "BudgetNumbers",
    "ConversionReport",
    "count_by_kind",
]

#: The ``SiteRecord`` fields every record has, in JSON order (``details`` follow, then MACs).
_SITE_FIELDS = ("name", "kind", "cls", "in_channels", "out_channels", "kernel", "stride", "params_before",
                "params_after", "calls")


@dataclass
class SiteRecord:
    """One site a pass changed. ``details`` holds what only that pass knows (``mid_channels``
    and ``p`` of a BSConv-S, the ``depthwise``/``pointwise``/``removed`` modules of a reordered
    pair, the ``projection`` of a bottleneck, an initialiser's extras, ...); ``details["modules"]``
    lists the modules of a site that spans several (``module_names``). MACs are set once the
    conversion has counted them (``macs_counted``)."""

    name: str
    kind: str
    cls: str
    in_channels: int
    out_channels: int
    kernel: List[int]
    stride: List[int]
    params_before: int
    params_after: int
    calls: Optional[int]
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None
    details: Dict[str, Any] = field(default_factory=dict)
    macs_counted: bool = False

    @property
    def module_names(self) -> List[str]:
        """The qualified names of the modules this site swapped."""
        return list(self.details.get("modules") or [self.name])

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {key: getattr(self, key) for key in _SITE_FIELDS}
        out["kernel"], out["stride"] = list(self.kernel), list(self.stride)
        out.update(self.details)
        if self.macs_counted:
            out["macs_before"], out["macs_after"] = self.macs_before, self.macs_after
        return out

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "SiteRecord":
        details = dict(data)
        core = {key: details.pop(key, None) for key in _SITE_FIELDS}
        counted = "macs_before" in details
        macs = details.pop("macs_before", None), details.pop("macs_after", None)
        return cls(**core, macs_before=macs[0], macs_after=macs[1], details=details, macs_counted=counted)


@dataclass
class SkipRecord:
    """A site a pass left alone, with the reason (``details``: pass-specific, e.g. the conv of
    a BatchNorm that was not folded)."""

    name: str
    kind: str
    reason: str
    details: Dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "reason": self.reason, **self.details}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "SkipRecord":
        details = {k: v for k, v in data.items() if k not in ("name", "kind", "reason")}
        return cls(data["name"], data["kind"], data["reason"], details)


@dataclass(frozen=True)
class PretrainedWeights:
    """A set of published weights a model was built with, and where they were found.

    ``zoo`` is ``timm`` (``name`` = ``arch.tag``, ``hub_id`` and ``revision`` on the Hugging Face
    hub, or a ``url`` cached by torch hub) or ``torchvision`` (``name`` = the weights enum entry such
    as ``ResNet50_Weights.IMAGENET1K_V2``, with its ``url``); ``file`` is the weights file's name,
    ``path`` where it was loaded from, ``sha256`` its hash, ``num_classes`` the classes of its head.
    The teacher of a distillation run is rebuilt from this (same revision, same hash)."""

    zoo: str
    name: str
    file: str
    sha256: str
    num_classes: Optional[int] = None
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    url: Optional[str] = None
    path: Optional[str] = None

    @property
    def label(self) -> str:
        """``timm/resnet50.a1_in1k@<revision>`` or ``ResNet50_Weights.IMAGENET1K_V2`` (+ file)."""
        if self.hub_id:
            return f"{self.hub_id} ({self.file}" + (f", revision {self.revision[:12]})" if self.revision else ")")
        return f"{self.name} ({self.file})"

    def to_json(self) -> Dict[str, Any]:
        return {key: value for key, value in self.__dict__.items() if value is not None}

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "PretrainedWeights":
        return cls(data["zoo"], data["name"], data["file"], data["sha256"], data.get("num_classes"),
                   data.get("hub_id"), data.get("revision"), data.get("url"), data.get("path"))


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from: its zoo spec (``None`` for a module given without one), class
    count, the checkpoint loaded into it and that file's SHA-256, or the published weights it was
    built with (``pretrained``; ``weights`` names them: ``resnet50.a1_in1k``,
    ``ResNet50_Weights.IMAGENET1K_V2``), and ``head_replaced`` (``[weights' classes, classes]``)
    when ``num_classes`` gave the pretrained model a fresh head. For a model built by your own code
    (``py:module:callable``, ``file:path.py:callable``): ``model_args`` (the callable's keyword
    arguments), ``code_sha256`` (a ``file:`` spec's file, checked when it is rebuilt) and
    ``callable_weights`` (the callable builds the same weights every time: trained ones it loads
    itself, such as ``ONet(pretrained=True)``)."""

    spec: Optional[str]
    num_classes: Optional[int] = None
    checkpoint: Optional[str] = None
    checkpoint_sha256: Optional[str] = None
    weights: Optional[str] = None
    pretrained: Optional[PretrainedWeights] = None
    head_replaced: Optional[Tuple[int, int]] = None
    model_args: Optional[Dict[str, Any]] = None
    code_sha256: Optional[str] = None
    callable_weights: bool = False

    @property
    def trained(self) -> bool:
        """Whether the model started from trained weights (a checkpoint, published weights, or the
        fixed weights its own code builds)."""
        return self.checkpoint is not None or self.pretrained is not None or self.callable_weights

    @property
    def runs_code(self) -> bool:
        """Whether rebuilding the model runs code named by the spec (``py:`` or ``file:``)."""
        return self.spec is not None and self.spec.split(":", 1)[0] in ("py", "file")

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"spec": self.spec, "num_classes": self.num_classes}
        for key in ("checkpoint", "checkpoint_sha256", "weights", "model_args", "code_sha256"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.callable_weights:
            out["callable_weights"] = True
        if self.pretrained is not None:
            out["pretrained"] = self.pretrained.to_json()
        if self.head_replaced is not None:
            out["head_replaced"] = list(self.head_replaced)
        return out

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "ModelSource":
        pretrained = data.get("pretrained")
        head = data.get("head_replaced")
        return cls(data.get("spec"), data.get("num_classes"), data.get("checkpoint"), data.get("checkpoint_sha256"),
                   data.get("weights"), PretrainedWeights.from_json(pretrained) if pretrained else None,
                   tuple(head) if head else None, data.get("model_args"), data.get("code_sha256"),
                   bool(data.get("callable_weights", False)))


@dataclass
class TracingInfo:
    """How the graph was found: ``fx`` (the whole model), ``fx parts`` (the whole model did not
    trace, ``parts`` did: the largest submodules that trace) or the ``named_modules fallback``
    (nothing traced); ``error`` says why the whole model did not trace, ``fallbacks`` why each
    module above the parts did not. ``parts`` also lists the leaf modules traced on their own
    (``leaf_parts``)."""

    method: str
    error: Optional[str] = None
    note: Optional[str] = None
    parts: List[str] = field(default_factory=list)
    fallbacks: Dict[str, str] = field(default_factory=dict)
    leaf_parts: List[str] = field(default_factory=list)

    @property
    def traced(self) -> bool:
        return self.method == "fx"

    @property
    def partial(self) -> bool:
        return self.method == "fx parts"

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"method": self.method, "error": self.error}
        if self.parts and self.parts != [""]:
            out["parts"] = list(self.parts)
        if self.leaf_parts:
            out["leaf_parts"] = list(self.leaf_parts)
        if self.fallbacks:
            out["fallbacks"] = dict(self.fallbacks)
        if self.note is not None:
            out["note"] = self.note
        return out

    @classmethod
    def from_json(cls, data: Dict[str, Any]) -> "TracingInfo":
        return cls(data["method"], data.get("error"), data.get("note"), list(data.get("parts") or []),
                   dict(data.get("fallbacks") or {}), list(data.get("leaf_parts") or []))


@dataclass
class BudgetNumbers:
    """The MAC counts a conversion reports for one side (before or after)."""

    macs: Optional[int]
    conv_macs: Optional[int]
    unsupported_ops: Dict[str, int] = field(default_factory=dict)
    uncounted_compute_ops: Dict[str, int] = field(default_factory=dict)
    error: Optional[str] = None

    @staticmethod
    def to_json(numbers: Optional["BudgetNumbers"], side: str) -> Dict[str, Any]:
        """``macs_<side>`` and friends; only ``macs_<side>: None`` when nothing was counted."""
        if numbers is None:
            return {f"macs_{side}": None}
        out: Dict[str, Any] = {
            f"macs_{side}": numbers.macs,
            f"conv_macs_{side}": numbers.conv_macs,
            f"unsupported_ops_{side}": dict(numbers.unsupported_ops),
            f"uncounted_compute_ops_{side}": dict(numbers.uncounted_compute_ops),
        }
        if numbers.error:
            out[f"macs_error_{side}"] = numbers.error
        return out

    @classmethod
    def from_json(cls, data: Dict[str, Any], side: str) -> Optional["BudgetNumbers"]:
        if f"conv_macs_{side}" not in data:
            return None
        return cls(data[f"macs_{side}"], data[f"conv_macs_{side}"], data.get(f"unsupported_ops_{side}") or {},
                   data.get(f"uncounted_compute_ops_{side}") or {}, data.get(f"macs_error_{side}"))


@dataclass
class ConversionReport:
    """What ``convert`` did to one model (see the README for each field's meaning)."""

    model: str
    options: SurgeryOptions
    input_size: Tuple[int, ...]
    tracing: TracingInfo
    conv_census: Dict[str, int]
    params_before: int
    params_after: int
    before: Optional[BudgetNumbers]
    after: Optional[BudgetNumbers]
    counter: Dict[str, str]
    output_shape: Any
    replaced: List[SiteRecord] = field(default_factory=list)
    skipped: List[SkipRecord] = field(default_factory=list)
    other_convs: List[Dict[str, str]] = field(default_factory=list)
    hidden_convs: List[Dict[str, Any]] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)
    fidelity: Optional[Dict[str, Any]] = None
    p_auto: Optional[Dict[str, Any]] = None
    source: Optional[ModelSource] = None
    saved_to: Optional[str] = None
    input_family: Optional[str] = None
    selection: Optional[Dict[str, Any]] = None
    recalibration: Optional[Dict[str, Any]] = None

    @property
    def variant(self) -> str:
        return self.options.variant

    @property
    def macs_before(self) -> Optional[int]:
        return self.before.macs if self.before is not None else None

    @property
    def macs_after(self) -> Optional[int]:
        return self.after.macs if self.after is not None else None

    @property
    def checkpoint(self) -> Optional[str]:
        return self.source.checkpoint if self.source is not None else None

    def to_json(self) -> Dict[str, Any]:
        """The report as ``convert --json`` prints it (and ``surgery.json`` stores it)."""
        out: Dict[str, Any] = {
            "model": self.model,
            "variant": self.variant,
            "options": self.options.to_json(),
            "input_size": list(self.input_size),
            **({"input_family": self.input_family} if self.input_family else {}),
            "tracing": self.tracing.to_json(),
            "conv_census": dict(self.conv_census),
            "params_before": self.params_before,
            "params_after": self.params_after,
            **BudgetNumbers.to_json(self.before, "before"),
            **BudgetNumbers.to_json(self.after, "after"),
            "counter": dict(self.counter),
            "output_shape": self.output_shape,
            "replaced": [r.to_json() for r in self.replaced],
            "skipped": [s.to_json() for s in self.skipped],
            "other_convs": [dict(o) for o in self.other_convs],
            "hidden_convs": [dict(h) for h in self.hidden_convs],
            "seconds": dict(self.seconds),
        }
        for key in ("fidelity", "selection", "recalibration", "p_auto", "checkpoint", "saved_to"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.source is not None and self.source.pretrained is not None:
            out["pretrained"] = self.source.pretrained.to_json()
        if self.source is not None and self.source.head_replaced is not None:
            out["head_replaced"] = list(self.source.head_replaced)
        return out

    @classmethod
    def from_json(cls, data: Dict[str, Any], source: Optional[ModelSource] = None) -> "ConversionReport":
        """Read ``to_json()`` output back; ``source`` is the one ``surgery.json`` stores beside the
        report (without it, only the report's ``checkpoint`` is known of the source)."""
        if source is None and (data.get("checkpoint") is not None or data.get("pretrained") is not None):
            pretrained = PretrainedWeights.from_json(data["pretrained"]) if data.get("pretrained") else None
            head = data.get("head_replaced")
            source = ModelSource(None, checkpoint=data.get("checkpoint"), pretrained=pretrained,
                                 weights=pretrained.name if pretrained is not None else None,
                                 head_replaced=tuple(head) if head else None)
        return cls(
            model=data["model"],
            options=SurgeryOptions.from_json(data["options"]),
            input_size=tuple(data["input_size"]),
            tracing=TracingInfo.from_json(data["tracing"]),
            conv_census=dict(data.get("conv_census") or {}),
            params_before=data["params_before"],
            params_after=data["params_after"],
            before=BudgetNumbers.from_json(data, "before"),
            after=BudgetNumbers.from_json(data, "after"),
            counter=dict(data.get("counter") or {}),
            output_shape=data.get("output_shape"),
            replaced=[SiteRecord.from_json(r) for r in data.get("replaced", [])],
            skipped=[SkipRecord.from_json(s) for s in data.get("skipped", [])],
            other_convs=list(data.get("other_convs", [])),
            hidden_convs=list(data.get("hidden_convs", [])),
            seconds=dict(data.get("seconds") or {}),
            fidelity=data.get("fidelity"),
            p_auto=data.get("p_auto"),
            source=source,
            saved_to=data.get("saved_to"),
            input_family=data.get("input_family"),
            selection=data.get("selection"),
            recalibration=data.get("recalibration"),
        )


def count_by_kind(records: Iterable[Any], kind: Callable[[Any], str] = lambda record: record.kind) -> Dict[str, int]:
    """How many records there are of each kind, in order of first appearance."""
    out: Dict[str, int] = {}
    for record in records:
        key = kind(record)
        out[key] = out.get(key, 0) + 1
    return out
