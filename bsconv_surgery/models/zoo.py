"""Model specs (``timm:NAME``, ``timm:NAME.TAG``, ``torchvision:NAME``/``tv:NAME``, bare ``NAME``), model
creation with random init, a checkpoint's weights or published weights (``pretrained.py``) and
their provenance (``build_source_model``, ``model_from_source``), default input sizes and the
zoos' names.

Every model of ``torchvision.models.list_models()`` resolves, in every family: classification,
``detection``, ``segmentation``, ``video``, ``optical_flow`` and the float models of
``quantization`` (``ModelSpec.family``; how each family is fed: ``inputs.py``)."""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import timm
import torchvision
from torch import nn

from timm.models import get_arch_pretrained_cfgs, split_model_name_tag

from ..core.bounds import shown
from ..core.errors import SurgeryError, arg, close_matches
from ..core.records import ModelSource
from .checkpoints import file_sha256, load_checkpoint
from .heads import replace_head
from .code import CODE_SOURCES, build_from_code, check_trusted, code_file, deterministic_weights, split_code_spec
from .inputs import VIDEO_FRAMES, ExampleInputs, InputFamily, Inputs, as_example_inputs, input_family, parse_input_size
from .pretrained import HF_HUB_PREFIX, build_pretrained, hf_hub_config, published_weights

__all__ = [
    "ModelSpec",
    "parse_model_spec",
    "create_model",
    "build_source_model",
    "model_from_source",
    "default_input_size",
    "parse_input_size",
    "load_model",
    "model_source",
    "example_inputs_for",
    "SOURCE_ATTRIBUTE",
    "check_num_classes",
    "timm_model_names",
    "torchvision_model_names",
    "torchvision_family",
    "TORCHVISION_FAMILIES",
    "DEFAULT_INPUT_SIZE",
]

_SOURCE_ALIASES = {"timm": "timm", "torchvision": "torchvision", "tv": "torchvision"}
DEFAULT_INPUT_SIZE = (3, 224, 224)


#: torchvision's model families: the module of ``torchvision.models`` that lists them.
TORCHVISION_FAMILIES = ("classification", "detection", "segmentation", "video", "optical_flow", "quantization")


@functools.lru_cache(maxsize=1)
def _torchvision_families() -> Dict[str, str]:
    """Model name -> family, from ``torchvision.models.list_models(module=...)``."""
    out = {}
    for family in TORCHVISION_FAMILIES:
        module = torchvision.models if family == "classification" else getattr(torchvision.models, family)
        for name in torchvision.models.list_models(module=module):
            out.setdefault(name, family)
    return out


def torchvision_family(name: str) -> Optional[str]:
    """The family of a torchvision model (``None`` for an unknown name)."""
    return _torchvision_families().get(name)


@dataclass(frozen=True)
class ModelSpec:
    """A model named by its zoo: ``source`` is ``"timm"`` or ``"torchvision"``, or your own code:
    ``"py"`` (``name`` is ``package.module:callable``) or ``"file"`` (``path/net.py:callable``,
    ``code.py``); ``family`` says how it is fed (``inputs.INPUT_FAMILIES``): torchvision's family
    of the model, ``classification`` for timm, one tensor (``tensor``) for your own."""

    source: str
    name: str

    def __str__(self) -> str:
        return self.name if self.name.startswith(HF_HUB_PREFIX) else f"{self.source}:{self.name}"

    @property
    def family(self) -> str:
        if self.source == "torchvision":
            return torchvision_family(self.name) or "classification"
        return "tensor" if self.runs_code else "classification"

    @property
    def runs_code(self) -> bool:
        """Built by your own code (``py:`` / ``file:``)."""
        return self.source in CODE_SOURCES

    @property
    def inputs(self) -> InputFamily:
        return input_family(self.family)


def timm_model_names() -> List[str]:
    """Every model name timm knows (the CIFAR models of ``models/cifar.py`` included)."""
    return timm.list_models()


