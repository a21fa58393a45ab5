"""The documentation: the README stays a front door whose every code block runs, the Sphinx site
in ``docs/`` builds with warnings as errors, and every ``bsconv-surgery`` command shown anywhere in
the README or ``docs/`` is parsed by the real command line (a renamed or unknown option fails).

How the README's commands run: each bash block in a fresh temporary folder, in process
(``CliRunner``), offline (the ``zoo_caches`` fixture), with the files they name made first:
``my.pt`` (a 10-class timm ResNet-18 state dict), ``photos/`` (20 small PNGs) and, for each model
shown with ``--pretrained``, generated weights in a temporary Hugging Face cache. Commands are run
as printed, except that ``FAST`` appends documented options that make them short: a 64x64 input
and one calibration batch where a command measures on calibration data, one epoch of two steps of
four images for ``train``. Lines that install or test (``pip``, ``python -m venv``,
``python -m pytest``) are checked against ``pyproject.toml`` and ``.ci/run`` instead (CI runs them),
and the ``sphinx-build`` line is the build ``test_docs_site_builds_without_warnings`` runs.
"""

from __future__ import annotations

import ast
import functools
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import click
import numpy as np
import pytest
import timm
import torch
from click.testing import CliRunner
from PIL import Image

import bsconv_surgery as bs
from bsconv_surgery.cli import bsconv_surgery

from .helpers import fill_hf_cache, random_state
from .own_models import MyNet

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 250

#: Models the README shows with ``--pretrained``, and the hub repository timm reads their default
#: weights from: the test fills a temporary cache with generated weights for each.
PRETRAINED_HUB_IDS = {"resnet18": "timm/resnet18.a1_in1k"}

_CALIBRATED = ["--input-size", "3,64,64", "--calib-batches", "1"]
_SHORT_TRAINING = ["--set", "epochs=1", "--set", "max_steps_per_epoch=2", "--set", "data.batch_size=4",
                   "--set", "data.image_size=64", "--set", "data.workers=0"]

#: Documented options appended to a README command to keep it short, keyed by a test on its args.
FAST = [
    (lambda args: args[0] == "sensitivity", _CALIBRATED),
    (lambda args: args[0] == "convert" and "--calib" in args, _CALIBRATED),
    (lambda args: args[0] == "train", _SHORT_TRAINING),
    (lambda args: args[0] == "compress", ["--input-size", "3,64,64", "--steps", "2", "--holdout", "8", "--no-speed"]),
]

#: Options of other programs that the pages name (pip, torchrun, pytest, sphinx-build).
FOREIGN_OPTIONS = {"--no-deps", "--nproc-per-node", "--keep-going", "--update"}



# -- reading Markdown ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, text and the line of its opening fence."""

    path: Path
    lang: str
    text: str
    line: int

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> List[Block]:
    """The fenced code blocks of a Markdown file (indented ones in list items too)."""
    blocks, lines, i = [], path.read_text().splitlines(), 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,})(.*)$", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, lang = opening.group(1), opening.group(2), opening.group(3).strip()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^\s*{fence}\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        blocks.append(Block(path, lang, "\n".join(body), i + 1))
        i = j + 1
    return blocks


def inline_code(path: Path) -> List[str]:
    """The inline code spans of a Markdown file outside its fenced blocks, line breaks as spaces."""
    text = path.read_text()
    text = re.sub(r"^(\s*)(`{3,}).*?^\s*\2\s*$", "", text, flags=re.M | re.S)
    return [" ".join(span.split()) for span in re.findall(r"(?<!`)`([^`]+)`(?!`)", text)]


def shell_commands(script: str) -> Iterator[List[str]]:
    """The simple commands of a shell script: continuations joined, comments dropped, split at
    ``&&``, ``;`` and ``|``."""
    for line in script.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        command: List[str] = []
        for token in lexer:
            if token in {"&&", ";", "|", "||", "&"}:
                if command:
                    yield command
                command = []
            else:
                command.append(token)
        if command:
            yield command


