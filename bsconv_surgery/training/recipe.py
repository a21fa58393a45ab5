"""Training recipes: YAML validated against a strict schema, with ``--set KEY=VALUE`` overrides.

Every section forbids unknown keys, so a typo fails loudly; errors name the key and what is allowed.
The resolved recipe (file + overrides + command-line options) is what a run saves and resumes from.

``data`` keys that say ``auto`` (the default; null means the same) follow the model and the
data: ``training/data.py: resolve_data`` fills them from the model's ``DataSettings`` when a run
starts (input size and channels from the conversion, normalisation from the model's own config,
augmentation by input size, workers from the machine) and records where each came from in
``data.derived_from``; a value the recipe or ``--set`` gives wins.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Dict, Iterable, List, Literal, Optional, Tuple, Type, Union, get_args

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, StrictBool, StrictFloat, StrictInt,
                      ValidationError, create_model, field_validator, model_validator)

from ..data.datasets import parse_data_name
from ..core.errors import SurgeryError, close_matches
from ..core.options import SURGERY_OPTIONS, Option, SurgeryOptions
from ..core.settings import (DistillMethod, FeatureWeight, LearningRate, MixupAlpha, Momentum, Steps, Temperature,
                             Text, WeightDecay)
from ..io.documents import LimitError, load_yaml
from ..io.files import child_path

__all__ = ["Recipe", "load_recipe", "recipe_from_dict", "recipe_to_yaml", "parse_override", "resolve_recipe_path",
           "RECIPES_DIR", "AUTO"]

#: The recipes shipped with the package (package data, in the wheel too); a bare name such as
#: ``digits-demo`` is looked up here.
RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


#: The text that asks for a derived value (``None`` in Python).
AUTO = "auto"


def _auto(value: Any) -> Any:
    return None if isinstance(value, str) and value.strip().lower() == AUTO else value


def Auto(annotation: Any) -> Any:  # noqa: N802 - a type constructor
    """``annotation`` or ``auto`` (read as ``None``, written back as ``auto``): derived when a run starts."""
    return Annotated[Optional[annotation], BeforeValidator(_auto),
                     PlainSerializer(lambda v: AUTO if v is None else v, when_used="json")]


class AugmentConfig(_Section):
    crop_padding: int = Field(0, ge=0, le=1024, description="Random shifts: pad N px, crop back (paper CIFAR: 4).")
    hflip: bool = Field(False, description="Random horizontal flips.")
    random_resized_crop: bool = Field(False, description="Inception-style scale augmentation (ImageNet).")
    scale: Tuple[float, float] = Field((0.08, 1.0), description="Area range of random_resized_crop.")
    color_jitter: float = Field(0.0, ge=0, description="Brightness/contrast/saturation jitter strength.")
    gamma: Optional[Tuple[float, float]] = Field(None, description="Random gamma range, e.g. [0.8, 1.25].")
    resize: Optional[int] = Field(None, ge=1, le=8192, description="Short side before cropping (default image_size/0.875).")

    @field_validator("scale", "gamma")
    @classmethod
    def _ordered_range(cls, value):
        if value is not None and not 0 < value[0] <= value[1]:
            raise ValueError(f"expected a range [low, high] with 0 < low <= high, got {list(value)}")
        return value


Stat = Annotated[float, Field(ge=-1e6, le=1e6)]


class DataConfig(_Section):
    name: Optional[Text] = Field(None, description="digits, cifar10, cifar100, imagefolder:PATH or images:PATH (unlabelled).")
    root: Optional[Text] = Field(None, description="Where cifar10/cifar100 live (--data-dir).")
    download: bool = Field(False, description="Download cifar10/cifar100 into root (needs internet).")
    image_size: Auto(Annotated[int, Field(ge=8, le=4096)]) = Field(
        None, description="Training and evaluation resolution; auto: the conversion's input size (a spec: its own "
        "when it has trained weights, else the data's: digits 16, CIFAR 32, photos 224).")
    channels: Auto(Annotated[int, Field(ge=1, le=4)]) = Field(
        None, description="Image channels the model takes (1: gray); auto: from the conversion / the model.")
    mean: Auto(List[Stat]) = Field(None, description="Per-channel mean; auto: the model's own (timm config, "
                                   "torchvision weights) for photos, a labelled set's own statistics, else ImageNet's.")
    std: Auto(List[Stat]) = Field(None, description="Per-channel std; auto: as mean.")
    interpolation: Auto(Literal["nearest", "bilinear", "bicubic"]) = Field(
        None, description="Resizing of photos; auto: the model's (timm: often bicubic), else bilinear.")
    crop_pct: Auto(Annotated[float, Field(gt=0, le=1)]) = Field(
        None, description="Evaluation centre crop / resized short side; auto: the model's, else 0.875.")
    batch_size: int = Field(64, ge=1, le=2**20, description="Per process.")
    eval_batch_size: Optional[int] = Field(None, ge=1, le=2**20, description="Per process; default batch_size.")
    workers: Auto(Annotated[int, Field(ge=0, le=128)]) = Field(
        None, description="DataLoader worker processes; auto: one per core but one, at most 7; 0 on 1-2 cores.")
    augment: Auto(AugmentConfig) = Field(
        None, description="Training augmentation; auto: by input size (<= 32 px shifts of 1/8, >= 96 px random "
        "resized crops; flips except digits). A section given (any key) is used as it is.")
    derived_from: Dict[str, Text] = Field(default_factory=dict, description="Where each auto value came from "
                                          "(written when a run starts).")

    @model_validator(mode="after")
    def _stats(self):
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together: give both, or neither (auto)")
        if self.mean is not None and (len(self.mean) != len(self.std) or not self.mean):
            raise ValueError(f"mean and std need the same number of values, one per channel (got {len(self.mean)} "
                             f"and {len(self.std)})")
        if self.std is not None and min(self.std) <= 0:
            raise ValueError(f"std must be positive, got {self.std}")
        return self

    def auto_keys(self) -> List[str]:
        """The keys still ``auto`` (derived when a run starts)."""
        return [key for key in AUTO_KEYS if getattr(self, key) is None]

    @field_validator("name")
    @classmethod
    def _known_dataset(cls, value):
        if value is not None:
            try:
                parse_data_name(value)
            except SurgeryError as exc:
                raise ValueError(str(exc)) from None
        return value


#: The data keys that may say ``auto``.
AUTO_KEYS = ("image_size", "channels", "mean", "std", "interpolation", "crop_pct", "workers", "augment")


class OptimizerConfig(_Section):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: LearningRate = Field(0.1, description="Peak learning rate (after warmup).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only.")
    nesterov: bool = False
    weight_decay: WeightDecay = 1e-4
    betas: Tuple[float, float] = Field((0.9, 0.999), description="AdamW only.")


class ScheduleConfig(_Section):
    name: Literal["cosine", "multistep", "linear", "constant"] = Field(
        "cosine", description="cosine (per step), multistep (x gamma at milestones), linear (to zero, per epoch)."
    )
    warmup_epochs: float = Field(0.0, ge=0, le=1e6, description="Linear warmup from zero, per step.")
    milestones: List[int] = Field(default_factory=list, description="Epochs at which multistep multiplies by gamma.")
    gamma: float = Field(0.1, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0, description="Final learning rate of cosine.")

    @model_validator(mode="after")
    def _milestones(self):
        ms = self.milestones
        if any(m < 1 for m in ms) or ms != sorted(set(ms)):
            raise ValueError(f"milestones must be increasing positive epoch numbers, got {ms}")
        if self.name == "multistep" and not ms:
            raise ValueError("multistep needs milestones, e.g. [100, 150, 180]")
        return self


class _SurgerySection(_Section):
    """Convert a model spec on the fly before training: the keys are the conversion options as
    declared once (``core/options.py``: ``SURGERY_OPTIONS``), with their defaults."""

    @model_validator(mode="after")
    def _valid_options(self):
        try:
            self.options()
        except SurgeryError as exc:
            raise ValueError(str(exc)) from None
        return self

    def options(self) -> SurgeryOptions:
        """The ``SurgeryOptions`` these keys stand for (raises ``SurgeryError`` on bad values)."""
        data = self.model_dump()
        if isinstance(data["kernel_sizes"], int):
            data["kernel_sizes"] = [data["kernel_sizes"]]
        if data.get("types") is None:
            data.pop("types", None)
        return SurgeryOptions.create(data.pop("variant"), **data)


def _surgery_field(option: Option) -> Tuple[Any, Any]:
    # names and patterns are non-empty text in a recipe (settings.Text), as on the command line
    annotation = {str: Text, List[str]: List[Text], Optional[List[str]]: Optional[List[Text]]}.get(
        option.annotation, option.annotation)
    if isinstance(option.default, tuple):
        return annotation, Field(default_factory=list, description=option.help)
    return annotation, Field(option.default, description=option.help)


SurgeryConfig = create_model("SurgeryConfig", __base__=_SurgerySection, __module__=__name__,
                             **{o.name: _surgery_field(o) for o in SURGERY_OPTIONS.values()})


class DistillConfig(_Section):
    enabled: bool = False
    alpha: float = Field(0.5, ge=0, le=1, description="Weight of the distillation term; cross-entropy gets 1 - alpha.")
    temperature: Temperature = 4.0
    teacher_checkpoint: Optional[Text] = Field(None, description="Weights of the unconverted source model.")
    label_free: bool = Field(False, description="The distillation loss alone, labels ignored (implied by unlabelled "
                             "data, images:PATH); validation scores agreement with the teacher.")
    features: bool = Field(False, description="Also match each converted site's output to the original's "
                           "(site-level feature distillation).")
    feature_weight: FeatureWeight = 1.0
    method: DistillMethod = Field("plain", description="Label-free only: plain, or function_matching (teacher and "
                                  "student see the same augmented, mixed view of every batch; recovery/distill.py).")
    augment: Optional[bool] = Field(None, description="Label-free only: the shared augmentation suited to the input "
                                    "size, flips as data.augment.hflip (null: the method's).")
    mixup: Optional[MixupAlpha] = Field(None, description="Label-free only: Beta(alpha, alpha) mixing of the batch's "
                                        "images, labelled by the teacher; 0: none (null: the method's).")


class Recipe(_Section):
    name: Optional[Text] = None
    description: Optional[str] = None
    model: Optional[Text] = Field(None, description="Model spec (timm:NAME, tv:NAME, NAME, py:package.module:callable, "
                                  "file:path/net.py:callable) or a convert --out directory.")
    model_args: Dict[str, Union[StrictBool, StrictInt, StrictFloat, str, None]] = Field(
        default_factory=dict, description="Keyword arguments of a py:/file: model's callable (--model-arg KEY=VALUE).")
    trust_code: bool = Field(False, description="Rebuild a convert --out directory whose spec runs your own code "
                             "(py:/file:) (--trust-code).")
    checkpoint: Optional[Text] = Field(None, description="Weights for a model spec, loaded before surgery.")
    pretrained: bool = Field(False, description="Build a model spec with its published weights (timm tag, "
                             "torchvision DEFAULT), from the libraries' caches.")
    weights: Optional[Text] = Field(None, description="A torchvision weights enum entry such as IMAGENET1K_V2 "
                                   "(implies pretrained).")
    surgery: Optional[SurgeryConfig] = None
    data: DataConfig = DataConfig()
    epochs: Steps = 10
    max_steps_per_epoch: Optional[Steps] = Field(None, description="Cut every epoch short (smoke tests).")
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    ortho_alpha: float = Field(0.1, ge=0, description="Weight of the BSConv-S orthonormal regulariser (paper alpha).")
    distill: DistillConfig = DistillConfig()
    recalibrate_bn: bool = Field(False, description="Re-estimate every BatchNorm's running statistics on 8 training "
                                 "batches before a fresh run (after on-the-fly surgery).")
    stale_bn_momentum: Optional[Momentum] = Field(0.1, description="Momentum for BatchNorms that would keep "
                                               "stale statistics in training (momentum 0, or None continuing a "
                                               "pretrained count); null leaves them as they are.")
    amp: Literal["none", "bf16", "fp16"] = Field("none", description="Autocast precision (CUDA only).")
    channels_last: bool = Field(False, description="channels_last memory format (CUDA only).")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _one_source_of_weights(self):
        if self.checkpoint is not None and (self.pretrained or self.weights is not None):
            raise ValueError("checkpoint and pretrained/weights both give the model's weights; set one of them")
        return self

    @model_validator(mode="after")
    def _milestones_within_epochs(self):
        late = [m for m in self.schedule.milestones if m >= self.epochs]
        if self.schedule.name == "multistep" and late:
            raise ValueError(f"schedule.milestones {late} are not before the last epoch (epochs: {self.epochs})")
        return self

    def dump(self) -> Dict[str, Any]:
        """Plain JSON-able dict (what checkpoints and ``recipe.yaml`` store)."""
        return self.model_dump(mode="json")


# -- errors -------------------------------------------------------------------------------------

def _submodel(annotation) -> Optional[Type[BaseModel]]:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _section_at(loc: Iterable) -> Optional[Type[BaseModel]]:
    model: Optional[Type[BaseModel]] = Recipe
    for part in loc:
        field = model.model_fields.get(part) if model else None
        if field is None:
            return None
        model = _submodel(field.annotation)
    return model


def _describe(error: Dict[str, Any]) -> str:
    loc = [part for part in error["loc"] if isinstance(part, str)]
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        section = _section_at(loc[:-1])
        allowed = sorted(section.model_fields) if section else []
        close = close_matches(loc[-1], allowed, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return f"{key}: unknown key.{hint} Allowed keys here: {', '.join(allowed)}."
    if error["type"] == "model_type":
        return f"{key}: expected a section (a mapping of keys), got {error['input']!r}."
    message = error["msg"].removeprefix("Value error, ").rstrip(".")
    shown = "" if error["type"] in ("value_error", "missing") else f" (got {error['input']!r})"
    return f"{key}: {message}{shown}."


def _nonfinite(data: Any, key: str = "") -> Iterable[Tuple[str, float]]:
    """``(dotted key, value)`` of every inf or NaN anywhere in the recipe (YAML ``.inf``, ``.nan``)."""
    if isinstance(data, float) and not math.isfinite(data):
        yield key or "(top level)", data
    elif isinstance(data, dict):
        for k, v in data.items():
            yield from _nonfinite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            yield from _nonfinite(v, f"{key}.{i}")


def recipe_from_dict(data: Any, where: str = "recipe") -> Recipe:
    """Validate a recipe mapping; every problem is listed with its key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SurgeryError(f"{where} must be a mapping of keys (such as 'epochs: 10'), not {type(data).__name__}.")
    bad = list(_nonfinite(data))
    if bad:
        problems = "\n".join(f"  - {key}: a finite number is needed (got {value})." for key, value in bad)
        raise SurgeryError(f"Invalid {where}:\n{problems}")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        problems = "\n".join(f"  - {_describe(err)}" for err in exc.errors())
        raise SurgeryError(f"Invalid {where}:\n{problems}") from None


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.dump(), sort_keys=False, default_flow_style=None)


