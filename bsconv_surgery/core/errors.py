"""The one exception type for problems the user can fix (bad input, bad files, bad options), and
the one place that turns failures of the environment (disk full, read-only folders, no memory)
into messages that name the file or resource."""

from __future__ import annotations

import difflib
import errno
import os
import re
from pathlib import Path
from typing import Iterable, List, Mapping, Optional, Union

__all__ = ["SurgeryError", "arg", "describe_exception", "os_error", "environment_message", "user_message",
           "close_matches"]

#: How a message marks the Python argument it names (``arg``): rendered as the argument's name for
#: Python callers, as the command line's flag by the CLI.
_ARG = re.compile("\x1f([A-Za-z_][\\w.=]*)\x1f")


def arg(name: str) -> str:
    """``name`` (a Python argument such as ``"example_inputs"`` or ``"target.macs"``) marked in a
    ``SurgeryError`` message: Python callers read ``example_inputs``, the CLI ``--input-size``."""
    return f"\x1f{name}\x1f"


def render(message: str, names: Optional[Mapping[str, str]] = None) -> str:
    """``message`` with each ``arg()`` written as ``names`` spells it (the Python name when absent)."""
    return _ARG.sub(lambda m: (names or {}).get(m.group(1), m.group(1)), message)


def describe_exception(exc: BaseException, limit: int = 300) -> str:
    """``"TypeName: first line of the message"`` (the line cut at ``limit`` characters), for
    messages that quote an underlying failure without its traceback."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:limit] if text else ''}"


class SurgeryError(Exception):
    """An expected failure with a message written for the user.

    The CLI prints the message as one paragraph and exits non-zero, without a traceback. Arguments
    the message names with ``arg()`` read as Python names (``str(exc)``) or as the CLI's flags
    (``exc.message_for(CLI_FLAGS)``); ``argument`` marks every mention of that one argument the
    same way (``SurgeryError("target_macs must be ...", argument="target_macs")``).

    >>> import bsconv_surgery as bs
    >>> try:
    ...     bs.convert(bs.load_model("timm:test_resnet"), example_inputs=(3, 32))
    ... except bs.SurgeryError as exc:
    ...     print(exc)
    Bad input size '3,32' for timm:test_resnet (classification model): expected example_inputs C,H,W such as 3,224,224.
    """

    def __init__(self, message: str = "", *args: object, argument: Optional[str] = None) -> None:
        self.template = message if isinstance(message, str) else str(message)
        if argument and not _ARG.search(self.template):
            self.template = re.sub(rf"(?<![\w.-]){re.escape(argument)}(?![\w])", arg(argument), self.template)
        self.argument = argument
        super().__init__(render(self.template), *args)

    def message_for(self, names: Mapping[str, str]) -> str:
        """The message with the arguments it names spelled as ``names`` says (the CLI's flags)."""
        return render(self.template, names)


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


def user_message(exc: SurgeryError, names: Optional[Mapping[str, str]] = None) -> str:
    """A ``SurgeryError``'s message, naming arguments as ``names`` spells them; one raised in a
    DataLoader worker comes back to the main process wrapped with the worker's traceback, and only
    its own message is kept."""
    text = exc.message_for(names) if names is not None and hasattr(exc, "template") else str(exc)
    if _WORKER.match(text):
        marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        for line in reversed(text.splitlines()):
            for prefix in (marker, f"{type(exc).__qualname__}: "):
                if line.startswith(prefix):
                    return line[len(prefix):]
    return text


def close_matches(name: str, candidates: Iterable[str], n: int = 5, cutoff: float = 0.6) -> List[str]:
    """The candidates most like ``name``, best first, each once (a name can come from several
    lists, such as timm's and torchvision's): the one source of "did you mean" lists."""
    return difflib.get_close_matches(name, list(dict.fromkeys(candidates)), n=n, cutoff=cutoff)
