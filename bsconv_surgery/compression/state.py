"""The run folder of ``compress`` and what ``--resume`` reads back.

``OUT/`` holds, when the run is done, what ``convert --out`` writes (``model.safetensors`` +
``surgery.json``: ``load_converted``, ``benchmark DIR`` and ``export DIR`` read it), ``compress.json``
(the result) and, with ``--export onnx``, ``model.onnx``. While it runs, ``OUT/state/`` holds
``state.json`` (the run's settings and each finished stage's record) and the checkpoints:
``baseline.pt`` (the converted model after recalibration), ``stage-K.pt`` (the student after
progressive stage K) and ``distill-K.pt`` (the distillation of stage K, every ``checkpoint_every``
steps). Every file is written atomically (``io/files.py``), so a kill at any moment leaves the
previous version or the new one; ``--resume`` continues from the last one written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from ..core.errors import SurgeryError, arg, describe_exception, os_error
from ..io.documents import load_json
from ..io.files import atomic_file, check_new_dir, check_writable, recover_swap, save_torch, writing

__all__ = ["RunFolder", "check_run_folder", "STATE_VERSION"]

STATE_VERSION = 1
STATE_DIR = "state"
STATE_FILE = "state.json"
RESULT_FILE = "compress.json"


def check_run_folder(path: Union[str, Path], force: bool = False, resume: bool = False) -> None:
    """Refuse an existing ``path`` unless ``force`` (replace it) or ``resume`` (continue it), before any work."""
    path = Path(path)
    recover_swap(path)
    if path.exists() and not (force or resume):
        raise SurgeryError(f"Output directory '{path}' already exists; pass {arg('resume=True')} to continue the run "
                           f"in it or {arg('force=True')} to replace it.")


class RunFolder:
    """``OUT`` and its ``state/`` (see the module docstring)."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.state_dir = self.path / STATE_DIR

    @classmethod
    def open(cls, path: Union[str, Path], settings: Dict[str, Any], *, force: bool = False,
             resume: bool = False) -> "RunFolder":
        """A new run folder, or with ``resume`` the existing one whose settings are ``settings``;
        an existing folder without ``force`` or ``resume`` is refused, with ``force`` it is
        replaced. ``settings`` (JSON) is what a resumed run must match."""
        folder = cls(path)
        check_run_folder(folder.path, force, resume)
        if resume and folder.path.exists():
            folder._check_resumable(settings)
            check_writable(folder.state_dir / STATE_FILE)
            return folder
        check_new_dir(folder.path, force=True)
        if folder.path.exists():
            with writing(folder.path, "replacing"):
                shutil.rmtree(folder.path) if folder.path.is_dir() else folder.path.unlink()
        with writing(folder.path):
            folder.state_dir.mkdir(parents=True)
        folder.write_state({"version": STATE_VERSION, "settings": settings, "done": {}})
        return folder

    def _check_resumable(self, settings: Dict[str, Any]) -> None:
        state = self.read_state()
        if state is None:
            raise SurgeryError(f"Cannot resume: '{self.path}' is not a compress run folder (no {STATE_DIR}/{STATE_FILE}); "
                               f"pass {arg('force=True')} to replace it.")
        saved = state.get("settings")
        if state.get("version") != STATE_VERSION or saved != settings:
            changed = sorted(k for k in set(settings) | set(saved or {}) if (saved or {}).get(k) != settings.get(k))
            raise SurgeryError(f"Cannot resume '{self.path}': it was started with other settings "
                               f"({', '.join(changed) or 'another version'} differ: "
                               + "; ".join(f"{k} was {json.dumps((saved or {}).get(k))}, now {json.dumps(settings.get(k))}"
                                           for k in changed[:4])
                               + f"). Resume with the same settings, or pass {arg('force=True')} to start again.")

    # -- state.json --------------------------------------------------------------------------------

    def read_state(self) -> Optional[Dict[str, Any]]:
        file = self.state_dir / STATE_FILE
        if not file.is_file():
            return None
        try:
            state = load_json(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SurgeryError(f"Could not read '{file}' ({describe_exception(exc)}); pass {arg('force=True')} to "
                               "start the run again.") from None
        if not isinstance(state, dict) or not isinstance(state.get("done"), dict):
            raise SurgeryError(f"'{file}' is not a compress state file; pass {arg('force=True')} to start again.")
        return state

    def write_state(self, state: Dict[str, Any]) -> None:
        self._write_text(self.state_dir / STATE_FILE, json.dumps(state, indent=1, default=str) + "\n")

    def done(self) -> Dict[str, Any]:
        """Each finished stage's record, by stage name."""
        return dict((self.read_state() or {}).get("done", {}))

    def mark_done(self, stage: str, record: Any) -> None:
        state = self.read_state()
        state["done"][stage] = record
        self.write_state(state)

    def forget(self, *stages: str) -> None:
        state = self.read_state()
        for stage in stages:
            state["done"].pop(stage, None)
        self.write_state(state)

    # -- checkpoints ---------------------------------------------------------------------------------

    def checkpoint_path(self, name: str) -> Path:
        return self.state_dir / f"{name}.pt"

    def save_checkpoint(self, name: str, obj: Any) -> None:
        target = self.checkpoint_path(name)
        with atomic_file(target) as tmp:
            save_torch(obj, tmp, target)

    def load_checkpoint(self, name: str) -> Optional[Any]:
        file = self.checkpoint_path(name)
        if not file.is_file():
            return None
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except OSError as exc:
            raise os_error(exc, file, "reading") from exc
        except Exception as exc:
            raise SurgeryError(f"Could not read the checkpoint '{file}' ({describe_exception(exc)}); pass "
                               f"{arg('force=True')} to start the run again.") from None

    def write_result(self, result: Dict[str, Any]) -> Path:
        file = self.path / RESULT_FILE
        self._write_text(file, json.dumps(result, indent=2, default=str) + "\n")
        return file

    def read_result(self) -> Optional[Dict[str, Any]]:
        file = self.path / RESULT_FILE
        return load_json(file.read_text(encoding="utf-8")) if file.is_file() else None

    def remove_state(self) -> None:
        """The checkpoints are dropped once the run is saved (``state.json`` stays: ``--resume``
        of a finished run reports it)."""
        for file in self.state_dir.glob("*.pt"):
            with writing(file, "removing"):
                file.unlink()

    @staticmethod
    def _write_text(path: Path, text: str) -> None:
        with atomic_file(path) as tmp:
            with writing(path):
                tmp.write_text(text, encoding="utf-8")
