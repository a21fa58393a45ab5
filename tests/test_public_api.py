"""``bsconv_surgery.__all__`` is the public API and nothing internal; every public class and
function documents itself with a runnable example, and the examples pass."""

from __future__ import annotations

import doctest
import importlib
import inspect
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import pytest
import torch

import bsconv_surgery as bs
from bsconv_surgery.layers import bsconv as bsconv_layers
from bsconv_surgery.passes import SurgeryPass

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
#: Examples with a global effect: run in a fresh interpreter (register_variant registers a variant).
ISOLATED = {"register_variant"}
#: Examples that need an optional extra: skipped without it.
EXTRAS = {"export_onnx": ("onnx", "onnxruntime"), "export_converted": ("onnx", "onnxruntime")}
#: Names the package uses internally (passes, 1-D/3-D layer forms, helpers), by the module that defines them.
INTERNAL = {
    "bsconv_surgery.passes": ("ConvToBSConv", "DSCToBSConvU", "BottleneckToBSConvS", "SurgeryPass", "FoldBatchNorm",
                              "lower_bsconv"),
    "bsconv_surgery.layers": ("BSConvU1d", "BSConvU3d", "BSConvS1d", "BSConvS3d", "SubspaceProjection1d",
                              "SubspaceProjection3d"),
    "bsconv_surgery.io.saving": ("save_converted", "read_surgery_json"),
    "bsconv_surgery.data.calibration": ("iter_batches",),
    "bsconv_surgery.core.errors": ("arg",),
    "bsconv_surgery.core.registry": ("Registry",),
}


def documented(obj) -> bool:
    """Classes and functions carry their own docstring; registries and constants are documented where defined."""
    return inspect.isclass(obj) or inspect.isroutine(obj)


def run_doctests(name: str) -> Tuple[int, int, str]:
    """``(failed, attempted, report)`` of the doctests of ``bs.<name>`` and its methods."""
    report = []
    runner = doctest.DocTestRunner(optionflags=OPTIONS)
    for test in doctest.DocTestFinder().find(getattr(bs, name), name):
        runner.run(test, out=report.append)
    return runner.failures, runner.tries, "".join(report)


def test_all_lists_each_name_once():
    assert len(bs.__all__) == len(set(bs.__all__))


@pytest.mark.parametrize("name", bs.__all__)
def test_public_name_resolves_and_documents_itself(name):
    assert not name.startswith("_")
    obj = getattr(bs, name)
    module = getattr(obj, "__module__", None) or type(obj).__module__
    assert module.startswith("bsconv_surgery."), f"{name} comes from {module}, not from this package"
    if documented(obj):
        assert ">>>" in (inspect.getdoc(obj) or ""), f"{name}'s docstring has no runnable example"


@pytest.mark.parametrize("name", [n for n in bs.__all__ if documented(getattr(bs, n)) and n not in ISOLATED])
def test_doctests_pass(name):
    for extra in EXTRAS.get(name, ()):
        pytest.importorskip(extra)
    failed, attempted, report = run_doctests(name)
    assert attempted > 0
    assert failed == 0, report


@pytest.mark.parametrize("name", sorted(ISOLATED))
def test_doctests_with_global_effects_pass_in_a_fresh_interpreter(name):
    code = ("import sys; from tests.test_public_api import run_doctests; "
            f"failed, attempted, report = run_doctests({name!r}); print(report); "
            "sys.exit(1 if failed or not attempted else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "u-convs-only" not in bs.VARIANTS  # the example's variant stayed in the other interpreter


@pytest.mark.parametrize("module, name", [(m, n) for m, names in INTERNAL.items() for n in names])
def test_internal_names_are_not_exported(module, name):
    assert hasattr(importlib.import_module(module), name)  # a real name, so its absence below means something
    assert name not in bs.__all__


@pytest.mark.parametrize("name", bs.__all__)
def test_exported_classes_are_not_internal_kinds(name):
    obj = getattr(bs, name)
    if inspect.isclass(obj):
        assert not issubclass(obj, SurgeryPass), f"{name} is a pass: passes are internal"
        if issubclass(obj, torch.nn.Module):
            assert obj.__module__ == bsconv_layers.__name__, f"{name}: the public modules are the BSConv layers"
            two_d = getattr(obj, "dims", 2) == 2 and not issubclass(obj, (torch.nn.Conv1d, torch.nn.Conv3d))
            assert two_d, f"{name} is a 1-D/3-D layer form: only the 2-D layers are public"
