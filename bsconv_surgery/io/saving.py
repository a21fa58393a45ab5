"""Save a converted model (``model.safetensors`` + ``surgery.json``) and rebuild it.

The weights go through safetensors only. ``surgery.json`` holds the source spec, the options,
the report and the SHA-256 of ``model.safetensors``, so ``surgery.load_converted`` rebuilds the
architecture by running the same surgery on a freshly built source model, then checks the hash and
loads the weights strictly (``load_weights``). ``read_surgery_json`` validates the whole file
against a schema (``SurgeryFile``) and names the field that is wrong. Files written before the
hash was recorded load without that check.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load_file, load_model, save_model
from torch import nn

from ..core.errors import SurgeryError, describe_exception, os_error
from ..models.checkpoints import file_sha256, state_dict_problems
from ..core.options import SurgeryOptions
from ..core.records import ConversionReport, ModelSource
from ..layers.regularization import regularization_sites
from .documents import load_json
from .files import atomic_dir, recover_swap, writing

__all__ = ["FORMAT", "WEIGHTS", "METADATA", "SavedConversion", "SurgeryFile", "save_converted", "read_surgery_json",
           "load_weights", "library_versions"]

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


# -- the schema of surgery.json -------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class _PretrainedJSON(_Strict):
    zoo: Literal["timm", "torchvision"]
    name: str
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    num_classes: Optional[int] = Field(None, ge=1)
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    url: Optional[str] = None
    path: Optional[str] = None


class _SourceJSON(_Strict):
    spec: Optional[str]  # None: converted from a module given in Python (rebuilt with load_converted(dir, model=...))
    num_classes: Optional[int] = Field(None, ge=1)
    checkpoint: Optional[str] = None
    checkpoint_sha256: Optional[str] = None
    weights: Optional[str] = None
    pretrained: Optional[_PretrainedJSON] = None
    head_replaced: Optional[List[int]] = Field(None, min_length=2, max_length=2)
    model_args: Optional[Dict[str, Any]] = None
    code_sha256: Optional[str] = Field(None, pattern=r"^[0-9a-f]{64}$")
    callable_weights: bool = False


class _OptionsJSON(_Strict):  # unknown option names: SurgeryOptions.create names them
    variant: str
    kernel_sizes: Optional[List[List[int]]] = None
    include: List[str] = []
    exclude: List[str] = []
    p: str = "1/4"
    with_bn: bool = False
    min_mid_channels: int = Field(4, ge=1)
    init: str = "default"
    allow_growth: bool = False  # absent in files written before it existed: read as True (SurgeryOptions.from_json)


class _TracingJSON(_Strict):
    method: str
    error: Optional[str] = None
    note: Optional[str] = None


class _SiteJSON(_Strict):
    name: str
    kind: str
    in_channels: Optional[int] = None
    out_channels: Optional[int] = None
    kernel: Optional[List[int]] = None
    stride: Optional[List[int]] = None
    params_before: Optional[int] = None
    params_after: Optional[int] = None


class _SkipJSON(_Strict):
    name: str
    kind: str
    reason: str


class _ReportJSON(_Strict):
    model: str
    options: _OptionsJSON
    input_size: List[int]
    tracing: _TracingJSON
    conv_census: Dict[str, int] = {}
    params_before: int = Field(ge=0)
    params_after: int = Field(ge=0)
    replaced: List[_SiteJSON] = []
    skipped: List[_SkipJSON] = []
    other_convs: List[Dict[str, Any]] = []
    hidden_convs: List[Dict[str, Any]] = []
    seconds: Dict[str, float] = {}
    counter: Dict[str, Any] = {}


class SurgeryFile(_Strict):
    """What ``surgery.json`` must hold (extra keys are allowed, for files of later versions)."""

    format: Literal["bsconv-surgery/1"]
    source: _SourceJSON
    options: _OptionsJSON
    input_size: Optional[List[int]] = None
    regularization_sites: Optional[List[str]] = None
    versions: Dict[str, str] = {}
    weights_sha256: Optional[str] = Field(None, pattern=r"^[0-9a-f]{64}$")
    report: _ReportJSON


def _invalid(path: Path, exc: ValidationError) -> SurgeryError:
    problems = []
    for err in exc.errors()[:5]:
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        shown = "" if err["type"] == "missing" else f" (got {err['input']!r:.80})"
        problems.append(f"{key}: {err['msg'].removeprefix('Value error, ').rstrip('.')}{shown}")
    more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return SurgeryError(f"'{path}' is not a valid {METADATA}: " + "; ".join(problems) + more + ".")


# -- saving and loading ---------------------------------------------------------------------------

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
    weights_sha256: Optional[str] = None

    @property
    def weights(self) -> Path:
        return self.directory / WEIGHTS


def save_converted(result, out_dir: Union[str, Path], force: bool = False) -> Path:
    """Save a ``ConversionResult`` (model, report, options, source, input size). A model with a
    spec (``load_model``) is rebuilt from it by ``load_converted(dir)``; one given as a module is
    rebuilt by ``load_converted(dir, model=YourModule())``."""
    report = result.report.to_json()
    report.pop("saved_to", None)  # where a copy is saved is no part of it
    meta = {
        "format": FORMAT,
        "source": (result.source or ModelSource(None)).to_json(),
        "options": result.options.to_json(),
        "input_size": list(result.input_size),
        "regularization_sites": [name for name, _ in regularization_sites(result.model)],
        "versions": library_versions(),
        "report": report,
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, force=force) as tmp:
        _save_weights(result.model, tmp / WEIGHTS, out_dir / WEIGHTS)
        meta["weights_sha256"] = file_sha256(tmp / WEIGHTS)
        with writing(out_dir / METADATA):
            (tmp / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def _save_weights(model: nn.Module, tmp: Path, name: Path) -> None:
    """``safetensors.torch.save_model``; its I/O errors (``... (os error 28)``) name the file."""
    try:
        save_model(model, str(tmp))
    except OSError as exc:
        raise os_error(exc, name) from exc
    except Exception as exc:
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code:
            number = int(code.group(1))
            raise os_error(OSError(number, os.strerror(number)), name) from exc
        raise


def read_surgery_json(directory: Union[str, Path]) -> SavedConversion:
    """Read and check ``surgery.json`` of a converted-model directory (and that its weights are
    there)."""
    directory = Path(directory)
    path = directory / METADATA
    recover_swap(directory)  # a kill while convert --force replaced it
    if not directory.is_dir():
        raise SurgeryError(f"'{directory}' is not a directory written by 'bsconv-surgery convert --out'.")
    if not path.is_file():
        raise SurgeryError(f"'{directory}' has no {METADATA}; it was not written by 'bsconv-surgery convert --out'.")
    try:
        meta = load_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SurgeryError(f"Could not read '{path}': {describe_exception(exc)}.") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SurgeryError(f"'{path}' is not a bsconv-surgery file of format {FORMAT}.")
    try:
        SurgeryFile.model_validate(meta)
    except ValidationError as exc:
        raise _invalid(path, exc) from None
    if not (directory / WEIGHTS).is_file():
        raise SurgeryError(f"'{directory}' has no {WEIGHTS}.")
    source = ModelSource.from_json(meta["source"])
    if source.checkpoint is None and meta["report"].get("checkpoint"):  # written before sources had one
        source = dataclasses.replace(source, checkpoint=meta["report"]["checkpoint"])
    try:
        options = SurgeryOptions.from_json(meta["options"])
        report = ConversionReport.from_json(meta["report"], source)
    except SurgeryError as exc:
        raise SurgeryError(f"'{path}' has options this version does not accept: {exc}") from None
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SurgeryError(f"'{path}' has a report this version cannot read ({describe_exception(exc)}).") from exc
    if report.options != options:
        raise SurgeryError(f"'{path}' is inconsistent: options {options.to_json()} but report.options "
                           f"{report.options.to_json()}; the file was edited. Convert the model again.")
    return SavedConversion(directory, source, options, tuple(meta.get("input_size") or report.input_size), report,
                           meta.get("regularization_sites"), meta.get("versions", {}), meta.get("weights_sha256"))


def load_weights(model: nn.Module, saved: SavedConversion) -> None:
    """Check ``model.safetensors`` against the SHA-256 ``surgery.json`` recorded, load it into the
    rebuilt ``model`` strictly (a mismatch names the keys) and check its BSConv-S sites against
    those recorded."""
    if saved.weights_sha256 is not None:
        with writing(saved.weights, "reading"):
            digest = file_sha256(saved.weights)
        if digest != saved.weights_sha256:
            raise SurgeryError(
                f"'{saved.weights}' is not the file that was saved: its SHA-256 is {digest}, {METADATA} recorded "
                f"{saved.weights_sha256}. The file is damaged or was replaced; convert the model again."
            )
    try:
        state = load_file(str(saved.weights), device="cpu")
    except OSError as exc:
        raise os_error(exc, saved.weights, "reading") from exc
    except Exception as exc:
        raise SurgeryError(f"Could not read '{saved.weights}' ({describe_exception(exc)}); the file is damaged.") from exc
    problems = state_dict_problems(model, state)
    if problems:
        raise SurgeryError(
            f"The weights in '{saved.weights}' do not fit the rebuilt model: " + "; ".join(problems) + ". "
            "The installed timm/torchvision may build this model differently from the one that wrote it "
            f"(it recorded {saved.versions})."
        )
    load_model(model, str(saved.weights), strict=True)
    sites = [name for name, _ in regularization_sites(model)]
    if saved.regularization_sites is not None and sites != saved.regularization_sites:
        raise SurgeryError(f"The rebuilt model's BSConv-S sites differ from those recorded in '{saved.directory / METADATA}'.")
