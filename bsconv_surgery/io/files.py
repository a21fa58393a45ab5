"""Files that appear whole or not at all: ``atomic_file`` and ``atomic_dir`` write to a temporary
sibling that replaces the target only on success; ``check_new_file`` / ``check_new_dir`` refuse
an existing target unless ``force`` (before the work, so a long run does not fail at the end)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

from ..errors import SurgeryError

__all__ = ["atomic_file", "atomic_dir", "check_new_file", "check_new_dir"]


def check_new_file(path: Union[str, Path], what: str, force: bool = False) -> Path:
    """Refuse a path that exists and is not a file, or an existing file unless ``force``."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise SurgeryError(f"{what} path '{path}' exists and is not a file.")
    if path.exists() and not force:
        raise SurgeryError(f"{what} file '{path}' already exists; pass --force to replace it.")
    return path


def check_new_dir(path: Union[str, Path], force: bool = False) -> Path:
    """Refuse an existing directory unless ``force``, and a path that exists and is no directory."""
    path = Path(path)
    if path.exists() and not force:
        raise SurgeryError(f"Output directory '{path}' already exists; pass --force to replace it.")
    if path.exists() and not path.is_dir():
        raise SurgeryError(f"Output path '{path}' exists and is not a directory.")
    return path


@contextmanager
def atomic_file(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces ``path`` once the block succeeds;
    on failure the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class atomic_dir:
    """Write a directory atomically: files go to a temporary sibling that replaces ``path`` on
    success. An existing ``path`` is refused unless ``force``; on failure nothing changes."""

    def __init__(self, path: Union[str, Path], force: bool = False):
        self.path = Path(path)
        self.force = force

    def __enter__(self) -> Path:
        check_new_dir(self.path, self.force)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.old-", dir=self.path.parent))
            os.rmdir(old)
            os.replace(self.path, old)
        try:
            os.replace(self.tmp, self.path)
        except OSError:
            if old is not None:
                os.replace(old, self.path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
