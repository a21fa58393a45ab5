"""``last.pt`` / ``best.pt``: everything a run needs to continue, readable with ``weights_only=True``.

A checkpoint holds only tensors and plain containers: the model, optimizer, scheduler and
grad-scaler state dicts, the position (epoch, step in epoch), the metric history, the resolved
recipe and the RNG states of every rank (torch, CUDA, Python ``random``, NumPy) as tensors.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

from ..errors import SurgeryError, describe_exception
from ..io.files import atomic_file

__all__ = ["FORMAT", "rng_state", "set_rng_state", "write_checkpoint", "read_checkpoint"]

FORMAT = "bsconv-surgery-train/1"


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


def write_checkpoint(path: Union[str, Path], state: Dict[str, Any]) -> None:
    """Atomic: written next to ``path`` and renamed, so an interrupted save leaves the old file."""
    with atomic_file(path) as tmp:
        torch.save({"format": FORMAT, **state}, tmp)


def read_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise SurgeryError(f"No checkpoint at '{path}'.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SurgeryError(f"Could not read checkpoint '{path}' ({describe_exception(exc)}).") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SurgeryError(f"'{path}' is not a bsconv-surgery training checkpoint (format {FORMAT}).")
    return state