def torchvision_model_names(family: Optional[str] = None) -> List[str]:
    """Every torchvision model (``torchvision.models.list_models()``), or those of one family."""
    return [n for n, f in _torchvision_families().items() if family is None or f == family]


def _unknown(name: str, candidates: List[str], where: str) -> SurgeryError:
    close = close_matches(name, candidates)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return SurgeryError(
        f"Unknown model '{name}' ({where}).{hint} "
        "Use 'timm:NAME', 'torchvision:NAME' (or 'tv:NAME'), or a bare NAME looked up in timm first."
    )


def parse_model_spec(text: str) -> ModelSpec:
    """Resolve ``text`` to a ``ModelSpec``; a bare name is looked up in timm, then torchvision;
    ``py:package.module:callable`` and ``file:path/net.py:callable`` name your own code (checked
    here for their form; imported when built)."""
    text = text.strip()
    if ":" in text:
        prefix, name = text.split(":", 1)
        if prefix.lower() == "hf-hub" or (prefix.lower() == "timm" and name.startswith(HF_HUB_PREFIX)):
            hub_id = name[len(HF_HUB_PREFIX):] if name.startswith(HF_HUB_PREFIX) else name
            if not re.match(r"^[\w.-]+/[\w.-]+$", hub_id):
                raise SurgeryError(f"Bad model spec '{text}': expected hf-hub:ORG/NAME, a timm model on the Hugging "
                                   "Face hub (read from its cache).")
            return ModelSpec("timm", HF_HUB_PREFIX + hub_id)
        if prefix.lower() in CODE_SOURCES:
            where, attr = split_code_spec(prefix.lower(), name)
            path = code_file(prefix.lower(), where)  # a file: spec names its file by absolute path
            return ModelSpec(prefix.lower(), f"{path if path is not None else where}:{attr}")
        source = _SOURCE_ALIASES.get(prefix.lower())
        if source is None:
            raise SurgeryError(
                f"Unknown model source '{prefix}' in '{text}'. Valid sources: timm, torchvision, tv, py "
                "(py:package.module:callable), file (file:path/net.py:callable)."
            )
        if source == "timm":
            if not timm.is_model(name):
                raise _unknown(name, timm_model_names(), "not in timm")
            _check_tag(name)
        elif name not in torchvision_model_names():
            raise _unknown(name, torchvision_model_names(), "not in torchvision")
        return ModelSpec(source, name)
    if timm.is_model(text):
        _check_tag(text)
        return ModelSpec("timm", text)
    if text in torchvision_model_names():
        return ModelSpec("torchvision", text)
    if (Path(text).expanduser() / "surgery.json").is_file():
        raise SurgeryError(
            f"'{text}' is the folder of a converted model (it holds surgery.json), not a model spec. `benchmark`, "
            "`export` and `train --model` read such a folder; to convert or compress again, start from the "
            "original model's spec (its surgery.json names it under source.spec).")
    raise _unknown(text, timm_model_names() + torchvision_model_names(), "neither in timm nor torchvision")


def _check_tag(name: str) -> None:
    """A timm ``arch.tag`` must name one of the arch's pretrained configs (timm accepts any tag)."""
    arch, tag = split_model_name_tag(name)
    if tag:
        known = [key.split(".", 1)[1] for key in get_arch_pretrained_cfgs(arch) if "." in key]
        if tag not in known:
            listed = f"Valid tags: {', '.join(known)}." if known else f"timm:{arch} has no tags."
            raise SurgeryError(f"Unknown pretrained tag '{tag}' for timm:{arch}. {listed}")


