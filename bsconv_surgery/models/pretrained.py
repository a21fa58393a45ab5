"""Published weights: timm's pretrained tags and torchvision's weights enums, found in the
libraries' own caches and loaded without any network access when they are there.

- **timm** (``timm:resnet50.a1_in1k``; a bare ``timm:resnet50`` takes timm's default tag): weights on
  the Hugging Face hub live in its cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``) as ``models--timm--resnet50.a1_in1k/snapshots/<revision>/model.safetensors``
  (or ``pytorch_model.bin``); weights published as a URL only (and timm's old cache) in torch
  hub's ``TORCH_HOME/hub/checkpoints/<file name>``.
- **torchvision** (``DEFAULT``, or ``--weights IMAGENET1K_V2``): ``TORCH_HOME/hub/checkpoints/<the file
  name of the entry's URL>``.

A cached file is loaded straight from the cache: timm's own loader on that file (the same head
dropping and input-conv adaptation as ``pretrained=True``), torchvision's own builder with its
weights read by ``torch.load(weights_only=True)`` (the same constructor arguments the weights
imply). No request goes out, so a cache filled elsewhere works offline, and ``HF_HUB_OFFLINE=1``
is honoured. A file that is not cached is downloaded into that cache by ``huggingface_hub`` or
torch hub, after a quick check that the host answers (an unreachable host fails in seconds, not
after a minute of retries); when that cannot work the error names what was looked for, where,
and how to fetch it on a machine with network (``not_available``).

``published_weights`` resolves a spec (and ``--weights``) to a ``Published`` entry;
``build_pretrained`` builds the model with those weights (or, ``load=False``, the same
architecture without them: how a saved conversion is rebuilt) and returns their provenance.
"""

from __future__ import annotations

import json
import os
import socket
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple
from unittest import mock
from urllib.parse import urlparse

import huggingface_hub
import timm
import torch
import torch.hub
import torchvision
import torchvision.models._api as torchvision_api
from huggingface_hub.errors import EntryNotFoundError
from timm.models import get_pretrained_cfg, list_pretrained, split_model_name_tag
from torch import nn

from ..core.errors import SurgeryError, arg, describe_exception
from ..core.records import PretrainedWeights
from .checkpoints import file_sha256

__all__ = ["Published", "published_weights", "build_pretrained", "timm_pretrained_tags", "torchvision_weight_names",
           "find_cached", "hf_cache_dir", "torch_checkpoints_dir", "hub_offline", "PROBE_TIMEOUT"]

#: Seconds the reachability check waits for a TCP connection to the download host.
PROBE_TIMEOUT = 5.0
_HF_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Published:
    """One set of published weights: ``zoo`` and ``name`` (timm ``arch.tag``, torchvision
    ``Enum.ENTRY``), the classes of their head, and where they come from (a hub id and its
    candidate files, and/or a URL); ``entry`` is the torchvision enum member."""

    zoo: str
    name: str
    model: str  # the name timm / torchvision builds: arch.tag, or the torchvision model name
    num_classes: Optional[int]
    hub_id: Optional[str] = None
    hub_revision: Optional[str] = None
    hub_files: Tuple[str, ...] = ()
    url: Optional[str] = None
    entry: Any = None

    @property
    def url_file(self) -> Optional[str]:
        return os.path.basename(urlparse(self.url).path) if self.url else None


# -- resolving a spec to published weights ---------------------------------------------------------

def timm_pretrained_tags(arch: str) -> List[str]:
    """The tags of ``arch`` that have published weights (``timm.list_pretrained(arch + '.*')``)."""
    return [name.split(".", 1)[1] for name in list_pretrained(f"{arch}.*")]


def torchvision_weight_names(name: str) -> List[str]:
    """The entries of a torchvision model's weights enum (``[]`` when it has none)."""
    try:
        return [entry.name for entry in torchvision.models.get_model_weights(name)]
    except Exception:  # no weights enum for this model
        return []


