"""``last.pt`` / ``best.pt``: everything a run needs to continue, readable with ``weights_only=True``.

A checkpoint holds only tensors and plain containers: the model, optimizer, scheduler and
grad-scaler state dicts, the position (epoch, step in epoch), the metric history, the resolved
recipe and the RNG states of every rank (torch, CUDA, Python ``random``, NumPy) as tensors.
Every checkpoint is written beside its name and renamed into place (a killed save leaves the old
file and a ``.NAME.tmp-*`` file, which ``clean_temp_files`` removes); a checkpoint that lacks a
part is refused with the file and the keys named.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import numpy as np
import torch

from ..core.errors import SurgeryError, describe_exception, os_error
from ..io.files import atomic_file, save_torch

__all__ = ["FORMAT", "REQUIRED", "rng_state", "set_rng_state", "write_checkpoint", "read_checkpoint", "copy_checkpoint",
           "checkpoint_epoch", "clean_temp_files"]

FORMAT = "bsconv-surgery-train/1"

#: What every training checkpoint holds, and of which type.
REQUIRED = {"model": dict, "optimizer": dict, "scheduler": dict, "scaler": (dict, type(None)), "epoch": int,
            "step": int, "partial": (dict, type(None)), "history": list, "best": dict, "train_seconds": (int, float),
            "recipe": dict, "world_size": int, "steps_per_epoch": int, "rng": list}


def rng_state() -> Dict[str, Any]:
    """This process's RNG states, as tensors and numbers only."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached"]))


def write_checkpoint(path: Union[str, Path], state: Dict[str, Any], name: Optional[Union[str, Path]] = None) -> None:
    """Atomic: written next to ``path`` and renamed, so an interrupted save leaves the old file;
    a failed write (disk full) names ``name`` (default ``path``)."""
    name = name or path
    with atomic_file(path, name) as tmp:
        save_torch({"format": FORMAT, **state}, tmp, name=name)


def copy_checkpoint(src: Union[str, Path], dst: Union[str, Path], name: Optional[Union[str, Path]] = None) -> None:
    """Copy ``src`` to ``dst`` by write-then-rename (``best.pt`` from ``last.pt``)."""
    with atomic_file(dst, name) as tmp:
        shutil.copyfile(src, tmp)


def read_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """A training checkpoint, checked to hold every part a run needs (``REQUIRED``)."""
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"No checkpoint at '{path}'.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise os_error(exc, path, "reading") from None
    except Exception as exc:
        raise SurgeryError(f"Could not read checkpoint '{path}' ({describe_exception(exc)}).") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SurgeryError(f"'{path}' is not a bsconv-surgery training checkpoint (format {FORMAT}).")
    missing = [key for key in REQUIRED if key not in state]
    wrong = [f"{key} ({type(state[key]).__name__}, expected {_names(kind)})" for key, kind in REQUIRED.items()
             if key in state and not isinstance(state[key], kind)]
    if missing or wrong:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"mistyped {', '.join(wrong)}"] if wrong else [])
        raise SurgeryError(f"Checkpoint '{path}' is incomplete: {'; '.join(parts)}. It cannot be resumed; start the "
                           "run over with --force, or use a complete last.pt.")
    return state


def _names(kind) -> str:
    return " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__


def checkpoint_epoch(path: Union[str, Path]) -> Optional[int]:
    """The epoch a checkpoint file holds, or ``None`` when it is missing or unreadable."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    epoch = state.get("epoch") if isinstance(state, dict) else None
    return epoch if isinstance(epoch, int) else None


def clean_temp_files(folder: Union[str, Path], names=("last.pt", "best.pt")) -> List[str]:
    """Remove the ``.NAME.tmp-*`` files killed saves of ``names`` left in ``folder``."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.tmp-*"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp.name)
    return sorted(removed)
