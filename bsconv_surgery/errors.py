"""The one exception type for problems the user can fix (bad input, bad files, bad options), and
the one place that turns failures of the environment (disk full, read-only folders, no memory)
into messages that name the file or resource."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from typing import Optional, Union

__all__ = ["SurgeryError", "describe_exception", "os_error", "environment_message", "user_message"]


def describe_exception(exc: BaseException, limit: int = 300) -> str:
    """``"TypeName: first line of the message"`` (the line cut at ``limit`` characters), for
    messages that quote an underlying failure without its traceback."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit] if text else ''}"


class SurgeryError(Exception):
    """An expected failure with a message written for the user.

    The CLI prints the message as one paragraph and exits non-zero, without a traceback.
    ``argument``: the Python argument the message names (``target_macs``), which the command line
    replaces by its option (``--target-macs``).
    """

    def __init__(self, *args: object, argument: Optional[str] = None) -> None:
        super().__init__(*args)
        self.argument = argument


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EACCES, errno.EPERM)


def _os_reason(exc: OSError, path: Optional[str], action: str) -> str:
    where = f" '{path}'" if path else ""
    code = exc.errno
    if code in _NO_SPACE:
        what = "No space left on device" if code == errno.ENOSPC else "Disk quota exceeded"
        return f"{what} while {action}{where}; free some space or write somewhere else."
    if code == errno.EFBIG:
        return f"File size limit reached while {action}{where} (File too large); raise the limit or free space."
    if code == errno.EROFS:
        return f"Read-only file system while {action}{where}; choose a folder you can write to."
    if code in _DENIED:
        return f"Permission denied while {action}{where}; choose a folder you can write to."
    reason = exc.strerror or describe_exception(exc)
    return f"{reason} while {action}{where}."


def os_error(exc: OSError, path: Union[str, Path, None] = None, action: str = "writing") -> SurgeryError:
    """A ``SurgeryError`` for an ``OSError`` of the environment, naming ``path`` (or the file the
    error names) and what was being done: ``No space left on device while writing 'x'``."""
    where = str(path) if path is not None else exc.filename
    return SurgeryError(_os_reason(exc, str(where) if where is not None else None, action))


_CPU_OOM = re.compile(r"(can't allocate memory|out of memory|not enough memory|DefaultCPUAllocator)", re.I)


def environment_message(exc: BaseException) -> Optional[str]:
    """The user-facing message for a failure the environment caused (an ``OSError`` such as a full
    disk or a denied folder, no memory), or ``None`` when ``exc`` looks like a bug."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        first = describe_exception(exc, 200).split(": ", 1)[-1]
        return f"Out of memory ({first or 'MemoryError'}); try a smaller input size, batch size or model."
    if isinstance(exc, RuntimeError) and _CPU_OOM.search(str(exc).splitlines()[0] if str(exc) else ""):
        return f"Out of memory ({str(exc).splitlines()[0][:200]}); try a smaller input size, batch size or model."
    if isinstance(exc, OSError) and exc.errno is not None:
        return _os_reason(exc, exc.filename, "accessing" if exc.errno not in _NO_SPACE + (errno.EFBIG,) else "writing")
    code = _OS_ERROR_IN_TEXT.search(str(exc))  # Rust libraries (safetensors): "... (os error 28)"
    if code and int(code.group(1)) in _NO_SPACE + _DENIED + (errno.EFBIG, errno.EROFS):
        number = int(code.group(1))
        return _os_reason(OSError(number, os.strerror(number)), None, "writing")
    return None


_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")


_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")


def user_message(exc: SurgeryError) -> str:
    """A ``SurgeryError``'s message; one raised in a DataLoader worker comes back to the main
    process wrapped with the worker's traceback, and only its own message is kept."""
    text = str(exc)
    if _WORKER.match(text):
        marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        for line in reversed(text.splitlines()):
            for prefix in (marker, f"{type(exc).__qualname__}: "):
                if line.startswith(prefix):
                    return line[len(prefix):]
    return text
