"""Save a converted model (``model.safetensors`` + ``surgery.json``) and rebuild it.

The weights go through safetensors only. ``surgery.json`` holds the source spec, the options
and the report, so ``surgery.load_converted`` rebuilds the architecture by running the same
surgery on a freshly built source model, then loads the weights strictly (``load_weights``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from safetensors.torch import load_model, save_model
from torch import nn

from ..errors import SurgeryError, describe_exception
from ..options import SurgeryOptions
from ..records import ConversionReport, ModelSource
from ..regularization import regularization_sites
from .files import atomic_dir

__all__ = ["FORMAT", "WEIGHTS", "METADATA", "SavedConversion", "save_converted", "read_surgery_json", "load_weights",
           "library_versions"]

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


@dataclass
class SavedConversion:
    """What ``surgery.json`` of a converted-model directory says."""

    directory: Path
    source: ModelSource
    options: SurgeryOptions
    input_size: Tuple[int, ...]
    report: ConversionReport
    regularization_sites: Optional[List[str]]
    versions: Dict[str, str]

    @property
    def weights(self) -> Path:
        return self.directory / WEIGHTS


def save_converted(result, out_dir: Union[str, Path], force: bool = False) -> Path:
    """Save a ``ConversionResult`` (model, report, options, source, input size); the source must
    be a model spec so the model can be rebuilt."""
    if result.source is None or result.source.spec is None:
        raise SurgeryError(
            "This model was converted from an nn.Module without a source spec, so it cannot be "
            "rebuilt from a file. Pass source='timm:NAME' (or torchvision:NAME) to convert()."
        )
    report = result.report.to_json()
    report.pop("saved_to", None)  # where a copy is saved is no part of it
    meta = {
        "format": FORMAT,
        "source": result.source.to_json(),
        "options": result.options.to_json(),
        "input_size": list(result.input_size),
        "regularization_sites": [name for name, _ in regularization_sites(result.model)],
        "versions": library_versions(),
        "report": report,
    }
    with atomic_dir(out_dir, force=force) as tmp:
        save_model(result.model, str(tmp / WEIGHTS))
        (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(out_dir)


def read_surgery_json(directory: Union[str, Path]) -> SavedConversion:
    """Read and check ``surgery.json`` of a converted-model directory (and that its weights are
    there)."""
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
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not all(k in meta for k in ("source", "options", "report")):
        raise SurgeryError(f"'{path}' is not a bsconv-surgery file of format {FORMAT}.")
    if not (directory / WEIGHTS).is_file():
        raise SurgeryError(f"'{directory}' has no {WEIGHTS}.")
    source = ModelSource.from_json(meta["source"])
    if source.checkpoint is None and meta["report"].get("checkpoint"):  # written before sources had one
        source = dataclasses.replace(source, checkpoint=meta["report"]["checkpoint"])
    try:
        report = ConversionReport.from_json(meta["report"], source)
    except (KeyError, TypeError, ValueError) as exc:
        raise SurgeryError(f"'{path}' has a report this version cannot read ({describe_exception(exc)}).") from exc
    return SavedConversion(directory, source, report.options, tuple(meta.get("input_size") or report.input_size), report,
                           meta.get("regularization_sites"), meta.get("versions", {}))


def load_weights(model: nn.Module, saved: SavedConversion) -> None:
    """Load the saved weights into the rebuilt ``model`` strictly and check its BSConv-S sites
    against those ``surgery.json`` recorded."""
    try:
        load_model(model, str(saved.weights), strict=True)
    except Exception as exc:
        raise SurgeryError(
            f"The weights in '{saved.weights}' do not fit the rebuilt model ({describe_exception(exc)}). "
            "The file may be corrupt, or the "
            "installed timm/torchvision builds this model differently from the one that wrote it "
            f"(it recorded {saved.versions})."
        ) from exc
    sites = [name for name, _ in regularization_sites(model)]
    if saved.regularization_sites is not None and sites != saved.regularization_sites:
        raise SurgeryError(f"The rebuilt model's BSConv-S sites differ from those recorded in '{saved.directory / METADATA}'.")
