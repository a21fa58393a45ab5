"""Files that appear whole or not at all.

``atomic_file`` and ``atomic_dir`` write to a temporary sibling that replaces the target only on
success (``--force`` therefore builds the new output beside the old one and swaps it in only when
it is complete); ``check_new_file`` / ``check_new_dir`` refuse an existing target unless
``force`` and probe that its folder is writable, before the work, so a long run does not fail at
the end. Files and folders get the mode the umask gives (or, when they replace one, the mode of
the file replaced), not the ``0600`` / ``0700`` of ``tempfile``. Failures of the environment
(disk full, read-only folder) become a ``SurgeryError`` naming the file.

A finished folder replaces an existing one through ``swap_in``: one atomic exchange on Linux, two
renames elsewhere; ``recover_swap`` (run before an output folder is checked or read) resolves what
a kill in between left beside it, so the folder always ends as the old or the new one, whole.
``child_path`` keeps a name the user gave (a recipe name) inside the folder it is meant for.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Union

import torch

from ..core.errors import SurgeryError, arg, os_error

__all__ = ["atomic_file", "atomic_dir", "check_new_file", "check_new_dir", "check_writable", "child_path",
           "current_umask", "exchange", "follow_umask", "recover_swap", "save_torch", "swap_in", "write_bytes", "writing"]


def current_umask() -> int:
    """This process's umask (from ``/proc/self/status`` where there is one: no set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Union[str, Path], like: Optional[Path] = None) -> None:
    """Give ``path`` (made by ``mkstemp``: 0600, or ``mkdtemp``: 0700) the mode a plain
    ``open``/``mkdir`` would have given it, or the mode of ``like`` (the file it replaces)."""
    path = Path(path)
    if like is not None:
        try:
            os.chmod(path, stat.S_IMODE(os.stat(like).st_mode))
            return
        except OSError:
            pass
    base = 0o777 if path.is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