HF_HUB_PREFIX = "hf-hub:"


def hf_hub_config(hub_id: str) -> Dict[str, Any]:
    """The ``config.json`` timm publishes beside a hub model's weights (``architecture``,
    ``num_classes``, ``pretrained_cfg``), read from the Hugging Face cache, never the network (the
    weights themselves are fetched as ``--pretrained`` fetches any timm weights)."""
    found = huggingface_hub.try_to_load_from_cache(hub_id, "config.json", cache_dir=str(hf_cache_dir()))
    if not (isinstance(found, str) and os.path.isfile(found)):
        where = _hf_repo_folder(hub_id)
        raise SurgeryError(
            f"hf-hub:{hub_id} is not in the Hugging Face cache ({where}/snapshots/<revision>/config.json): its "
            f"config names the architecture. On a machine with network, run python -c \"import timm; "
            f"timm.create_model('hf-hub:{hub_id}', pretrained=True)\", then copy {where.name} from that machine's "
            f"~/.cache/huggingface/hub/ to {where.parent}/ here.")
    try:
        config = json.loads(Path(found).read_text())
    except (OSError, ValueError) as exc:
        raise SurgeryError(f"The cached config {found} of hf-hub:{hub_id} does not read as JSON "
                           f"({describe_exception(exc, 200)}): delete it and fetch it again.") from exc
    arch = config.get("architecture") if isinstance(config, dict) else None
    if not isinstance(arch, str) or not timm.is_model(arch):
        raise SurgeryError(f"The cached config {found} of hf-hub:{hub_id} names no timm architecture "
                           f"(architecture: {arch!r}).")
    return config


def _hf_hub(name: str) -> Published:
    hub_id = name[len(HF_HUB_PREFIX):]
    config = hf_hub_config(hub_id)
    return Published("timm", name, config["architecture"], config.get("num_classes"), hub_id, None,
                     ("model.safetensors", "pytorch_model.bin"))


def _timm(name: str) -> Published:
    if name.startswith(HF_HUB_PREFIX):
        return _hf_hub(name)
    arch, tag = split_model_name_tag(name)
    tags = timm_pretrained_tags(arch)
    if not tags:
        raise SurgeryError(f"timm:{arch} has no pretrained weights in timm {timm.__version__}, so {arg('pretrained')} does not "
                           f"apply; convert it with random init, or pass your own weights with {arg('checkpoint')}.")
    if not tag:
        default = get_pretrained_cfg(arch)
        tag = default.tag if default is not None and default.tag in tags else tags[0]
    if tag not in tags:
        raise SurgeryError(f"timm:{arch} has no pretrained weights tagged '{tag}'. Valid tags: {', '.join(tags)} "
                           f"(e.g. timm:{arch}.{tags[0]}).")
    cfg = get_pretrained_cfg(f"{arch}.{tag}")
    hub_id, revision, files = None, None, ()
    if cfg.hf_hub_id:
        hub_id, _, revision = cfg.hf_hub_id.partition("@")
        wanted = cfg.hf_hub_filename or "pytorch_model.bin"
        safe = ("model.safetensors",) if wanted == "pytorch_model.bin" else \
            (wanted[:-4] + ".safetensors",) if wanted.endswith(".bin") else ()
        files = safe + (wanted,)
    if not hub_id and not cfg.url:
        raise SurgeryError(f"timm:{arch}.{tag} names no hub id or URL for its weights (timm {timm.__version__}); "
                           f"pass the weights with {arg('checkpoint')}.")
    return Published("timm", f"{arch}.{tag}", f"{arch}.{tag}", cfg.num_classes, hub_id, revision or None, files,
                     cfg.url or None)


