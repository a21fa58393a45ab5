"""Save a converted model (``model.safetensors`` + ``surgery.json``) and rebuild it.

The weights go through safetensors only. ``surgery.json`` holds the source spec, the options
and the report, so ``surgery.load_converted`` rebuilds the architecture by running the same
surgery on a freshly built source model, then loads the weights strictly (``load_weights``).
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Dict, Union

from safetensors.torch import load_model, save_model
from torch import nn

from ..errors import SurgeryError, describe_exception
from ..regularization import regularization_sites
from .files import atomic_dir

__all__ = ["FORMAT", "WEIGHTS", "METADATA", "save_converted", "read_surgery_json", "load_weights", "library_versions"]

FORMAT = "bsconv-surgery/1"
WEIGHTS = "model.safetensors"
METADATA = "surgery.json"


def library_versions() -> Dict[str, str]:
    out = {}
    for pkg in ("bsconv-surgery", "torch", "torchvision", "timm", "fvcore", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def save_converted(result, out_dir: Union[str, Path], force: bool = False) -> Path:
    """Save a ``ConversionResult``; the source must be a model spec so it can be rebuilt."""
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


def load_weights(model: nn.Module, directory: Union[str, Path], meta: Dict[str, Any]) -> None:
    """Load ``model.safetensors`` of ``directory`` into the rebuilt ``model`` strictly and check its
    BSConv-S sites against those ``meta`` (its ``surgery.json``) recorded."""
    directory = Path(directory)
    weights = directory / WEIGHTS
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
