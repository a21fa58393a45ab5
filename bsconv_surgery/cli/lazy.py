"""Fast start-up: ``--help``, ``--version`` and argument errors answer before torch is imported.

Commands are listed by name in a table (``"convert": ("bsconv_surgery.cli.convert:convert", short
help)``); ``LazyGroup`` imports a command's module only when the command runs or its own help is
asked, and lists the table's short help without importing anything. A command module names the
library modules it uses with ``lazy_module`` at its top; they (and torch) are imported when the
command first uses one of their names.

tests/test_architecture.py reads the module names in these strings as imports: the layers hold.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List, Optional, Tuple

import click

from ..core.errors import close_matches

__all__ = ["LazyGroup", "LazyModule", "lazy_module", "load"]


def load(target: str) -> Any:
    """``"package.module:attr"`` -> the attribute (the module imported on the way)."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


class LazyModule:
    """A module that is imported the first time one of its names is read."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy_module(name: str) -> LazyModule:
    """``surgery = lazy_module("bsconv_surgery.surgery")``: ``surgery.convert`` imports it on first use."""
    return LazyModule(name)


class LazyGroup(click.Group):
    """A click group whose commands are ``name -> (module:attr, short help)`` in ``lazy_commands``."""

    def __init__(self, *args: Any, lazy_commands: Optional[Dict[str, Tuple[str, str]]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> List[str]:
        return sorted({*self.commands, *self.lazy_commands})

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        if name in self.commands:
            return self.commands[name]
        if name not in self.lazy_commands:
            return None
        target, short_help = self.lazy_commands[name]
        command = load(target)
        if not isinstance(command, click.Command):
            raise TypeError(f"'{target}' is a {type(command).__name__}, not a click command")
        command.short_help = command.short_help or short_help
        self.commands[name] = command
        return command

    def resolve_command(self, ctx: click.Context, args: List[str]):
        name = args[0] if args else ""
        if not name.startswith("-") and not ctx.resilient_parsing and self.get_command(ctx, name) is None:
            close = close_matches(name, self.list_commands(ctx))
            ctx.fail(f"No such command '{name}'." + (f" Did you mean {' or '.join(map(repr, close))}?" if close else ""))
        return super().resolve_command(ctx, args)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The table's names and short help, no command module imported."""
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy_commands:
                rows.append((name, self.lazy_commands[name][1]))
            elif not self.commands[name].hidden:
                rows.append((name, self.commands[name].get_short_help_str(formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)
