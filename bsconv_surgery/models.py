"""Model specs (``timm:NAME``, ``torchvision:NAME``/``tv:NAME``, bare ``NAME``), model creation
with random init, input sizes and checkpoint loading."""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .errors import SurgeryError, describe_exception

__all__ = [
    "ModelSpec",
    "parse_model_spec",
    "create_model",
    "default_input_size",
    "parse_input_size",
    "read_state_dict",
    "load_checkpoint",
]

_SOURCE_ALIASES = {"timm": "timm", "torchvision": "torchvision", "tv": "torchvision"}
DEFAULT_INPUT_SIZE = (3, 224, 224)


@dataclass(frozen=True)
class ModelSpec:
    """A model named by its zoo: ``source`` is ``"timm"`` or ``"torchvision"``."""

    source: str
    name: str

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


def _timm_names() -> List[str]:
    import timm

    return timm.list_models()


def _torchvision_names() -> List[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _unknown(name: str, candidates: List[str], where: str) -> SurgeryError:
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    return SurgeryError(
        f"Unknown model '{name}' ({where}).{hint} "
        "Use 'timm:NAME', 'torchvision:NAME' (or 'tv:NAME'), or a bare NAME looked up in timm first."
    )


def parse_model_spec(text: str) -> ModelSpec:
    """Resolve ``text`` to a ``ModelSpec``; a bare name is looked up in timm, then torchvision."""
    text = text.strip()
    if ":" in text:
        prefix, name = text.split(":", 1)
        source = _SOURCE_ALIASES.get(prefix.lower())
        if source is None:
            raise SurgeryError(
                f"Unknown model source '{prefix}' in '{text}'. Valid sources: timm, torchvision, tv."
            )
        if source == "timm":
            if not _is_timm_model(name):
                raise _unknown(name, _timm_names(), "not in timm")
        elif name not in _torchvision_names():
            raise _unknown(name, _torchvision_names(), "not a torchvision classification model")
        return ModelSpec(source, name)
    if _is_timm_model(text):
        return ModelSpec("timm", text)
    if text in _torchvision_names():
        return ModelSpec("torchvision", text)
    raise _unknown(text, _timm_names() + _torchvision_names(), "neither in timm nor torchvision")


def create_model(
    spec: ModelSpec,
    num_classes: Optional[int] = None,
    checkpoint: Optional[Path] = None,
) -> nn.Module:
    """Build ``spec`` with random init (no download), optionally loading ``checkpoint``."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's init_weights FutureWarning and friends
            if spec.source == "timm":
                import timm

                model = timm.create_model(spec.name, pretrained=False, **kwargs)
            else:
                import torchvision

                model = torchvision.models.get_model(spec.name, weights=None, **kwargs)
    except Exception as exc:  # a model constructor rejecting its arguments
        raise SurgeryError(f"Could not build {spec} ({type(exc).__name__}: {exc}).") from exc
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model


def default_input_size(spec: Optional[ModelSpec], model: nn.Module) -> Tuple[int, int, int]:
    """timm's pretrained config, the size a torchvision ViT was built for, torchvision's weights
    crop size, else ``3,224,224``."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("input_size"):
        return tuple(int(v) for v in cfg["input_size"])
    image_size = getattr(model, "image_size", None)  # torchvision ViTs are built for one size
    if isinstance(image_size, int) and image_size > 0:
        return (3, image_size, image_size)
    if spec is not None and spec.source == "torchvision":
        try:
            import torchvision

            weights = torchvision.models.get_model_weights(spec.name).DEFAULT
            crop = weights.transforms.keywords.get("crop_size")
            if crop:
                crop = crop[0] if isinstance(crop, (list, tuple)) else crop
                return (3, int(crop), int(crop))
        except Exception:  # no weights enum for this model: fall back
            pass
    return DEFAULT_INPUT_SIZE


def parse_input_size(text: str) -> Tuple[int, int, int]:
    """Parse ``C,H,W`` (e.g. ``3,224,224``)."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) < 1:
        raise SurgeryError(f"Bad input size '{text}': expected three positive integers C,H,W such as 3,224,224.")
    return values


def read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    """Read a safetensors file or a ``torch.save`` state dict (``weights_only=True``).

    Dicts that wrap the weights under ``state_dict``/``model``/``state_dict_ema`` are unwrapped and
    a ``module.`` prefix (DistributedDataParallel) is stripped.
    """
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"Checkpoint '{path}' does not exist or is not a file.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SurgeryError(
            f"Could not read checkpoint '{path}': {describe_exception(exc)}. "
            "Expected a .safetensors file or a state dict saved with torch.save "
            "(only plain tensors are loaded: weights_only=True)."
        ) from exc
    if isinstance(state, Mapping):
        for key in ("state_dict", "model", "state_dict_ema", "model_state"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SurgeryError(f"Checkpoint '{path}' does not hold a state dict of tensors.")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _few(items: List[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load ``path`` into ``model`` strictly, naming missing/unexpected keys and shape mismatches."""
    state = read_state_dict(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_few(mismatched, 3)}")
    if problems:
        raise SurgeryError(
            f"Checkpoint '{path}' does not match the model: " + "; ".join(problems) + ". "
            "Check the model name and --num-classes."
        )
    model.load_state_dict(state, strict=True)