def _torchvision(name: str, family: str, weights: Optional[str]) -> Published:
    if family == "quantization":
        raise SurgeryError(f"tv:{name} is converted in its float form (quantize=False), which takes the float model's "
                           f"weights: use tv:{name.removeprefix('quantized_')} with {arg('pretrained=True')} instead.")
    try:
        enum = torchvision.models.get_model_weights(name)
    except Exception:  # no weights enum for this model
        raise SurgeryError(f"tv:{name} has no published weights in torchvision {torchvision.__version__}, so "
                           f"{arg('pretrained')} does not apply; pass your own weights with {arg('checkpoint')}.") from None
    valid = [entry.name for entry in enum]
    wanted = (weights or "DEFAULT").strip()
    wanted = wanted.split(".", 1)[1] if wanted.startswith(enum.__name__ + ".") else wanted
    if wanted.upper() == "DEFAULT":
        entry = enum.DEFAULT
    elif wanted in valid:
        entry = enum[wanted]
    else:
        raise SurgeryError(f"tv:{name} has no weights '{weights}'. Valid {arg('weights')}: DEFAULT, {', '.join(valid)} "
                           f"(torchvision's {enum.__name__}).")
    categories = entry.meta.get("categories")
    return Published("torchvision", f"{enum.__name__}.{entry.name}", name, len(categories) if categories else None,
                     url=entry.url, entry=entry)


def published_weights(spec, weights: Optional[str] = None) -> Published:
    """The published weights of ``spec`` (a ``ModelSpec``): timm's tag in the spec (default: timm's
    default tag), torchvision's ``weights`` entry (default ``DEFAULT``). Unknown tags and entries
    are errors that list the valid ones."""
    if spec.source == "timm":
        if weights is not None:
            tags = timm_pretrained_tags(split_model_name_tag(spec.name)[0])
            shown = f" Valid tags: {', '.join(tags)}." if tags else ""
            raise SurgeryError(f"{arg('weights')} names torchvision weights; a timm model takes its pretrained tag in the "
                               f"spec, e.g. timm:{split_model_name_tag(spec.name)[0]}.{tags[0] if tags else 'TAG'}.{shown}")
        return _timm(spec.name)
    return _torchvision(spec.name, spec.family, weights)


# -- the caches ------------------------------------------------------------------------------------

