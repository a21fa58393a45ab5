"""The ``bsconv-surgery`` command line: one module per command, expected errors through one abort path."""

from __future__ import annotations

import os
import re
import warnings

import click

from ..errors import SurgeryError, environment_message, user_message
from .analyze import analyze
from .benchmark import benchmark
from .compare import compare
from .console import console
from .convert import convert
from .models import models
from .sensitivity import sensitivity
from .train import train


class SurgeryGroup(click.Group):
    """The one error path of every command: a ``SurgeryError`` (bad input) or a failure of the
    environment (disk full, read-only folder, no memory) is a one-paragraph message and exit 1;
    Ctrl-C is exit 130; anything else is a bug: exit 70."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except SurgeryError as exc:
            console.abort(self.with_options(ctx, exc))
        except KeyboardInterrupt:
            console.abort("Interrupted.", code=130)
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
        """The message, with the Python argument it names (``target_macs``) shown as the option
        of the command that was run (``--target-macs``)."""
        message = user_message(exc)
        command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
        argument = getattr(exc, "argument", None)
        for param in command.params if command is not None and argument else ():
            if param.name == argument and isinstance(param, click.Option):
                option = max(param.opts, key=len)
                return re.sub(rf"(?<![\w.-]){re.escape(argument)}(?!\w)", option, message)
        return message


@click.group(cls=SurgeryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bsconv-surgery")
def bsconv_surgery() -> None:
    """Rewrite timm and torchvision CNNs with blueprint separable convolutions (BSConv)."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)


bsconv_surgery.add_command(convert)
bsconv_surgery.add_command(train)
bsconv_surgery.add_command(compare)
bsconv_surgery.add_command(analyze)
bsconv_surgery.add_command(benchmark)
bsconv_surgery.add_command(models)
bsconv_surgery.add_command(sensitivity)


def main() -> None:
    bsconv_surgery(prog_name="bsconv-surgery")
