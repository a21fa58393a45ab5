"""The one console helper: people get rich output on stderr/stdout, machines get JSON on stdout."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click
from rich.console import Console


class SurgeryConsole:
    """Rich output for people, plain JSON for machines, and the one abort path."""

    def __init__(self) -> None:
        self.out = Console(soft_wrap=False)
        self.err = Console(stderr=True)

    def print(self, *objects: Any) -> None:
        self.out.print(*objects)

    def info(self, message: str) -> None:
        """Progress and hints: stderr, so ``--json`` output stays one object on stdout."""
        self.err.print(message)

    def print_json(self, obj: Any) -> None:
        click.echo(json.dumps(obj, indent=2, default=str))

    def abort(self, message: str, code: int = 1) -> NoReturn:
        self.err.print(f"[bold red]Error:[/] {message}", highlight=False, soft_wrap=True, markup=True)
        sys.exit(code)


console = SurgeryConsole()
