"""Options shared by several commands (model spec, input size, checkpoint, registry names)."""

from __future__ import annotations

from typing import Callable, Optional

import click

from ..errors import SurgeryError
from ..options import bounded_threads
from ..registry import Registry
from .lazy import lazy_module

zoo = lazy_module("bsconv_surgery.models.zoo")

model_argument = click.argument("model", metavar="MODEL")
num_classes_option = click.option("--num-classes", type=click.IntRange(min=1), default=None, help="Classifier size (default: the model's own).")
input_size_option = click.option(
    "--input-size", default=None, metavar="C,H,W",
    help="Input size for counting and checks: C,H,W (C,T,H,W for video models). Default: timm's pretrained config, "
    "torchvision's weights transforms (a detection model's resize size, 16 frames of the video crop), else 3,224,224.")
checkpoint_option = click.option(
    "--checkpoint", type=click.Path(dir_okay=False), default=None,
    help="Weights for the source model: .safetensors, or a state dict read with torch.load(weights_only=True).",
)
pretrained_option = click.option(
    "--pretrained", is_flag=True,
    help="Start from the zoo's published weights: timm's (a tag in MODEL picks them, e.g. timm:resnet50.a1_in1k), "
    "torchvision's DEFAULT (or --weights). Read from the libraries' caches (HF_HOME, TORCH_HOME); downloaded "
    "into them when missing. With --num-classes the pretrained backbone gets a fresh head.")
weights_option = click.option(
    "--weights", default=None, metavar="NAME",
    help="A torchvision model's weights enum entry, e.g. IMAGENET1K_V2 (implies --pretrained; default DEFAULT).")
memory_check_option = click.option(
    "--no-memory-check", "no_memory_check", is_flag=True,
    help="Run even when the forward pass at this input size is estimated not to fit in memory.")
allow_growth_option = click.option(
    "--allow-growth", is_flag=True,
    help="Also convert standard convs whose replacement would not have fewer parameters or MACs (one input "
    "channel; patchify convs whose kernel equals their stride). By default they are skipped with that reason.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")


def _threads_value(ctx: click.Context, param: click.Parameter, value: Optional[int]) -> Optional[int]:
    try:
        return None if value is None else bounded_threads(value, f"--{param.name}")
    except SurgeryError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


threads_option = click.option("--threads", type=int, default=None, callback=_threads_value,
                              help="torch intra-op threads, 1 to the machine's CPU count (default: torch's own).")


def site_filter_options(command: Callable) -> Callable:
    """``--kernel-sizes``, ``--include`` and ``--exclude``: which candidate sites a command considers."""
    for option in reversed((
        click.option("--kernel-sizes", default=None, metavar="K[,K...]",
                     help="Only standard convs with these kernels (3 = 3x3, 1x7 = rectangular)."),
        click.option("--include", multiple=True, metavar="GLOB", help="Only sites whose qualified name matches (repeatable)."),
        click.option("--exclude", multiple=True, metavar="GLOB", help="Leave sites whose qualified name matches (repeatable)."),
    )):
        command = option(command)
    return command


def source_json(data: dict, checkpoint: Optional[str], source, plot: Optional[str] = None) -> dict:
    """``data`` (a command's ``--json`` object) with where the weights came from and the plot written."""
    if checkpoint:
        data["checkpoint"] = str(checkpoint)
    if source.pretrained is not None:
        data["pretrained"] = source.pretrained.to_json()
    if plot:
        data["plot"] = str(plot)
    return data


def build_source(model: str, num_classes: Optional[int], checkpoint: Optional[str], input_size: Optional[str],
                 pretrained: bool = False, weights: Optional[str] = None):
    """Resolve a MODEL argument: returns ``(spec, module, input_size, source)`` (the size checked
    against what the model's family takes: ``C,H,W``, ``C,T,H,W`` for video; ``source`` where the
    weights came from)."""
    spec = zoo.parse_model_spec(model)
    size = zoo.parse_input_size(input_size) if input_size else None
    module, source = zoo.build_source_model(spec, num_classes=num_classes, checkpoint=checkpoint, pretrained=pretrained,
                                            weights=weights)
    return spec, module, zoo.check_input_size(spec, size or zoo.default_input_size(spec, module)), source


def registry_value(registry: Registry, option: str) -> Callable:
    """A click callback that checks an option's value against ``registry``: an unknown name is the
    registry's error, naming the option (``Unknown --init 'x'. Valid inits: default, svd.``)."""

    def check(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
        if value is not None:
            registry.check(value, option)
        return value

    return check
