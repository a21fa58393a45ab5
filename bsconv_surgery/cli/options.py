"""Options shared by several commands (model spec, input size, checkpoint, registry names)."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import click

from ..core.errors import SurgeryError
from ..core.options import SURGERY_OPTIONS, Option, SurgeryOptions, bounded_threads
from ..core.registry import INITIALIZERS, METRICS, VARIANTS, Registry
from .lazy import lazy_module

documents = lazy_module("bsconv_surgery.io.documents")
zoo = lazy_module("bsconv_surgery.models.zoo")

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
model_args_option = click.option(
    "--model-arg", "model_args", type=TEXT, multiple=True, metavar="KEY=VALUE",
    help="A keyword argument of your own model's callable (MODEL py:package.module:callable or "
    "file:path/net.py:callable), repeatable; the value is read as YAML (18, true, 0.5, small).")
trust_code_option = click.option(
    "--trust-code", is_flag=True,
    help="Rebuild a saved model whose spec runs your own code (py:/file:): that code runs again.")
json_option = click.option("--json", "as_json", is_flag=True, help="Print exactly one JSON object on stdout.")


def model_source_options(function: Callable) -> Callable:
    """What ``load_source`` reads besides MODEL: --num-classes, --input-size, --checkpoint,
    --pretrained, --weights and --model-arg (in that order in --help)."""
    for option in (model_args_option, weights_option, pretrained_option, checkpoint_option, input_size_option,
                   num_classes_option):
        function = option(function)
    return function


def _threads_value(ctx: click.Context, param: click.Parameter, value: Optional[int]) -> Optional[int]:
    try:
        return None if value is None else bounded_threads(value, f"--{param.name}")
    except SurgeryError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


threads_option = click.option("--threads", type=int, default=None, callback=_threads_value,
                              help="torch intra-op threads, 1 to the machine's CPU count (default: torch's own).")


def _click_option(option: Option, note: str = "") -> Callable:
    """The click option of one declared conversion option (``core/options.py``)."""
    kwargs: Dict[str, Any] = {"help": option.help.rstrip(".") + (f" ({note})." if note else ".")}
    if option.is_flag:
        kwargs["is_flag"] = True
    elif option.multiple:
        kwargs.update(type=TEXT, multiple=True, metavar=option.metavar)
    elif option.name == "variant":
        kwargs.update(type=click.Choice(sorted(VARIANTS)), default=option.default, show_default=True)
    elif option.name == "init":
        kwargs.update(type=TEXT, default=option.default, show_default=True, metavar="|".join(INITIALIZERS.names()),
                      callback=registry_value(INITIALIZERS, option.cli_flag))
    elif option.annotation is int:
        kwargs.update(type=click.IntRange(min=1), default=option.default, show_default=True)
    else:
        kwargs.update(type=TEXT, default=option.default, show_default=option.default is not None, metavar=option.metavar)
    return click.option(option.cli_flag, option.name, **kwargs)


def surgery_options(*names: str, note: str = "") -> Callable:
    """The click options of the conversion options ``names`` (all when none are given), made from
    their one declaration (``SURGERY_OPTIONS``), in its order; ``note`` ends each help text."""
    unknown = set(names) - set(SURGERY_OPTIONS)
    if unknown:
        raise ValueError(f"Unknown conversion option(s) {sorted(unknown)}; declared: {list(SURGERY_OPTIONS)}")
    chosen = [o for o in SURGERY_OPTIONS.values() if not names or o.name in names]

    def decorate(command: Callable) -> Callable:
        for option in reversed(chosen):
            command = _click_option(option, note)(command)
        return command

    return decorate


def options_from(variant: str, **values: Any) -> SurgeryOptions:
    """``SurgeryOptions`` from a command's values of the declared options (empty repeatable ones and
    unset ones left at their defaults)."""
    given = {k: v for k, v in values.items() if k in SURGERY_OPTIONS and v is not None and v != ()}
    return SurgeryOptions.create(variant, **given)


def source_json(data: dict, checkpoint: Optional[str], source, plot: Optional[str] = None) -> dict:
    """``data`` (a command's ``--json`` object) with where the weights came from and the plot written."""
    if checkpoint:
        data["checkpoint"] = str(checkpoint)
    if source.pretrained is not None:
        data["pretrained"] = source.pretrained.to_json()
    if plot:
        data["plot"] = str(plot)
    return data


def parse_model_args(items: Sequence[str]) -> Dict[str, Any]:
    """``--model-arg depth=18 --model-arg pretrained=true`` -> ``{"depth": 18, "pretrained": True}``:
    each value read as one YAML scalar (a number, true/false, null, text), with the bounded loader."""
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise SurgeryError(f"Bad --model-arg '{item}': expected KEY=VALUE with a Python name as KEY, such as "
                               "pretrained=true or depth=18.")
        value = documents.load_yaml(text) if text.strip() else ""
        if isinstance(value, (dict, list)):
            raise SurgeryError(f"Bad --model-arg '{item}': the value must be one scalar (a number, true/false, null "
                               "or text), not a YAML collection.")
        if key in out:
            raise SurgeryError(f"--model-arg {key} given twice.")
        out[key] = value
    return out


def load_source(model: str, num_classes: Optional[int], checkpoint: Optional[str], input_size: Optional[str],
                pretrained: bool = False, weights: Optional[str] = None, model_args: Sequence[str] = ()) -> Tuple[Any, Any]:
    """Resolve a MODEL argument at the edge: the module (``load_model``: it carries its spec and
    where its weights came from, ``model_source``) and its ``ExampleInputs``, made once from
    ``--input-size`` and the model's family; ``model_args``: the ``--model-arg`` values of a
    ``py:``/``file:`` spec's callable."""
    module = zoo.load_model(model, pretrained=pretrained, weights=weights, checkpoint=checkpoint, num_classes=num_classes,
                            model_args=parse_model_args(model_args) or None)
    return module, zoo.example_inputs_for(module, input_size)


def metric_option(function: Callable) -> Callable:
    """``--metric NAME``: what a site's loss is (``recovery/losses.py``), checked against ``METRICS``."""
    return click.option(
        "--metric", type=TEXT, default=None, metavar="NAME", callback=registry_value(METRICS, "--metric"),
        help="What a site's loss is, measured on --calib: auto (default: decision disagreement on the decision output "
        "plus softmax KL, per-bin binary cross-entropy for a sigmoid head, box/score matching for detection, the "
        "relative error for regression), relative-error, kl, bce (a multi-label head, logits or probabilities) or "
        "disagreement.")(function)


def registry_value(registry: Registry, option: str) -> Callable:
    """A click callback that checks an option's value against ``registry``: an unknown name is the
    registry's error, naming the option (``Unknown --init 'x'. Valid inits: default, svd.``)."""

    def check(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
        if value is not None:
            registry.check(value, option)
        return value

    return check
