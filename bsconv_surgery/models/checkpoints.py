"""Checkpoints of source models: read a state dict safely (safetensors, or ``torch.load`` with
``weights_only=True``), load it strictly with errors that name what does not match (missing and
unexpected keys, shapes, integer or bool tensors where the model has floats), refuse non-finite
weights (naming the tensors), and the file's SHA-256 (recorded with a conversion as the weights'
provenance)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Union

import torch
from safetensors.torch import load_file
from torch import nn

from ..core.errors import SurgeryError, arg, describe_exception
from ..core.records import ModelSource

__all__ = ["read_state_dict", "load_checkpoint", "file_sha256", "check_sha256", "state_dict_problems",
           "nonfinite_tensors", "check_finite", "check_model_finite"]


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
    check_finite(state, f"Checkpoint '{path}'")
    return dict(state)


def nonfinite_tensors(tensors: Mapping[str, torch.Tensor]) -> List[str]:
    """``name (3 NaN, 1 inf of 64)`` for every floating-point tensor holding NaN or inf."""
    bad = []
    for name, t in tensors.items():
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0 or t.device.type == "meta":
            continue
        finite = torch.isfinite(t)
        if bool(finite.all()):
            continue
        nan = int(torch.isnan(t).sum())
        bad.append(f"{name} ({nan} NaN, {int((~finite).sum()) - nan} inf of {t.numel()})")
    return bad


def check_finite(tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Refuse NaN or inf weights, naming ``what`` (the file or module) and the tensors."""
    bad = nonfinite_tensors(tensors)
    if bad:
        raise SurgeryError(f"{what} holds non-finite values (NaN or inf) in {len(bad)} tensor(s): {_few(bad)}. "
                           "A diverged training run? Use weights from before it diverged.")


def check_model_finite(model: nn.Module, source: Optional[ModelSource] = None) -> None:
    """Refuse a model whose weights hold NaN or inf (before ``--init svd`` starts from them),
    naming the model and where its weights came from (``source``: a checkpoint, cached
    published weights)."""
    name = source.spec if source is not None and source.spec else type(model).__name__
    origin = None
    if source is not None and source.checkpoint is not None:
        origin = f"'{source.checkpoint}'"
    elif source is not None and source.pretrained is not None:
        origin = source.pretrained.path or source.pretrained.label
    check_finite(model.state_dict(), f"The model {name}" + (f" (weights from {origin})" if origin else ""))


def _few(items: List[str], n: int = 5) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" (and {len(items) - n} more)" if len(items) > n else "")


def _storage_key(t: torch.Tensor):
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def state_dict_problems(model: nn.Module, state: Mapping[str, torch.Tensor]) -> List[str]:
    """What keeps ``state`` from loading strictly into ``model``: missing and unexpected keys,
    shape mismatches, and integer/bool tensors where the model has floating-point ones (or the
    reverse), each naming the keys. A key the file leaves out because it shares its tensor with
    one it holds (tied weights, as safetensors saves them) is not missing."""
    expected = model.state_dict()
    present = {_storage_key(v) for k, v in expected.items() if k in state and v.numel() and v.device.type != "meta"}
    missing = [k for k, v in expected.items() if k not in state
               and not (v.numel() and v.device.type != "meta" and _storage_key(v) in present)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    kind = lambda t: "floating" if t.is_floating_point() or t.is_complex() else "bool" if t.dtype == torch.bool else "integer"  # noqa: E731
    dtypes = [
        f"{k} {str(state[k].dtype).removeprefix('torch.')} vs model {str(v.dtype).removeprefix('torch.')}"
        for k, v in expected.items()
        if k in state and kind(state[k]) != kind(v)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_few(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_few(mismatched, 3)}")
    if dtypes:
        problems.append(f"{len(dtypes)} dtype mismatch(es) (would be cast silently): {_few(dtypes, 3)}")
    return problems


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load ``path`` into ``model`` strictly, naming missing/unexpected keys, shape and dtype
    mismatches."""
    state = read_state_dict(path)
    problems = state_dict_problems(model, state)
    if problems:
        hint = ("" if all("dtype" in p for p in problems) else f" Check the model name and {arg('num_classes')}.")
        raise SurgeryError(f"Checkpoint '{path}' does not match the model: " + "; ".join(problems) + "." + hint)
    model.load_state_dict(state, strict=True)


def file_sha256(path: Union[str, Path]) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path: Union[str, Path], recorded: str, what: str, remedy: str) -> None:
    """Refuse ``path`` unless its SHA-256 is ``recorded`` (``what``: whose record it is; ``remedy``:
    what the user can do): weights recorded with a conversion or a run are the ones used again."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"Checkpoint '{path}' ({what}) does not exist or is not a file; {remedy}")
    try:
        digest = file_sha256(path)
    except OSError as exc:
        raise SurgeryError(f"Could not read checkpoint '{path}' ({what}): {exc.strerror or exc}.") from None
    if digest != recorded:
        raise SurgeryError(f"Checkpoint '{path}' is not the file {what}: its SHA-256 is {digest}, the record says "
                           f"{recorded}. It was changed or replaced; {remedy}")