def cli_args(command: List[str]) -> Optional[List[str]]:
    """The arguments given to ``bsconv-surgery`` by ``command`` (also through ``python -m
    bsconv_surgery`` or ``torchrun ... -m bsconv_surgery``), else None."""
    if Path(command[0]).name == "bsconv-surgery":
        return command[1:]
    for i in range(len(command) - 1):
        if command[i] == "-m" and command[i + 1] == "bsconv_surgery":
            return command[i + 2:]
    return None


def doc_pages() -> List[Path]:
    """README.md, every Markdown page under docs/ and the files those pages include."""
    pages = [README, *sorted(DOCS.rglob("*.md"))]
    pages = [p for p in pages if "_build" not in p.parts]
    for page in list(pages):
        for block in code_blocks(page):
            if block.lang.startswith("{include}"):
                pages.append((page.parent / block.lang.split(None, 1)[1]).resolve())
    return pages


def shown_commands() -> List[tuple]:
    """Every ``bsconv-surgery`` command shown in the pages: ``(where, args)``, from code blocks
    (inputs and printed outputs alike) and from inline code that starts with ``bsconv-surgery``."""
    found = []
    for page in doc_pages():
        for block in code_blocks(page):
            if block.lang.startswith("{") or block.lang == "python":
                continue
            script = block.text
            if block.lang != "bash":  # printed output: only the lines that are commands
                script = "\n".join(line for line in script.splitlines()
                                   if line.strip().startswith("bsconv-surgery ") or "-m bsconv_surgery " in line)
            for command in shell_commands(script):
                args = cli_args(command)
                if args is not None:
                    found.append((block.where, args))
        for span in inline_code(page):
            if span.startswith("bsconv-surgery "):
                found.append((str(page.relative_to(ROOT)), shlex.split(span)[1:]))
    return found


# -- the command line ------------------------------------------------------------------------------

def parse_with_the_cli(args: List[str]) -> None:
    """Parse ``args`` as the command line would, without running the command: an unknown command
    or option, a missing argument or a bad value raises click's error."""
    root = click.Context(bsconv_surgery, info_name="bsconv-surgery")
    assert args, "bsconv-surgery without a command"
    if args[0].startswith("-"):  # the group's own options: --help, --version
        try:
            with bsconv_surgery.make_context("bsconv-surgery", list(args)):
                pass
        except click.exceptions.Exit:
            pass
        return
    command = bsconv_surgery.get_command(root, args[0])
    assert command is not None, f"no command {args[0]!r}"
    try:
        with command.make_context(args[0], list(args[1:]), parent=root):
            pass
    except click.exceptions.Exit:  # --help
        pass


