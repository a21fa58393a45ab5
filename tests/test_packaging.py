"""The wheel: built from the project, it carries the bundled recipes, the LICENSE and the
dependencies; installed (not editable) into a fresh virtual environment, it trains a bundled
recipe from another folder. About 20-30 s: a wheel build, an install and one short epoch."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "bsconv_surgery_launcher.py", "bsconv_surgery")


def run(*args, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from a copy of the sources (an in-tree build would reuse a stale build/)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    run(sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "--no-index", "-q",
        "-w", tmp / "dist")
    (found,) = (tmp / "dist").glob("bsconv_surgery-*.whl")
    return found


def test_the_wheel_carries_the_recipes_the_license_and_the_dependencies(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    recipes = sorted(p.name for p in (ROOT / "bsconv_surgery" / "recipes").glob("*.yaml"))
    assert "digits-demo.yaml" in recipes
    assert {f"bsconv_surgery/recipes/{r}" for r in recipes} <= names
    assert "bsconv_surgery_launcher.py" in names
    (dist_info,) = {n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info")}
    assert f"{dist_info}/licenses/LICENSE" in names
    metadata = zipfile.ZipFile(wheel).read(f"{dist_info}/METADATA").decode()
    assert "License-Expression: MIT" in metadata
    for requirement in ("onnx", "onnxruntime", "onnxscript", "torch", "timm"):
        assert any(line.startswith(f"Requires-Dist: {requirement}>") for line in metadata.splitlines()), requirement


def test_a_fresh_install_of_the_wheel_trains_a_bundled_recipe_from_another_folder(wheel, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # this checkout is not on the path
    env.update(OMP_NUM_THREADS="1")
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel, env=env)
    # the dependencies come from this interpreter's site-packages (a path only: its .pth files, such
    # as an editable install of this project, are not read)
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    shared = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "dependencies.pth").write_text("\n".join(sorted(shared)) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    where = run(python, "-c", "import bsconv_surgery, bsconv_surgery.training.recipe as r; "
                "print(bsconv_surgery.__file__); print(r.resolve_recipe_path('digits-demo'))", env=env, cwd=elsewhere)
    package, recipe = where.stdout.split()
    assert Path(package).is_relative_to(site) and Path(recipe).is_relative_to(site), where.stdout

    proc = run(venv / "bin" / "bsconv-surgery", "train", "digits-demo", "--model", "timm:test_resnet", "--device", "cpu",
               "--set", "epochs=1", "--set", "max_steps_per_epoch=2", "--out", "run", "--json", env=env, cwd=elsewhere)
    summary = json.loads(proc.stdout)
    assert summary["epochs_done"] == 1 and summary["data"].startswith("digits")
    assert (elsewhere / "run" / "best.pt").is_file() and "name: digits" in (elsewhere / "run" / "recipe.yaml").read_text()