def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now: ``HF_HUB_CACHE``, else
    ``HF_HOME/hub``, else ``XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.environ[key]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def torch_checkpoints_dir() -> Path:
    """torch hub's weights cache: ``torch.hub.get_dir()/checkpoints`` (``TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` is set: the Hugging Face hub must not be asked."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def _hf_repo_folder(hub_id: str) -> Path:
    return hf_cache_dir() / ("models--" + hub_id.replace("/", "--"))


def find_cached(pub: Published, revision: Optional[str] = None) -> Optional[Tuple[Path, Optional[str]]]:
    """The cached weights file of ``pub`` and its hub revision, without any network access: the
    Hugging Face cache first (the ``revision`` asked for, else the hub id's, else ``main``), then
    torch hub's file for the URL; ``None`` when neither holds it."""
    if pub.hub_id:
        for filename in pub.hub_files:
            found = huggingface_hub.try_to_load_from_cache(pub.hub_id, filename, cache_dir=str(hf_cache_dir()),
                                                           revision=revision or pub.hub_revision)
            if isinstance(found, str) and os.path.isfile(found):
                path = Path(found)
                return path, path.parent.name
    if pub.url_file and revision is None:
        path = torch_checkpoints_dir() / pub.url_file
        if path.is_file():
            return path, None
    return None


def _probe(url: str) -> Optional[str]:
    """Why ``url``'s host cannot be reached, or ``None`` when it answers (or a proxy is set, which
    the download will go through)."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    parsed = urlparse(url)
    host = parsed.hostname or ""
    try:
        socket.create_connection((host, parsed.port or (80 if parsed.scheme == "http" else 443)),
                                 timeout=PROBE_TIMEOUT).close()
    except OSError as exc:
        return f"{host} cannot be reached ({describe_exception(exc, 120)})"
    return None


def _download_hub(pub: Published, revision: Optional[str]) -> Path:
    for filename in pub.hub_files:
        try:
            return Path(huggingface_hub.hf_hub_download(pub.hub_id, filename, revision=revision or pub.hub_revision,
                                                        cache_dir=str(hf_cache_dir())))
        except EntryNotFoundError:
            continue
    raise FileNotFoundError(f"{pub.hub_id} holds none of {', '.join(pub.hub_files)}")


def _download_url(pub: Published) -> Path:
    path = torch_checkpoints_dir() / pub.url_file
    path.parent.mkdir(parents=True, exist_ok=True)
    hashed = torch.hub.HASH_REGEX.search(pub.url_file) if pub.zoo == "torchvision" else None
    torch.hub.download_url_to_file(pub.url, str(path), hashed.group(1) if hashed else None, progress=True)
    return path


def _fetch(pub: Published, revision: Optional[str]) -> Tuple[Path, Optional[str]]:
    """Download ``pub`` into its library's cache, or raise ``not_available``."""
    if pub.hub_id:
        endpoint = os.environ.get("HF_ENDPOINT") or _HF_ENDPOINT
        if hub_offline():
            raise not_available(pub, "HF_HUB_OFFLINE is set")
        why = _probe(endpoint)
        if why is not None:
            raise not_available(pub, why)
        try:
            path = _download_hub(pub, revision)
        except Exception as exc:
            raise not_available(pub, f"the download failed: {describe_exception(exc, 200)}") from None
        return path, path.parent.name
    why = _probe(pub.url)
    if why is not None:
        raise not_available(pub, why)
    try:
        return _download_url(pub), None
    except Exception as exc:
        raise not_available(pub, f"the download failed: {describe_exception(exc, 200)}") from None


def not_available(pub: Published, why: str) -> SurgeryError:
    """The one paragraph for weights that are neither cached nor downloadable: what was looked
    for, where, and how to fetch them on a machine with network."""
    if pub.hub_id:
        folder = _hf_repo_folder(pub.hub_id)
        files = " or ".join(pub.hub_files)
        where = (f"Looked for {files} of {pub.hub_id} in the Hugging Face cache, {folder}/snapshots/<revision>/ "
                 f"(with refs/main naming the revision; the cache is HF_HUB_CACHE, else HF_HOME/hub)")
        if pub.url_file:
            where += f", and for {torch_checkpoints_dir() / pub.url_file} (torch hub)"
        fetch = (f"python -c \"import timm; timm.create_model('{pub.model}', pretrained=True)\" (or: hf download "
                 f"{pub.hub_id} {pub.hub_files[0]}), then copy the folder models--{pub.hub_id.replace('/', '--')} from "
                 f"that machine's ~/.cache/huggingface/hub/ to {folder.parent}/ here")
    else:
        target = torch_checkpoints_dir() / pub.url_file
        where = f"Looked for {target} (torch hub's cache: TORCH_HOME/hub/checkpoints)"
        if pub.zoo == "torchvision":
            entry = pub.name.split(".", 1)[1]
            fetch = f"python -c \"import torchvision; torchvision.models.get_model('{pub.model}', weights='{entry}')\""
        else:
            fetch = f"python -c \"import timm; timm.create_model('{pub.model}', pretrained=True)\""
        fetch += (f" (or download {pub.url}), then copy {pub.url_file} from that machine's "
                  f"~/.cache/torch/hub/checkpoints/ to {target.parent}/ here")
    label = f"timm:{pub.model}" if pub.zoo == "timm" else f"tv:{pub.model} {pub.name}"
    return SurgeryError(f"The pretrained weights of {label} are not cached here and cannot be downloaded: {why}. "
                        f"{where}. On a machine with network, run {fetch}; or pass the weights file with {arg('checkpoint')}.")


def _locate(pub: Published, revision: Optional[str] = None) -> Tuple[Path, Optional[str]]:
    return find_cached(pub, revision) or _fetch(pub, revision)


# -- building ----------------------------------------------------------------------------------------

class _NoWeights(dict):
    """What torchvision's builder 'loads' when only the architecture is wanted."""


_MODULE_LOAD_STATE_DICT = nn.Module.load_state_dict


def _skip_no_weights(self, state_dict, *args, **kwargs):
    if isinstance(state_dict, _NoWeights):
        return nn.modules.module._IncompatibleKeys([], [])
    return _MODULE_LOAD_STATE_DICT(self, state_dict, *args, **kwargs)


@contextmanager
def _torchvision_weights_from(path: Optional[Path]) -> Iterator[None]:
    """torchvision's builders read their weights through ``WeightsEnum.get_state_dict``: here it
    reads ``path`` with ``torch.load(weights_only=True)`` (no download, no pickled code); with
    ``path=None`` nothing is loaded and the builder keeps its random init (the architecture the
    weights imply, e.g. a ViT's image size or GoogLeNet without its auxiliary heads)."""

    def load(url, *args, **kwargs):
        if path is None:
            return _NoWeights()
        return torch.load(path, map_location="cpu", weights_only=True)

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(torchvision_api, "load_state_dict_from_url", load))
        if path is None:
            stack.enter_context(mock.patch.object(nn.Module, "load_state_dict", _skip_no_weights))
        yield


