"""The one console helper: people get rich output on stderr/stdout, machines get JSON on stdout.

Markup is off on both consoles: model names, paths, checkpoint keys and error messages are
printed as they are (``ckpt[v2].pt`` stays ``ckpt[v2].pt``, ``[/x]`` cannot break the output).
Styles are applied to fixed text only, through ``rich.text.Text``.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn, Optional

import click
from rich.console import Console
from rich.text import Text

__all__ = ["SurgeryConsole", "console", "labelled"]


def labelled(label: str, style: str, message: str) -> Text:
    """``label`` in ``style``, then ``message`` as plain text (never read as markup)."""
    return Text.assemble((label, style), " ", message)


class SurgeryConsole:
    """Rich output for people, plain JSON for machines, and the one abort path."""

    def __init__(self) -> None:
        self.out = Console(soft_wrap=False, markup=False, emoji=False)
        self.err = Console(stderr=True, markup=False, emoji=False)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self.out.print(*objects, **kwargs)

    def info(self, message: str, style: Optional[str] = None) -> None:
        """Progress and hints: stderr, so ``--json`` output stays one object on stdout."""
        self.err.print(Text(message, style=style or ""), soft_wrap=True, highlight=False)

    def warn(self, message: str) -> None:
        self.err.print(labelled("Warning:", "yellow", message), soft_wrap=True, highlight=False)

    def print_json(self, obj: Any) -> None:
        click.echo(json.dumps(obj, indent=2, default=str))

    def abort(self, message: str, code: int = 1) -> NoReturn:
        """The one way a command fails: ``Error: message`` on stderr, exit ``code``."""
        self.err.print(labelled("Error:", "bold red", message), highlight=False, soft_wrap=True)
        sys.exit(code)

    def interrupted(self) -> NoReturn:
        """Ctrl-C: ``Interrupted.`` on stderr (the user's choice, not an error) and exit 130."""
        self.err.print(Text("Interrupted."), highlight=False)
        sys.exit(130)


console = SurgeryConsole()