def cli_option_names() -> set:
    names = set()
    root = click.Context(bsconv_surgery, info_name="bsconv-surgery")
    commands = [bsconv_surgery.get_command(root, name) for name in bsconv_surgery.list_commands(root)]
    for command in [bsconv_surgery, *commands]:
        for param in command.get_params(root):
            names.update(o.split("/")[0] for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
    return names


def run_in_process(args: List[str]) -> str:
    result = CliRunner().invoke(bsconv_surgery, args)
    assert result.exit_code == 0, f"bsconv-surgery {shlex.join(args)} failed:\n{result.output}"
    return result.output


def shortened(args: List[str]) -> List[str]:
    for applies, extra in FAST:
        if applies(args):
            return [*args, *extra]
    return args


# -- the README ------------------------------------------------------------------------------------

README_BLOCKS = code_blocks(README)


def _readme_blocks(lang: str) -> list:
    return [pytest.param(b, id=_block_id(b)) for b in README_BLOCKS if b.lang == lang]


def _block_id(block: Block) -> str:
    """``line26-python3`` , ``line85-sensitivity``: where the block starts and what it runs first."""
    first = next(shell_commands(block.text), ["?"]) if block.lang == "bash" else [block.lang]
    return f"line{block.line}-{(cli_args(first) or first)[0]}"


def test_readme_is_a_front_door():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it <= {README_MAX_LINES}"
    python = [b for b in README_BLOCKS if b.lang == "python"]
    assert 1 <= len(python) <= 2, "the README shows the Python quick start and at most one more Python block"
    assert not [b for b in README_BLOCKS if b.lang not in {"bash", "python", "text"}], "unknown block language"


def test_readme_links_resolve():
    text = README.read_text()
    anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        if path:
            assert (ROOT / path).exists(), f"README links to {path}, which does not exist"
        else:
            assert anchor in anchors, f"README links to #{anchor}, which is no heading of it"


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.fixture
def readme_folder(tmp_path, monkeypatch, zoo_caches):
    """A temporary working folder holding what the README's commands read, offline."""
    hf_home, _ = zoo_caches
    for name, hub_id in PRETRAINED_HUB_IDS.items():
        fill_hf_cache(hf_home, hub_id, _weights(name))
    torch.save(_weights("resnet18", num_classes=10), tmp_path / "my.pt")
    (tmp_path / "mynet.py").write_text(MYNET)  # the README's own model, and weights for it
    torch.save(_own_weights(tmp_path / "mynet.py"), tmp_path / "mynet.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(20):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(photos / f"{i:02d}.png")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)


#: The README's own model: the test module that defines ``MyNet``, copied as ``mynet.py``.
MYNET = (ROOT / "tests" / "own_models.py").read_text()


def _own_weights(path: Path) -> dict:
    """Weights for the README's ``MyNet(width=32)``, as a user's training run would leave them."""
    return random_state(MyNet(width=32))


@functools.lru_cache(maxsize=None)
def _weights(name: str, **kwargs) -> dict:
    """Generated weights for the timm model ``name`` (made once per test session)."""
    return random_state(timm.create_model(name, **kwargs))


def _printed_after(block: Block) -> Optional[Block]:
    """The ``text`` block right after ``block`` in the README: what its last command prints."""
    index = README_BLOCKS.index(block)
    following = README_BLOCKS[index + 1] if index + 1 < len(README_BLOCKS) else None
    return following if following is not None and following.lang == "text" else None


@pytest.mark.parametrize("block", _readme_blocks("bash"))
def test_readme_bash_block_runs(block, readme_folder):
    ci = (ROOT / ".ci" / "run").read_text()
    extras = pyproject_extras()
    output = None
    for command in shell_commands(block.text):
        args = cli_args(command)
        if args is not None:
            if "--pretrained" in args:
                assert args[1] in PRETRAINED_HUB_IDS, f"{block.where}: add {args[1]} to PRETRAINED_HUB_IDS"
            output = run_in_process(shortened(args))
        elif Path(command[0]).name == "pip":
            _check_pip(command, extras, block)
        elif command[:3] == ["python3", "-m", "venv"]:
            assert shlex.join(command) in ci, f"{block.where}: .ci/run makes its venv with {shlex.join(command)!r}"
        elif command[1:] == ["-m", "pytest", "-q"] and command[0].endswith("python"):
            assert ci.rstrip().endswith("python -m pytest -q"), f"{block.where}: .ci/run must run the README's test command"
        elif command[0] == "sphinx-build":
            pass  # the build test_docs_site_builds_without_warnings runs
        else:
            pytest.fail(f"{block.where}: tests/test_docs.py does not know how to run {shlex.join(command)!r}")
    printed = _printed_after(block)
    if printed is not None:
        assert output is not None, f"{printed.where}: an output block after a block without a bsconv-surgery command"
        lines = [" ".join(line.split()) for line in output.splitlines()]
        for line in printed.text.splitlines():
            if line.strip():
                assert " ".join(line.split()) in lines, f"{printed.where}: {line.strip()!r} is not what the command printed"


def pyproject_extras() -> set:
    """The names of the extras in pyproject.toml's ``[project.optional-dependencies]``."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, flags=re.M))


def _check_pip(command: List[str], extras: set, block: Block) -> None:
    args = command[command.index("install") + 1:]
    assert args[:2] == ["-c", "constraints.txt"], f"{block.where}: install with -c constraints.txt (the torch pins)"
    assert args[2] == "-e", f"{block.where}: an editable install of the checkout"
    wanted = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", args[3])
    assert wanted, f"{block.where}: unexpected install target {args[3]!r}"
    unknown = set((wanted.group(1) or "").split(",")) - extras - {""}
    assert not unknown, f"{block.where}: no such extra in pyproject.toml: {sorted(unknown)}"


#: The README's Python quick start is written for the staged ``convert`` API (``load_model``,
#: ``convert(model, example_inputs=...)``); until it lands the block is expected to fail.
_NEEDS_NEW_API = pytest.mark.xfail(not hasattr(bs, "load_model"), strict=False,
                                   reason="needs the staged convert API (issue 21 items 1-2)")


@pytest.mark.parametrize("block", [pytest.param(b, id=f"line{b.line}", marks=_NEEDS_NEW_API)
                                   for b in README_BLOCKS if b.lang == "python"])
def test_readme_python_block_runs(block, readme_folder):
    torch.manual_seed(0)
    exec(compile(block.text, block.where, "exec"), {"__name__": "readme"})


# -- the site --------------------------------------------------------------------------------------

def test_docs_site_builds_without_warnings(tmp_path):
    """The README's build command (``-W``: warnings are errors), into a temporary folder; then the
    generated references cover every public name and every command."""
    for module in ("sphinx", "myst_parser", "sphinx_click"):
        pytest.importorskip(module, reason="the 'docs' extra is not installed (CI installs it)")
    build = [c for b in README_BLOCKS for c in shell_commands(b.text) if c[0] == "sphinx-build"]
    assert len(build) == 1, "the README shows one sphinx-build command"
    args = build[0][1:]
    assert "-W" in args and args[-2] == "docs", "the README's build treats warnings as errors and builds docs/"
    out = tmp_path / "html"
    done = subprocess.run([sys.executable, "-m", "sphinx", *args[:-1], str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    api = (out / "api.html").read_text()
    for name in bs.__all__:
        assert f'id="bsconv_surgery.{name}"' in api, f"{name} (in __all__) is missing from the Python reference"
    cli = " ".join(re.sub(r"<[^>]+>", "", (out / "cli.html").read_text()).split())
    for name in bsconv_surgery.commands:
        assert f"bsconv-surgery {name} [OPTIONS]" in cli, f"the command {name} is missing from the CLI reference"


def test_every_page_is_in_the_site():
    """Every page under docs/ is reachable from a toctree (Sphinx warns otherwise; checked here too
    so that a missing docs extra does not hide it)."""
    pages = {p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.rglob("*.md") if "_build" not in p.parts}
    linked = {"index"}
    for page in DOCS.rglob("*.md"):
        for block in code_blocks(page):
            if block.lang == "{toctree}":
                base = page.parent.relative_to(DOCS)
                linked |= {(base / entry).as_posix() for entry in block.text.splitlines()
                           if entry.strip() and not entry.startswith(":")}
    assert pages - linked == set()


# -- the docs check: every command shown parses ----------------------------------------------------

SHOWN = shown_commands()


def test_the_pages_show_commands():
    assert len(SHOWN) >= 40 and {args[0] for _, args in SHOWN} >= set(bsconv_surgery.commands)


@pytest.mark.parametrize("where, args", [pytest.param(w, a, id=f"{w}:{shlex.join(a)[:60]}") for w, a in SHOWN])
def test_shown_command_parses(where, args):
    try:
        parse_with_the_cli(args)
    except click.ClickException as exc:
        pytest.fail(f"{where}: bsconv-surgery {shlex.join(args)}: {exc.format_message()}")


def test_every_option_named_in_the_pages_exists():
    """Inline mentions such as ``--target-macs 0.5`` name options some command has (in the pages
    written by hand: the included benchmark tables name their scripts' options)."""
    known = cli_option_names() | FOREIGN_OPTIONS
    for page in doc_pages():
        if DOCS not in page.parents and page != README:
            continue
        named = {o for span in inline_code(page) for o in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span)}
        assert named <= known, f"{page.relative_to(ROOT)} names options no command has: {sorted(named - known)}"


def test_python_in_the_pages_compiles():
    for page in doc_pages():
        for block in code_blocks(page):
            if block.lang == "python":
                ast.parse(block.text, block.where)


def test_install_lines_in_the_pages_use_the_pins_and_real_extras():
    extras = pyproject_extras()
    for page in doc_pages():
        for block in code_blocks(page):
            if block.lang == "bash":
                for command in shell_commands(block.text):
                    if Path(command[0]).name == "pip" and "-e" in command:
                        _check_pip(command, extras, block)
        for span in inline_code(page):
            if span.startswith("pip install") and " -e " in span:
                _check_pip(shlex.split(span), extras, Block(page, "inline", span, 0))