def create_model(
    spec: Union[str, ModelSpec],
    num_classes: Optional[int] = None,
    checkpoint: Optional[Path] = None,
    model_args: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """Build ``spec`` (a ``ModelSpec`` or its text) with random init (no download), optionally loading
    ``checkpoint``. ``num_classes`` goes to each family's constructor argument (optical flow models
    have none; your own callable gets it as ``num_classes=``); ``model_args`` are your own
    callable's keyword arguments."""
    spec = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
    check_num_classes(num_classes)
    if spec.runs_code:
        where, attr = split_code_spec(spec.source, spec.name)
        args = dict(model_args or {}, **({"num_classes": num_classes} if num_classes is not None else {}))
        model = build_from_code(spec.source, where, attr, args)
        if checkpoint is not None:
            load_checkpoint(model, checkpoint)
        return model
    if model_args:
        raise SurgeryError(f"{arg('model_args')} are the arguments of your own model code (py:/file: specs); {spec} "
                           "takes none.")
    if spec.name.startswith(HF_HUB_PREFIX):  # the architecture and its head from the cached config
        config = hf_hub_config(spec.name[len(HF_HUB_PREFIX):])
        return create_model(ModelSpec("timm", config["architecture"]),
                            num_classes if num_classes is not None else config.get("num_classes"), checkpoint)
    kwargs = _family_kwargs(spec, num_classes)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's init_weights FutureWarning and friends
            if spec.source == "timm":
                model = timm.create_model(spec.name, pretrained=False, **kwargs)
            else:
                model = torchvision.models.get_model(spec.name, weights=None, **kwargs)
    except SurgeryError:
        raise
    except Exception as exc:  # a model constructor rejecting its arguments
        raise SurgeryError(f"Could not build {spec} ({type(exc).__name__}: {exc}).") from exc
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def _code_facts(spec: ModelSpec, num_classes: Optional[int], model_args: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """What a ``ModelSource`` records of a model your own code builds: its arguments, the file's
    SHA-256 (``file:``) and whether the callable builds fixed (trained) weights itself."""
    where, _ = split_code_spec(spec.source, spec.name)
    path = code_file(spec.source, where)
    built = lambda: create_model(spec, num_classes=num_classes, model_args=model_args)  # noqa: E731
    return {"model_args": dict(model_args or {}), "code_sha256": file_sha256(path) if path is not None else None,
            "callable_weights": deterministic_weights(built)}


def build_source_model(
    spec: ModelSpec,
    num_classes: Optional[int] = None,
    checkpoint: Optional[Union[str, Path]] = None,
    pretrained: bool = False,
    weights: Optional[str] = None,
    model_args: Optional[Mapping[str, Any]] = None,
) -> Tuple[nn.Module, ModelSource]:
    """Build ``spec`` and say where its weights came from (the one builder of every command).

    Random init; ``checkpoint`` (recorded with its SHA-256); or ``pretrained`` published weights
    (``pretrained.py``: timm's tag in the spec, torchvision's ``weights`` entry, default
    ``DEFAULT``; ``weights`` alone implies ``pretrained``), found in the libraries' caches. With
    pretrained weights, ``num_classes`` other than theirs keeps the pretrained backbone and gives
    the model a fresh head (timm drops the head's weights; torchvision's head is replaced after
    loading), recorded as ``head_replaced``."""
    check_num_classes(num_classes)
    if spec.runs_code and (pretrained or weights is not None):
        raise SurgeryError(f"{spec} is built by your own code: its weights are the ones it builds, or "
                           f"{arg('checkpoint')}'s; {arg('pretrained')} and {arg('weights')} name a zoo's weights.")
    if weights is None and not pretrained:
        model = create_model(spec, num_classes=num_classes, checkpoint=checkpoint, model_args=model_args)
        classes = num_classes if num_classes is not None or spec.runs_code else getattr(model, "num_classes", None)
        code = _code_facts(spec, num_classes, model_args) if spec.runs_code else {}
        return model, ModelSource(str(spec), classes, str(checkpoint) if checkpoint is not None else None,
                                  file_sha256(checkpoint) if checkpoint is not None else None, **code)
    if checkpoint is not None:
        raise SurgeryError(f"{arg('pretrained')} (or {arg('weights')}) and {arg('checkpoint')} both give the source model's weights; "
                           "pass one of them.")
    return _pretrained_model(spec, weights, num_classes, load=True)


def model_from_source(source: ModelSource, load_weights: bool = False, trust_code: bool = False) -> nn.Module:
    """Rebuild the model ``source`` describes: the same architecture (and head), with random
    init unless ``load_weights``: then the checkpoint, or the published weights found in the cache
    (the recorded revision and SHA-256: other weights are refused). A model your own code builds
    (``py:`` / ``file:``) is rebuilt only with ``trust_code``, from an unchanged file."""
    if source.spec is None:
        raise SurgeryError("This model was given to convert() as a module, without a spec to rebuild it from: "
                           f"build it yourself and pass it ({arg('model')}=...).")
    check_trusted(source.spec, trust_code, source.code_sha256)
    spec = parse_model_spec(source.spec)
    if source.pretrained is None:
        return create_model(spec, num_classes=source.num_classes, checkpoint=source.checkpoint if load_weights else None,
                            model_args=source.model_args)
    weights = source.pretrained.name if spec.source == "torchvision" else None
    return _pretrained_model(spec, weights, source.num_classes, load=load_weights, recorded=source.pretrained)[0]


def _pretrained_model(spec: ModelSpec, weights: Optional[str], num_classes: Optional[int], load: bool,
                      recorded=None) -> Tuple[nn.Module, ModelSource]:
    pub = published_weights(spec, weights)
    kwargs = _family_kwargs(spec, num_classes)
    kwargs.pop("num_classes", None)
    head = (pub.num_classes, num_classes) if num_classes is not None and pub.num_classes is not None \
        and num_classes != pub.num_classes else None
    if spec.source == "timm" and num_classes is not None:
        kwargs["num_classes"] = num_classes  # timm drops the pretrained head's weights when it differs
    elif head is not None and spec.family not in ("classification", "video"):
        raise SurgeryError(f"{spec} with its pretrained weights predicts {pub.num_classes} classes; a {spec.family} "
                           f"model's head cannot be replaced here, so {arg('num_classes')} {num_classes} does not apply. "
                           f"Convert it with the weights' {pub.num_classes} classes.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, provenance = build_pretrained(pub, kwargs, load=load, recorded=recorded)
    except SurgeryError:
        raise
    except Exception as exc:  # a model constructor rejecting its arguments
        raise SurgeryError(f"Could not build {spec} with {pub.name} ({type(exc).__name__}: {exc}).") from exc
    if head is not None and spec.source == "torchvision":
        replace_head(model, num_classes, pub.num_classes)
    classes = num_classes if num_classes is not None else pub.num_classes
    spec_text = f"timm:{pub.model}" if spec.source == "timm" and not spec.name.startswith(HF_HUB_PREFIX) else str(spec)
    return model, ModelSource(spec_text, classes, weights=pub.name, pretrained=provenance if load else recorded,
                              head_replaced=head)


def _family_kwargs(spec: ModelSpec, num_classes: Optional[int]) -> Dict[str, Any]:
    """The constructor arguments of ``spec``'s family: no backbone weights (no download), the float
    form of a quantization model, and the class count under its name."""
    kwargs: Dict[str, Any] = {}
    family = spec.family
    if spec.source == "torchvision":
        if family in ("detection", "segmentation"):
            kwargs["weights_backbone"] = None
        elif family == "quantization":
            kwargs["quantize"] = False
        elif family == "optical_flow" and num_classes is not None:
            raise SurgeryError(f"{spec} is an optical flow model: it predicts flow, not classes, so {arg('num_classes')} "
                               "does not apply.")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return kwargs


def _torchvision_weights(name: str):
    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except Exception:  # no weights enum for this model
        return None


def _pair(value) -> Optional[Tuple[int, int]]:
    if not value:
        return None
    if isinstance(value, (list, tuple)):
        return (int(value[0]), int(value[-1] if len(value) > 1 else value[0]))
    return (int(value), int(value))


def _torchvision_default(spec: ModelSpec, model: nn.Module) -> Optional[Tuple[int, ...]]:
    """The default size of a torchvision model of a family other than classification."""
    family = spec.family
    weights = _torchvision_weights(spec.name)
    keywords = getattr(getattr(weights, "transforms", None), "keywords", None) or {}
    meta = getattr(weights, "meta", None) or {}
    if family == "detection":  # the size the model's own transform resizes to
        transform = getattr(model, "transform", None)
        fixed = getattr(transform, "fixed_size", None)
        if fixed:
            return (3, int(fixed[0]), int(fixed[1]))
        min_size = getattr(transform, "min_size", None)
        side = min_size[-1] if isinstance(min_size, (list, tuple)) else min_size
        return (3, int(side), int(side)) if side else None
    if family == "segmentation":
        side = _pair(keywords.get("resize_size"))
        return (3, side[0], side[0]) if side else None
    if family == "video":
        crop = _pair(keywords.get("crop_size")) or (112, 112)
        frames = max(VIDEO_FRAMES, int(meta.get("min_temporal_size") or 0))
        return (3, frames, *crop)
    if family == "optical_flow":
        low = _pair(meta.get("min_size")) or (1, 1)
        default = input_family(family).default
        return (3, max(default[1], low[0]), max(default[2], low[1]))
    return None


def _own_input_size(model: nn.Module) -> Optional[Tuple[int, ...]]:
    """The input size a model says it takes: timm's ``pretrained_cfg["input_size"]``, or an
    ``input_size`` attribute (a sequence of positive integers)."""
    cfg = getattr(model, "pretrained_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, Mapping) else getattr(model, "input_size", None)
    if isinstance(size, (tuple, list)) and size and all(isinstance(v, int) and v > 0 for v in size):
        return tuple(size)
    return None


def default_input_size(spec: Optional[ModelSpec], model: nn.Module) -> Tuple[int, ...]:
    """timm's pretrained config, the size a torchvision ViT was built for, torchvision's weights
    crop size, else ``3,224,224``; for the other torchvision families: detection the size its
    transform resizes to, segmentation the weights' resize size, video the weights' crop size and
    16 frames (``C,T,H,W``), optical flow ``3,224,224`` (at least the weights' minimum)."""
    if spec is not None and spec.source == "torchvision" and spec.family not in ("classification", "quantization"):
        return _torchvision_default(spec, model) or spec.inputs.default
    if spec is not None and spec.runs_code:
        own = _own_input_size(model)
        if own is None:
            raise SurgeryError(f"{spec} has no default input size (no pretrained_cfg['input_size'] or input_size "
                               f"attribute on the model): pass one with {arg('example_inputs')}, such as 3,224,224.")
        return own
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        return tuple(int(v) for v in cfg["input_size"])
    image_size = getattr(model, "image_size", None)  # torchvision ViTs are built for one size
    if isinstance(image_size, int) and image_size > 0:
        return (3, image_size, image_size)
    if spec is not None and spec.source == "torchvision":
        try:
            weights = torchvision.models.get_model_weights(spec.name).DEFAULT
            crop = weights.transforms.keywords.get("crop_size")
            if crop:
                crop = crop[0] if isinstance(crop, (list, tuple)) else crop
                return (3, int(crop), int(crop))
        except Exception:  # no weights enum for this model: fall back
            pass
    return DEFAULT_INPUT_SIZE


def _is_size(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(v, (int, float, str)) and not isinstance(v, bool)
                                                    for v in value)


#: Where ``load_model`` records a model's ``ModelSource`` on the module it returns.
SOURCE_ATTRIBUTE = "bsconv_source"


def model_source(model: nn.Module) -> Optional[ModelSource]:
    """Where ``model`` came from, as ``load_model`` recorded it (``None`` for a module built elsewhere).

    >>> import torch, bsconv_surgery as bs
    >>> bs.model_source(bs.load_model("timm:test_resnet", num_classes=3)).spec
    'timm:test_resnet'
    >>> bs.model_source(torch.nn.Conv2d(3, 8, 3)) is None
    True
    """
    source = getattr(model, SOURCE_ATTRIBUTE, None)
    return source if isinstance(source, ModelSource) else None


def load_model(spec: Union[str, ModelSpec, nn.Module], *, pretrained: bool = False, weights: Optional[str] = None,
               checkpoint: Optional[Union[str, Path]] = None, num_classes: Optional[int] = None,
               model_args: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """Build the model ``spec`` names (``"timm:resnet18"``, ``"tv:mobilenet_v2"``, a bare timm name)
    with random init, the weights of ``checkpoint`` (a ``.safetensors`` file or a state dict read
    with ``torch.load(weights_only=True)``), or its published weights (``pretrained``; torchvision's
    enum entry ``weights``), read from the libraries' caches. ``py:package.module:callable`` and
    ``file:path/net.py:callable`` build your own model (``model_args``: the callable's keyword
    arguments). Or give your own ``nn.Module`` as ``spec`` to load ``checkpoint`` into it. ``num_classes`` other than the model's gives a fresh
    head. The module records where it came from (``model_source``: spec, checkpoint and its SHA-256,
    published weights), which ``convert`` reports and saves, so a saved conversion can be rebuilt.

    >>> import bsconv_surgery as bs
    >>> model = bs.load_model("timm:resnet18", num_classes=10)
    >>> bs.model_source(model).spec, model.num_classes
    ('timm:resnet18', 10)
    """
    if isinstance(spec, nn.Module):
        if pretrained or weights is not None:
            raise SurgeryError("pretrained/weights apply to a model spec such as 'timm:resnet50' (built with its "
                               "published weights); a module you pass keeps the weights it has.")
        if num_classes is not None:
            raise SurgeryError("num_classes applies to a model spec such as 'timm:resnet50'; a module you pass keeps "
                               "its own head.")
        if checkpoint is not None:
            load_checkpoint(spec, checkpoint)
        source = ModelSource(None, None, str(checkpoint) if checkpoint is not None else None,
                             file_sha256(checkpoint) if checkpoint is not None else None)
        model = spec
    elif isinstance(spec, (str, ModelSpec)):
        parsed = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
        model, source = build_source_model(parsed, num_classes=num_classes, checkpoint=checkpoint,
                                           pretrained=pretrained, weights=weights, model_args=model_args)
    else:
        raise SurgeryError(f"load_model() takes a model spec such as 'timm:resnet18' or an nn.Module, not "
                           f"{type(spec).__name__}.")
    setattr(model, SOURCE_ATTRIBUTE, source)
    return model


def example_inputs_for(model: nn.Module, inputs: Inputs = None) -> ExampleInputs:
    """The example inputs of ``model``, made once at the edge. ``inputs`` is an input size
    (``"3,224,224"`` or a sequence; default: the model's own, see ``default_input_size``) fed as
    the model's family says (from the spec ``load_model`` recorded; a module built elsewhere is fed
    one tensor), or the model's own arguments (a tensor, a tuple, an ``ExampleInputs``).

    >>> import bsconv_surgery as bs
    >>> bs.example_inputs_for(bs.load_model("tv:raft_small"), "3,64,64").family.name
    'optical_flow'
    """
    if inputs is not None and not isinstance(inputs, (str, int, float)) and not _is_size(inputs):
        return as_example_inputs(inputs)
    source = model_source(model)
    spec = parse_model_spec(source.spec) if source is not None and source.spec is not None else None
    size = parse_input_size(inputs) if inputs is not None else default_input_size(spec, model)
    return ExampleInputs.of(spec.family if spec is not None else None, size, str(spec) if spec is not None else "")


#: The most classes a classifier head may be given.
MAX_CLASSES = 10**7


def check_num_classes(num_classes) -> None:
    """``None`` (the model's own) or a positive integer."""
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or not 1 <= num_classes <= MAX_CLASSES):
        raise SurgeryError(f"Bad num_classes {shown(num_classes)}: expected a positive integer of at most {MAX_CLASSES:,} "
                           "(or None for the model's own).", argument="num_classes")
