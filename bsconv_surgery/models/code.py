"""Models built by your own code: ``py:package.module:callable`` (imported from the environment,
as uvicorn's ``module:attr``) and ``file:path/to/net.py:callable`` (a file outside any package).

The callable is a class or function returning an ``nn.Module``; its keyword arguments are the
spec's ``model_args`` (``--model-arg KEY=VALUE``, values read as YAML scalars). Every way this can
fail is one message that names what failed: the module or file that does not import (with the
import error), the attribute that is not there (with close matches), the callable that raised
(its message), a result that is not an ``nn.Module``.

Rebuilding a saved conversion of such a model runs that code again, so it needs
``trust_code=True`` (``--trust-code``), as Hugging Face's ``trust_remote_code``; a ``file:``
spec's file must also still be the one converted (its SHA-256 is recorded).
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Tuple

import torch
from torch import nn

from ..core.errors import SurgeryError, arg, close_matches, describe_exception
from .checkpoints import file_sha256

__all__ = ["CODE_SOURCES", "split_code_spec", "resolve_callable", "build_from_code", "code_file", "check_trusted",
           "deterministic_weights"]

#: The spec prefixes that name your own code.
CODE_SOURCES = ("py", "file")
_DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def split_code_spec(source: str, rest: str) -> Tuple[str, str]:
    """``("py", "pkg.mod:Net")`` -> ``("pkg.mod", "Net")``; ``("file", "nets/a.py:make")`` ->
    ``("nets/a.py", "make")`` (the last colon separates the callable)."""
    where, sep, attr = rest.rpartition(":")
    form = "py:package.module:callable" if source == "py" else "file:path/to/net.py:callable"
    if not sep or not where.strip() or not _DOTTED.match(attr.strip()):
        raise SurgeryError(f"Bad model spec '{source}:{rest}': expected {form} (the callable after the last colon).")
    where, attr = where.strip(), attr.strip()
    if source == "py" and not _DOTTED.match(where):
        raise SurgeryError(f"Bad model spec 'py:{rest}': '{where}' is not a module name such as mypackage.nets.")
    if source == "file" and not where.endswith(".py"):
        raise SurgeryError(f"Bad model spec 'file:{rest}': '{where}' is not a Python file (.py).")
    return where, attr


def code_file(source: str, where: str) -> Optional[Path]:
    """The file a ``file:`` spec names (resolved), ``None`` for ``py:``."""
    return Path(where).expanduser().resolve() if source == "file" else None


def _import(source: str, where: str) -> Any:
    if source == "py":
        try:
            return importlib.import_module(where)
        except Exception as exc:  # ImportError, or the module's own code failing
            raise SurgeryError(f"Cannot import module '{where}' for model spec py:{where} "
                               f"({describe_exception(exc, 300)}). Is it installed, or on PYTHONPATH?") from exc
    path = code_file(source, where)
    if not path.is_file():
        raise SurgeryError(f"Model file '{where}' (spec file:{where}) does not exist or is not a file.")
    name = f"bsconv_surgery_user_{file_sha256(path)[:16]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise SurgeryError(f"Cannot import model file '{where}' ({describe_exception(exc, 300)}).") from exc
    return module


def resolve_callable(source: str, where: str, attr: str) -> Callable[..., Any]:
    """The callable ``attr`` (dotted: ``Nets.small``) of the module or file."""
    target: Any = _import(source, where)
    for i, part in enumerate(attr.split(".")):
        if not hasattr(target, part):
            names = [n for n in dir(target) if not n.startswith("_")]
            close = close_matches(part, names, n=4, cutoff=0.5)
            hint = f" Close matches: {', '.join(close)}." if close else ""
            raise SurgeryError(f"'{where}' has no attribute '{'.'.join(attr.split('.')[:i + 1])}' (model spec "
                               f"{source}:{where}:{attr}).{hint}")
        target = getattr(target, part)
    if not callable(target):
        raise SurgeryError(f"{source}:{where}:{attr} is a {type(target).__name__}, not a class or function that "
                           "returns an nn.Module.")
    return target


def build_from_code(source: str, where: str, attr: str, model_args: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """Call the spec's callable with ``model_args``; its result must be an ``nn.Module``."""
    factory = resolve_callable(source, where, attr)
    label = f"{source}:{where}:{attr}"
    try:
        model = factory(**dict(model_args or {}))
    except SurgeryError:
        raise
    except Exception as exc:
        raise SurgeryError(f"{label}({_shown_args(model_args)}) raised {describe_exception(exc, 300)}. Check its "
                           f"arguments ({arg('model_args')}).") from exc
    if not isinstance(model, nn.Module):
        raise SurgeryError(f"{label}({_shown_args(model_args)}) returned a {type(model).__name__}, not an nn.Module.")
    return model


def deterministic_weights(build: Callable[[], nn.Module]) -> bool:
    """Whether ``build()`` makes the same weights under two different seeds: the callable loads
    fixed (trained) weights itself rather than initialising them at random. The global RNG is left
    as it was."""
    states = []
    for seed in (1, 2):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            states.append(build().state_dict())
    first, second = states
    floating = [k for k, v in first.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()]
    return bool(floating) and first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in floating)


def check_trusted(spec: str, trust_code: bool, recorded_sha256: Optional[str] = None) -> None:
    """Refuse to rebuild a ``py:`` / ``file:`` model unless ``trust_code``; a ``file:`` spec's file
    must still have the SHA-256 recorded when it was converted."""
    source, _, rest = spec.partition(":")
    if source not in CODE_SOURCES:
        return
    if not trust_code:
        raise SurgeryError(
            f"Rebuilding this model runs its own code ({spec}), so it needs {arg('trust_code=True')}: pass it if you "
            "trust that code, as for Hugging Face's trust_remote_code.")
    if source == "file" and recorded_sha256:
        path = code_file(source, split_code_spec(source, rest)[0])
        actual = file_sha256(path) if path.is_file() else None
        if actual != recorded_sha256:
            what = "is gone" if actual is None else f"has changed (SHA-256 {actual[:12]}..., recorded {recorded_sha256[:12]}...)"
            raise SurgeryError(f"The model file '{path}' of {spec} {what} since the model was converted, so the saved "
                               "weights may not fit it. Restore the file, or convert again.")


def _shown_args(model_args: Optional[Mapping[str, Any]]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in (model_args or {}).items())
