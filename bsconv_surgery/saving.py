"""Save a converted model (``model.safetensors`` + ``surgery.json``) and rebuild it.

The weights go through safetensors only. ``surgery.json`` holds the source spec, the options
and the report, so ``load_converted`` rebuilds the architecture by running the same surgery on
a freshly built source model, then loads the weights strictly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Dict, Iterator, Union

from torch import nn

from .errors import SurgeryError, describe_exception
from .regularization import regularization_sites

__all__ = [
    "save_converted", "load_converted", "read_surgery_json", "library_versions", "atomic_dir", "atomic_file",
    "check_new_file",
]

FORMAT = "bsconv-surgery/1"
WEIGHTS = "model.safetensors"
METADATA = "surgery.json"


def library_versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("bsconv-surgery", "torch", "torchvision", "timm", "fvcore", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def check_new_file(path: Union[str, Path], what: str, force: bool = False) -> Path:
    """Refuse a path that exists and is not a file, or an existing file unless ``force``."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise SurgeryError(f"{what} path '{path}' exists and is not a file.")
    if path.exists() and not force:
        raise SurgeryError(f"{what} file '{path}' already exists; pass --force to replace it.")
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
        if self.path.exists() and not self.force:
            raise SurgeryError(f"Output directory '{self.path}' already exists; pass --force to replace it.")
        if self.path.exists() and not self.path.is_dir():
            raise SurgeryError(f"Output path '{self.path}' exists and is not a directory.")
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


def save_converted(result, out_dir: Union[str, Path], force: bool = False) -> Path:
    """Save a ``ConversionResult``; the source must be a model spec so it can be rebuilt."""
    from safetensors.torch import save_model

    if result.source is None:
        raise SurgeryError(
            "This model was converted from an nn.Module without a source spec, so it cannot be "
            "rebuilt from a file. Pass source='timm:NAME' (or torchvision:NAME) to convert()."
        )
    meta = {
        "format": FORMAT,
        "source": result.source,
        "options": result.options.to_json(),
        "input_size": list(result.input_size),
        "regularization_sites": [name for name, _ in regularization_sites(result.model)],
        "versions": library_versions(),
        "report": result.report,
    }
    with atomic_dir(out_dir, force=force) as tmp:
        save_model(result.model, str(tmp / WEIGHTS))
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out_dir)


def read_surgery_json(directory: Union[str, Path]) -> Dict[str, Any]:
    """Read and check ``surgery.json`` of a converted-model directory."""
    directory = Path(directory)
    path = directory / METADATA
    if not directory.is_dir():
        raise SurgeryError(f"'{directory}' is not a directory written by 'bsconv-surgery convert --out'.")
    if not path.is_file():
        raise SurgeryError(f"'{directory}' has no {METADATA}; it was not written by 'bsconv-surgery convert --out'.")
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SurgeryError(f"Could not read '{path}': {exc}.") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "source" not in meta or "options" not in meta:
        raise SurgeryError(f"'{path}' is not a bsconv-surgery file of format {FORMAT}.")
    return meta


def load_converted(directory: Union[str, Path]) -> nn.Module:
    """Rebuild a model saved by ``convert --out DIR`` and load its weights (bit-identical)."""
    from safetensors.torch import load_model

    from .models import create_model, parse_model_spec
    from .surgery import SurgeryOptions, convert

    directory = Path(directory)
    meta = read_surgery_json(directory)
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise SurgeryError(f"'{directory}' has no {WEIGHTS}.")
    spec = parse_model_spec(meta["source"]["spec"])
    model = create_model(spec, num_classes=meta["source"].get("num_classes"))
    options = SurgeryOptions.from_json(meta["options"]).to_json()
    options["init"] = "default"  # the weights are loaded below; no need to initialise them
    variant = options.pop("variant")
    convert(model, variant, count=False, **options)
    try:
        load_model(model, str(weights), strict=True)
    except Exception as exc:
        raise SurgeryError(
            f"The weights in '{weights}' do not fit the rebuilt model ({describe_exception(exc)}). "
            "The file may be corrupt, or the "
            "installed timm/torchvision builds this model differently from the one that wrote it "
            f"(it recorded {meta.get('versions', {})})."
        ) from exc
    sites = [name for name, _ in regularization_sites(model)]
    if sites != meta.get("regularization_sites", sites):
        raise SurgeryError(f"The rebuilt model's BSConv-S sites differ from those recorded in '{directory / METADATA}'.")
    return model
