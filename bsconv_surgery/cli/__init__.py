"""The ``bsconv-surgery`` command line: one module per command, expected errors through one abort path."""

from __future__ import annotations

import os
import warnings

import click

from ..core.errors import SurgeryError, environment_message, user_message
from ..core.options import CLI_FLAGS
from .console import console
from .lazy import LazyGroup

#: Command name -> (where it is, its short help). A command's module (and torch with it) is
#: imported only when the command runs or its own --help is asked; the group's --help, --version
#: and a mistyped command answer from this table.
COMMANDS = {
    "convert": ("bsconv_surgery.cli.convert:convert", "Convert a model's convolutions to BSConv"),
    "train": ("bsconv_surgery.cli.train:train", "Train or fine-tune a model with a recipe"),
    "compare": ("bsconv_surgery.cli.compare:compare", "Compare params and MACs of BSConv variants side by side"),
    "analyze": ("bsconv_surgery.cli.analyze:analyze", "Per-stage histograms of intra-kernel correlations (paper Fig. 3)"),
    "benchmark": ("bsconv_surgery.cli.benchmark:benchmark", "Time the original and the converted model side by side"),
    "models": ("bsconv_surgery.cli.models:models", "List models and the sites the surgery would find"),
    "sensitivity": ("bsconv_surgery.cli.sensitivity:sensitivity",
                    "Per-site fidelity loss and savings of converting each site alone"),
    "compress": ("bsconv_surgery.cli.compress:compress",
                 "Compress a trained model to a budget and distil it back to its own answers"),
    "export": ("bsconv_surgery.cli.export:export",
               "Write a converted model or a run's best checkpoint as ONNX or a torch.export program"),
}


class SurgeryGroup(LazyGroup):
    """The one error path of every command: a ``SurgeryError`` (bad input) or a failure of the
    environment (disk full, read-only folder, no memory) is a one-paragraph message and exit 1;
    Ctrl-C (also while a command's modules import) is exit 130; anything else is a bug: exit 70."""

    def invoke(self, ctx: click.Context):
        warnings.filterwarnings("ignore", category=FutureWarning)  # before any library is imported
        warnings.filterwarnings("ignore", category=UserWarning)
        try:
            return super().invoke(ctx)
        except SurgeryError as exc:
            console.abort(self.with_options(ctx, exc))
        except KeyboardInterrupt:
            console.interrupted()
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as exc:
            message = environment_message(exc)
            if message is not None and not os.environ.get("BSCONV_SURGERY_DEBUG"):
                console.abort(message)
            if os.environ.get("BSCONV_SURGERY_DEBUG"):
                raise
            console.abort(  # a bug, not bad input: say so briefly unless debugging
                f"Unexpected {type(exc).__name__}: {exc}. This is a bug in bsconv-surgery or a model it "
                "does not support; set BSCONV_SURGERY_DEBUG=1 to see the traceback.",
                code=70,
            )

    def with_options(self, ctx: click.Context, exc: SurgeryError) -> str:
        """The message, with each Python argument it names (``target_macs``, ``example_inputs``)
        shown as the command line spells it: the invoked command's own option of that name, else
        the declared flag (``CLI_FLAGS``)."""
        command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
        own = {p.name: max(p.opts, key=len) for p in (command.params if command is not None else ())
               if isinstance(p, click.Option)}
        return user_message(exc, {**CLI_FLAGS, **own})


@click.group(cls=SurgeryGroup, lazy_commands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bsconv-surgery")  # read from the installed metadata, no torch
def bsconv_surgery() -> None:
    """Rewrite timm and torchvision CNNs with blueprint separable convolutions (BSConv)."""


def main() -> None:
    bsconv_surgery(prog_name="bsconv-surgery")