# -- files and overrides ------------------------------------------------------------------------

def bundled_recipes() -> List[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []


def is_bare_name(text: str) -> bool:
    """``digits-demo`` names a bundled recipe; ``./x``, ``dir/x.yaml`` or ``x.yaml`` name files."""
    return not any(sep in text for sep in ("/", os.sep, os.altsep or "/")) and Path(text).suffix not in (".yaml", ".yml")


def resolve_recipe_path(text: str) -> Path:
    """A recipe file (a path that exists), or, for a bare name without a folder or ``.yaml``
    (``digits-demo``), the bundled recipe of that name. A path that does not exist is an error,
    never silently a bundled recipe of the same name."""
    path = Path(text).expanduser()
    if path.is_file():
        return path
    names = bundled_recipes()
    listing = f" Bundled recipes: {', '.join(names)} (in {RECIPES_DIR})." if names else ""
    if is_bare_name(text):
        bundled = child_path(RECIPES_DIR, f"{text}.yaml", "Recipe")
        if bundled.is_file():
            return bundled
        raise SurgeryError(f"Recipe '{text}' not found: no such file and no bundled recipe of that name.{listing}")
    if path.exists():
        raise SurgeryError(f"Recipe '{text}' is not a file.")
    stem = path.stem if path.suffix in (".yaml", ".yml") else path.name
    hint = (f" A bundled recipe is called '{stem}': pass just that name to use it." if stem in names else listing)
    raise SurgeryError(f"Recipe file '{text}' does not exist.{hint}")


def _cut(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit - 20]}...({len(text)} characters)"


