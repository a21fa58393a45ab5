"""Start-up: ``--help``, ``--version``, a command's own ``--help`` and argument errors answer
without importing torch, timm or torchvision; the command table, the facade's names and the
registries' built-in names agree with what they stand for. (The timing itself is
benchmarks/startup.py.)"""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

import bsconv_surgery
from bsconv_surgery.cli import COMMANDS, bsconv_surgery as group
from bsconv_surgery.core.registry import AUTO, BACKENDS, INITIALIZERS, PREPARATIONS, VARIANTS

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "timm", "torchvision")

FAST = [
    (["--help"], 0, "Usage:"),
    (["-h"], 0, "Commands:"),
    (["--version"], 0, "version 0.1.0"),
    *[([name, "--help"], 0, "Usage: bsconv-surgery " + name) for name in COMMANDS],
    (["convert"], 2, "Missing argument 'MODEL'"),
    (["convert", "resnet18", "--variant", "x"], 2, "Invalid value for '--variant'"),
    (["convert", "resnet18", "--init", "magic"], 1, "Unknown --init 'magic'"),
    (["benchmark", "resnet18", "--prep", "nope"], 2, "Invalid value for '--prep'"),
    (["benchmark", "resnet18", "--backend", "nope"], 2, "Invalid value for '--backend'"),
    (["benchmark", "resnet18", "--threads", "100000"], 2, "--threads 100000 is not a thread count for this machine"),
    (["models", "--no-such-option"], 2, "No such option"),
    (["export"], 2, "Missing argument 'RUN_OR_DIR'"),
    (["export", "runs/x", "--format", "tflite"], 2, "Invalid value for '--format'"),
    (["conver"], 2, "Did you mean 'convert'?"),
]


def heavy_imports(importtime: str) -> set:
    """The top-level modules among HEAVY that ``python -X importtime`` reports as imported."""
    names = {line.rsplit("|", 1)[-1].strip() for line in importtime.splitlines() if line.startswith("import time:")}
    return {name for name in names if name.split(".")[0] in HEAVY}


@pytest.mark.parametrize("args,code,text", FAST, ids=[" ".join(a) for a, _, _ in FAST])
def test_help_version_and_argument_errors_import_no_torch(args, code, text):
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "bsconv_surgery", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == code, output
    assert text in output
    assert "Traceback" not in output
    assert heavy_imports(proc.stderr) == set()


def test_the_import_check_sees_torch_when_it_is_imported():
    """The check above has teeth: a command that runs imports torch, and it is seen."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "bsconv_surgery", "models", "resnet1*",
                           "--names-only", "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {"torch", "timm"} <= {name.split(".")[0] for name in heavy_imports(proc.stderr)}


def test_the_group_help_lists_every_command_with_its_short_help(cli):
    result = cli("--help")
    assert result.exit_code == 0
    for name, (_, short_help) in COMMANDS.items():
        assert name in result.output and short_help[:40] in " ".join(result.output.split())


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_entry_of_the_command_table_is_that_command(name):
    command = group.get_command(click.Context(group), name)
    assert isinstance(command, click.Command) and command.name == name
    assert command.short_help == COMMANDS[name][1]  # the table is the one place of the short help


def test_the_facade_lists_and_resolves_every_public_name():
    assert "convert" in dir(bsconv_surgery) and set(bsconv_surgery.__all__) <= set(dir(bsconv_surgery))
    for name in bsconv_surgery.__all__:
        value = getattr(bsconv_surgery, name)
        assert getattr(value, "__name__", name) == name, name  # the object itself, not its module
    from bsconv_surgery import convert, distill  # the from-import form too
    assert callable(convert) and callable(distill)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        bsconv_surgery.no_such_name


def test_importing_the_package_and_the_cli_imports_no_torch():
    code = ("import sys, bsconv_surgery, bsconv_surgery.cli, bsconv_surgery.core.options; "
            "bsconv_surgery.core.options.SurgeryOptions.create('s', init='svd'); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_registries_built_in_names_are_the_registered_ones():
    """The names that --help, the choices and option checks use without torch are exactly what the
    modules that fill the registries register."""
    importlib.import_module("bsconv_surgery.passes")
    importlib.import_module("bsconv_surgery.inference.preps")
    for registry in (VARIANTS, INITIALIZERS, PREPARATIONS):
        assert sorted(registry.builtin) == sorted(registry._items), registry.what
    assert AUTO not in PREPARATIONS and importlib.import_module("bsconv_surgery.inference.benchmark").BACKENDS == BACKENDS


def test_a_variant_runs_whichever_module_was_imported_first():
    """sensitivity (which surgery imports) finds the variants registered without surgery."""
    code = ("from bsconv_surgery.recovery.sensitivity import measure_sensitivity\n"
            "from bsconv_surgery.core.registry import VARIANTS, INITIALIZERS\n"
            "print(sorted(VARIANTS._items), sorted(INITIALIZERS._items))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "['s', 'u'] ['auto', 'default', 'svd']"