def _build(pub: Published, path: Optional[Path], kwargs: Dict[str, Any]) -> nn.Module:
    if pub.name.startswith(HF_HUB_PREFIX) and pub.num_classes is not None:  # the head its config says
        kwargs = {"num_classes": pub.num_classes, **kwargs}
    if pub.zoo == "timm":
        if path is None:
            return timm.create_model(pub.model, pretrained=False, **kwargs)
        overlay = {"file": str(path), "source": ""}
        if pub.name.startswith(HF_HUB_PREFIX) and pub.num_classes is not None:
            overlay["num_classes"] = pub.num_classes  # the head of these weights is kept, not dropped
        return timm.create_model(pub.model, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    with _torchvision_weights_from(path):
        return torchvision.models.get_model(pub.model, weights=pub.entry, **kwargs)


def build_pretrained(pub: Published, kwargs: Dict[str, Any], *, load: bool = True,
                     recorded: Optional[PretrainedWeights] = None) -> Tuple[nn.Module, Optional[PretrainedWeights]]:
    """Build ``pub``'s model with its weights, from the cache (downloading them into it when
    missing and possible); ``kwargs`` are the family's constructor arguments (timm's ``num_classes``
    among them: a head of another size starts fresh). With ``load=False`` the same architecture
    is built without weights and nothing is looked up. ``recorded`` (the provenance of an earlier
    build) pins the hub revision and the file's SHA-256: other weights are refused."""
    if not load:
        return _build(pub, None, kwargs), None
    path, revision = _locate(pub, recorded.revision if recorded is not None else None)
    digest = file_sha256(path)
    if recorded is not None and digest != recorded.sha256:
        raise SurgeryError(f"The cached weights {path} of {pub.name} are not the ones recorded: SHA-256 {digest}, "
                           f"recorded {recorded.sha256} ({recorded.label}). Restore that file, or pass the teacher's "
                           "weights with --teacher-checkpoint.")
    try:
        model = _build(pub, path, kwargs)
    except SurgeryError:
        raise
    except Exception as exc:
        raise SurgeryError(f"The weights file {path} ({pub.name}) does not load into {pub.zoo}:{pub.model}: "
                           f"{describe_exception(exc, 300)}. The file may be damaged or incomplete: delete it and "
                           "fetch it again.") from exc
    provenance = PretrainedWeights(pub.zoo, pub.name, path.name, digest, pub.num_classes, pub.hub_id,
                                   revision if pub.hub_id and revision else None, pub.url, str(path))
    return model, provenance