def parse_override(text: str) -> Tuple[List[str], Any]:
    """``optimizer.lr=0.05`` -> ``(['optimizer', 'lr'], 0.05)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise SurgeryError(
            f"Bad --set '{text}': expected KEY=VALUE with a dotted key, such as optimizer.lr=0.05 or epochs=3."
        )
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        what = "is refused" if isinstance(exc, LimitError) else "is not valid YAML"
        raise SurgeryError(f"Bad --set '{_cut(text)}': the value {what} ({getattr(exc, 'problem', exc)}).") from None
    return [p.strip() for p in parts], value


def set_key(data: Dict[str, Any], parts: List[str], value: Any, text: str) -> None:
    """Set ``data[parts[0]][parts[1]]... = value``, creating sections on the way."""
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SurgeryError(f"Bad --set '{text}': '{'.'.join(parts[:i + 1])}' is a value, not a section.")
        node = child
    node[parts[-1]] = value


def read_recipe_file(path: Path) -> Dict[str, Any]:
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        what = "is refused" if isinstance(exc, LimitError) else "is not valid YAML"
        raise SurgeryError(f"Recipe '{path}' {what}{where}: {problem}.") from None
    except UnicodeDecodeError as exc:
        raise SurgeryError(f"Recipe '{path}' is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                           f"{exc.start}); save it as UTF-8.") from None
    except OSError as exc:
        raise SurgeryError(f"Could not read recipe '{path}': {exc.strerror or exc}.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SurgeryError(f"Recipe '{path}' must be a mapping of keys (such as 'epochs: 10'), not {type(data).__name__}.")
    return data


def load_recipe(source: Union[str, Path, None], overrides: Iterable[str] = (),
                values: Optional[Dict[str, Any]] = None) -> Recipe:
    """Read a recipe file (or start empty when ``source`` is None), apply the ``--set KEY=VALUE``
    strings, then ``values`` (dotted key -> value, from command-line options), and validate."""
    path = resolve_recipe_path(str(source)) if source is not None else None
    data = read_recipe_file(path) if path else {}
    for text in overrides:
        parts, value = parse_override(text)
        set_key(data, parts, value, text)
    for key, value in (values or {}).items():
        set_key(data, key.split("."), value, f"{key}={value}")
    if path is not None:
        data.setdefault("name", path.stem)
    return recipe_from_dict(data, f"recipe '{path}'" if path else "recipe")
