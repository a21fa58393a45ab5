"""Options shared by several commands (model spec, input size, checkpoint, registry names)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import click

from ..models.zoo import (ModelSpec, build_source_model, check_input_size, default_input_size, parse_input_size,
                          parse_model_spec)
from ..registry import Registry

class NonEmpty(click.ParamType):
    """A value that must not be empty: ``--out ''`` is an error (exit 2), never "no --out". Text,
    or what ``inner`` converts to (``click.Path``); every option and argument that takes a path or a
    name uses it (``TEXT`` or ``path(...)``; tests/cli/test_messages.py checks that none is left out)."""

    def __init__(self, inner: click.ParamType = click.STRING) -> None:
        self.inner, self.name = inner, inner.name

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            hint = " (leave the option out for its default)" if isinstance(param, click.Option) else ""
            self.fail(f"an empty value is not allowed{hint}.", param, ctx)
        return self.inner.convert(value, param, ctx)

    def get_metavar(self, param: click.Parameter, ctx: click.Context) -> Optional[str]:
        return self.inner.get_metavar(param, ctx)

    def shell_complete(self, ctx, param, incomplete):
        return self.inner.shell_complete(ctx, param, incomplete)


#: A non-empty string (names, specs, globs, numbers given as text).
TEXT = NonEmpty()


def path(**kwargs: Any) -> NonEmpty:
    """A non-empty ``click.Path(**kwargs)``."""
    return NonEmpty(click.Path(**kwargs))


model_argument = click.argument("model", metavar="MODEL", type=TEXT)
num_classes_option = click.option("--num-classes", type=click.IntRange(min=1), default=None, help="Classifier size (default: the model's own).")
input_size_option = click.option(
    "--input-size", type=TEXT, default=None, metavar="C,H,W",
    help="Input size for counting and checks: C,H,W (C,T,H,W for video models). Default: timm's pretrained config, "
    "torchvision's weights transforms (a detection model's resize size, 16 frames of the video crop), else 3,224,224.")
checkpoint_option = click.option(
    "--checkpoint", type=path(dir_okay=False), default=None,
    help="Weights for the source model: .safetensors, or a state dict read with torch.load(weights_only=True).",
)
pretrained_option = click.option(
    "--pretrained", is_flag=True,
    help="Start from the zoo's published weights: timm's (a tag in MODEL picks them, e.g. timm:resnet50.a1_in1k), "
    "torchvision's DEFAULT (or --weights). Read from the libraries' caches (HF_HOME, TORCH_HOME); downloaded "
    "into them when missing. With --num-classes the pretrained backbone gets a fresh head.")
weights_option = click.option(
    "--weights", type=TEXT, default=None, metavar="NAME",
    help="A torchvision model's weights enum entry, e.g. IMAGENET1K_V2 (implies --pretrained; default DEFAULT).")
memory_check_option = click.option(
    "--no-memory-check", "no_memory_check", is_flag=True,
    help="Run even when the forward pass at this input size is estimated not to fit in memory.")
allow_growth_option = click.option(
    "--allow-growth", is_flag=True,
    help="Also convert standard convs whose replacement would not have fewer parameters or MACs (one input "
    "channel; patchify convs whose kernel equals their stride). By default they are skipped with that reason.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")


def site_filter_options(command: Callable) -> Callable:
    """``--kernel-sizes``, ``--include`` and ``--exclude``: which candidate sites a command considers."""
    for option in reversed((
        click.option("--kernel-sizes", type=TEXT, default=None, metavar="K[,K...]",
                     help="Only standard convs with these kernels (3 = 3x3, 1x7 = rectangular)."),
        click.option("--include", type=TEXT, multiple=True, metavar="GLOB", help="Only sites whose qualified name matches (repeatable)."),
        click.option("--exclude", type=TEXT, multiple=True, metavar="GLOB", help="Leave sites whose qualified name matches (repeatable)."),
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
    spec: ModelSpec = parse_model_spec(model)
    size = parse_input_size(input_size) if input_size else None
    module, source = build_source_model(spec, num_classes=num_classes, checkpoint=checkpoint, pretrained=pretrained,
                                        weights=weights)
    return spec, module, check_input_size(spec, size or default_input_size(spec, module)), source


def registry_value(registry: Registry, option: str) -> Callable:
    """A click callback that checks an option's value against ``registry``: an unknown name is the
    registry's error, naming the option (``Unknown --init 'x'. Valid inits: default, svd.``)."""

    def check(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
        if value is not None:
            registry.get(value, option)
        return value

    return check
