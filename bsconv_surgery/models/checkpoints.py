"""Checkpoints of source models: read a state dict safely (safetensors, or ``torch.load`` with
``weights_only=True``), load it strictly with errors that name what does not match, and the
file's SHA-256 (recorded with a conversion as the weights' provenance)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Mapping, Union

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import SurgeryError, describe_exception

__all__ = ["read_state_dict", "load_checkpoint", "file_sha256"]


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


def file_sha256(path: Union[str, Path]) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