@contextmanager
def writing(path: Union[str, Path], action: str = "writing") -> Iterator[None]:
    """Turn an ``OSError`` raised inside the block into a ``SurgeryError`` naming ``path``."""
    try:
        yield
    except OSError as exc:
        raise os_error(exc, path, action) from exc


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: Union[str, Path]) -> None:
    """Probe that a file can be created where ``path`` would go (its nearest existing folder): a
    read-only or full folder is refused before the work, not after it."""
    folder = _existing_ancestor(Path(path).parent)
    if not folder.is_dir():
        raise SurgeryError(f"Cannot write '{path}': '{folder}' is not a folder.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".bsconv-write-probe-", dir=folder)
    except OSError as exc:
        raise os_error(exc, folder, f"creating '{path}' in") from exc
    os.close(fd)
    os.unlink(probe)


def _contains_cwd(path: Path) -> bool:
    try:
        cwd, target = Path.cwd().resolve(), path.resolve()
    except OSError:
        return False
    return cwd == target or target in cwd.parents


def child_path(parent: Union[str, Path], name: str, what: str = "Name") -> Path:
    """``parent / name`` for a ``name`` the user gave (a recipe name becomes a run folder): refused
    unless it is one entry directly inside ``parent``: not empty, no ``/`` (or the system's
    separator), not ``.`` or ``..``, no NUL byte."""
    text = str(name)
    seps = {"/", os.sep, os.altsep or "/"}
    path = Path(parent) / text
    if (not text.strip() or text in (".", "..") or "\0" in text or any(sep in text for sep in seps)
            or os.path.dirname(os.path.abspath(path)) != os.path.abspath(parent)):
        raise SurgeryError(f"{what} {text[:80]!r} cannot name a folder inside '{parent}': it must be one name, "
                           "without '/' or '..' (such as my-run).")
    return path


def check_new_file(path: Union[str, Path], what: str, force: bool = False) -> Path:
    """Refuse a path that exists and is not a file, an existing file unless ``force``, and a
    folder that cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise SurgeryError(f"{what} path '{path}' exists and is not a file.")
    if path.exists() and not force:
        raise SurgeryError(f"{what} file '{path}' already exists; pass {arg('force=True')} to replace it.")
    check_writable(path)
    return path


def check_new_dir(path: Union[str, Path], force: bool = False) -> Path:
    """Refuse an existing directory unless ``force``, a path that exists and is no directory, the
    current directory or one above it (it cannot be swapped for a new one), and a parent folder
    that cannot be written."""
    path = Path(path)
    recover_swap(path)
    if path.exists() and _contains_cwd(path):
        raise SurgeryError(f"Output directory '{path}' is the current directory or contains it; it cannot be "
                           "replaced. Choose a new folder, e.g. runs/NAME.")
    if path.exists() and not force:
        raise SurgeryError(f"Output directory '{path}' already exists; pass {arg('force=True')} to replace it.")
    if path.exists() and not path.is_dir():
        raise SurgeryError(f"Output path '{path}' exists and is not a directory.")
    check_writable(path)
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: Union[str, Path], name: Optional[Union[str, Path]] = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces ``path`` once the block succeeds
    (flushed to disk, with the umask's mode or the mode of the file replaced); on failure the
    temporary file is removed and ``path`` is untouched. An ``OSError`` (disk full, read-only
    folder) becomes a ``SurgeryError`` naming ``name`` (default ``path``: the file the user asked
    for, when ``path`` lies in a folder that is itself being built)."""
    path = Path(path)
    name = name or path
    tmp = None
    try:
        with writing(name):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, made = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=path.suffix, dir=path.parent)
            os.close(fd)
            tmp = Path(made)
        with writing(name):
            yield tmp
            follow_umask(tmp, like=path if path.is_file() else None)
            _fsync(tmp)
            os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` (a temporary file of ``atomic_file``), errors naming ``path``."""
    with writing(path), open(path, "wb") as fh:
        fh.write(data)


class _RecordingWriter:
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write: torch reports it as
    ``unexpected pos ...``."""

    def __init__(self, fh) -> None:
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_torch(obj: Any, path: Union[str, Path], name: Optional[Union[str, Path]] = None) -> None:
    """``torch.save(obj, path)``; a failed write (disk full, ...) is a ``SurgeryError`` naming
    ``name`` (the file ``path`` becomes) and the real cause."""
    name = name or path
    recorder = None
    try:
        with open(path, "wb") as fh:
            recorder = _RecordingWriter(fh)
            torch.save(obj, recorder)
    except OSError as exc:
        raise os_error(exc, name) from exc
    except RuntimeError as exc:
        if recorder is not None and recorder.error is not None:
            raise os_error(recorder.error, name) from exc
        raise


class atomic_dir:
    """Write a directory atomically: files go to a temporary sibling that replaces ``path`` on
    success (the old one is moved aside, the new one renamed in, the old one deleted). An existing
    ``path`` is refused unless ``force``; on failure nothing changes and the temporary folder is
    removed."""

    def __init__(self, path: Union[str, Path], force: bool = False):
        self.path = Path(path)
        self.force = force

    def __enter__(self) -> Path:
        check_new_dir(self.path, self.force)
        with writing(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            with writing(self.path):
                for child in self.tmp.rglob("*"):  # writers such as safetensors create their files 0600
                    if not child.is_symlink():
                        follow_umask(child)
                follow_umask(self.tmp, like=self.path if self.path.is_dir() else None)
                swap_in(self.tmp, self.path)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


def _sibling(path: Path, kind: str) -> Path:
    """A fresh, unused name beside ``path``: ``.NAME.KIND-XXXXXXXX`` (reserved by ``mkdtemp``)."""
    name = Path(tempfile.mkdtemp(prefix=f".{path.name}.{kind}-", dir=path.parent))
    os.rmdir(name)
    return name


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@functools.lru_cache(maxsize=None)
def _renameat2() -> Optional[Callable[..., int]]:
    """Linux's ``renameat2`` from the C library, or ``None`` (another system, an old C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def exchange(a: Path, b: Path) -> bool:
    """Swap the two existing paths ``a`` and ``b`` in one atomic step (``renameat2`` with
    ``RENAME_EXCHANGE``); ``False`` where the system or the file system cannot (nothing changed)."""
    function = _renameat2()
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def swap_in(new: Path, path: Path) -> None:
    """Put the finished folder ``new`` at ``path``, so that a kill at any moment leaves the old or
    the new one complete (renaming a folder over a non-empty one fails on POSIX, so it takes steps):

    1. ``new`` is renamed ``.NAME.new-*``: complete, and the only name ``recover_swap`` takes as the
       new version;
    2. on Linux, ``renameat2(RENAME_EXCHANGE)`` swaps it with ``path`` in one step; elsewhere
       ``path`` is renamed ``.NAME.old-*``, then ``.NAME.new-*`` renamed to ``path`` (a kill between
       the two leaves no ``path``: ``recover_swap`` puts the new one in place on the next run);
    3. the old one (now ``.NAME.new-*`` or ``.NAME.old-*``) is deleted.

    A ``path`` that does not exist is created by one rename."""
    if not os.path.lexists(path):
        os.rename(new, path)
        return
    done = _sibling(path, "new")
    os.rename(new, done)
    if exchange(done, path):
        _remove(done)  # the old one, by now
        return
    old = _sibling(path, "old")
    os.rename(path, old)
    try:
        os.rename(done, path)
    except OSError:
        os.rename(old, path)
        _remove(done)
        raise
    _remove(old)


def _leftovers(path: Path, kind: str) -> List[Path]:
    """``.NAME.KIND-*`` beside ``path``, newest last."""
    prefix = f".{path.name}.{kind}-"
    try:
        found = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []
    return sorted(found, key=lambda p: p.lstat().st_mtime)


def recover_swap(path: Union[str, Path]) -> Optional[str]:
    """Resolve what a kill in ``swap_in`` left beside ``path``: when ``path`` is missing, the newest
    ``.NAME.new-*`` (complete) takes its place, else the newest ``.NAME.old-*`` is put back; the
    rest is deleted. Returns what was done, or ``None`` when there was nothing to do."""
    path = Path(path)
    news, olds = _leftovers(path, "new"), _leftovers(path, "old")
    if not news and not olds:
        return None
    with writing(path, "recovering"):
        done = f"Removed {len(news) + len(olds)} leftover folder(s) of an interrupted replacement of '{path}'."
        if not os.path.lexists(path):
            kept = news.pop() if news else olds.pop()
            os.rename(kept, path)
            done = (f"Recovered '{path}' after an interrupted replacement: "
                    + ("the new version is in place." if ".new-" in kept.name else "the old version is back."))
        for leftover in news + olds:
            _remove(leftover)
    return done
