"""Tables at 80 columns (a pipe, a CI log, a narrow terminal) never cut a name or a number: names
fold onto more lines, numbers stay whole. Every table the commands print for a model with long
qualified names is captured and rendered at 80 columns, and every word of every cell is found in
the text, whole or folded onto consecutive lines."""

import io
import re
from collections import OrderedDict
from typing import Dict, List, Tuple

import pytest
import timm
import torch
from rich.console import Console
from rich.table import Table
from timm.models import register_model
from torch import nn

from bsconv_surgery.cli.console import console

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "timm:toy_long_qualified_names"


class _DepthwiseSeparableBlockWithADescriptiveName(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.depthwise_convolution_three_by_three = nn.Conv2d(channels, channels, 3, padding=1, groups=channels,
                                                              bias=False)
        self.depthwise_batchnorm = nn.BatchNorm2d(channels)
        self.pointwise_convolution_one_by_one = nn.Conv2d(channels, 2 * channels, 1, bias=False)
        self.pointwise_batchnorm = nn.BatchNorm2d(2 * channels)

    def forward(self, x):
        x = torch.relu(self.depthwise_batchnorm(self.depthwise_convolution_three_by_three(x)))
        return torch.relu(self.pointwise_batchnorm(self.pointwise_convolution_one_by_one(x)))


class _GateThatFXCannotTrace(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.gated_convolution_inside_a_branch_with_data_dependent_control_flow = nn.Conv2d(channels, channels, 3,
                                                                                              padding=1)

    def forward(self, x):
        if x.sum() > 0:  # the whole model traces in parts: the "Traced parts and fallbacks" table
            return self.gated_convolution_inside_a_branch_with_data_dependent_control_flow(x)
        return x


class LongQualifiedNames(nn.Module):
    """Standard convs, a depthwise-separable pair and an untraceable branch under qualified names
    longer than a line."""

    def __init__(self, num_classes=10, **_):
        super().__init__()
        stage = lambda c_in, c_out: nn.Sequential(OrderedDict(  # noqa: E731
            standard_convolution_three_by_three_with_a_rather_long_name=nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            batchnorm_after_the_standard_convolution=nn.BatchNorm2d(c_out),
            activation=nn.ReLU(),
        ))
        self.feature_extractor_backbone_with_a_descriptive_name = nn.Sequential(OrderedDict(
            first_stage_of_the_backbone_at_full_resolution=stage(3, 32),
            second_stage_of_the_backbone_at_full_resolution=stage(32, 48),
            third_stage_separable=_DepthwiseSeparableBlockWithADescriptiveName(48),
        ))
        self.data_dependent_gate_branch_that_fx_cannot_trace = _GateThatFXCannotTrace(96)
        self.classifier_head_projection_layer = nn.Linear(96, num_classes)
        self.pretrained_cfg = {"input_size": (3, 16, 16), "num_classes": num_classes}

    def forward(self, x):
        x = self.data_dependent_gate_branch_that_fx_cannot_trace(self.feature_extractor_backbone_with_a_descriptive_name(x))
        return self.classifier_head_projection_layer(x.mean((2, 3)))


@pytest.fixture(scope="module", autouse=True)
def long_names_model():
    if not timm.is_model(MODEL.split(":")[1]):
        def toy_long_qualified_names(pretrained=False, **kwargs):
            return LongQualifiedNames(**kwargs)
        toy_long_qualified_names.__module__ = __name__
        register_model(toy_long_qualified_names)


@pytest.fixture
def tables(monkeypatch) -> List[Table]:
    """Every rich Table a command prints (at 80 columns, as in a pipe)."""
    printed: List[Table] = []
    for side in (console.out, console.err):
        monkeypatch.setattr(side, "width", 80)
        original = side.print

        def capture(*objects, _original=original, **kwargs):
            printed.extend(o for o in objects if isinstance(o, Table))
            return _original(*objects, **kwargs)

        monkeypatch.setattr(side, "print", capture)
    return printed


def render(table: Table, width: int = 80) -> str:
    out = Console(file=io.StringIO(), width=width, markup=False, emoji=False, color_system=None)
    out.print(table)
    return out.file.getvalue()


def tokens(text: str) -> Dict[Tuple[int, int], str]:
    """(line, column) -> each run of non-space characters (box lines count as spaces)."""
    found = {}
    for row, line in enumerate(text.splitlines()):
        line = re.sub(r"[│┃║|]", " ", line)
        for match in re.finditer(r"\S+", line):
            found[(row, match.start())] = match.group()
    return found


def found_whole_or_folded(word: str, grid: Dict[Tuple[int, int], str]) -> bool:
    """``word`` is a token, or starts one and continues in tokens at the same column of the next lines."""
    for (row, col), token in grid.items():
        if not word.startswith(token):
            continue
        rest, below = word[len(token):], row + 1
        while rest and grid.get((below, col)) and rest.startswith(grid[(below, col)]):
            rest, below = rest[len(grid[(below, col)]):], below + 1
        if not rest:
            return True
    return False


def cell_words(table: Table) -> List[str]:
    words = []
    for column in table.columns:
        for cell in column._cells:
            words += str(getattr(cell, "plain", cell)).split()
    return words


def check_at_80_columns(table: Table) -> None:
    text = render(table)
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80
    grid = tokens(text)
    missing = [w for w in cell_words(table) if not found_whole_or_folded(w, grid)]
    assert not missing, f"cut at 80 columns: {missing}\n{text}"


COMMANDS = {
    "convert": ["convert", MODEL, "--target-macs", "0.7", "--calib", "random", "--calib-batches", "1"],
    "convert (whole model)": ["convert", MODEL, "--variant", "s"],
    "compare": ["compare", MODEL, "--variant", "orig,u,s,s:p=1/6"],
    "sensitivity": ["sensitivity", MODEL, "--calib", "random", "--calib-batches", "1"],
    "analyze": ["analyze", MODEL],
    "benchmark": ["benchmark", MODEL, "--prep", "fused", "--warmup", "1", "--runs", "3"],
    "models": ["models", "toy_long_qualified*"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_table_keeps_every_name_and_number_at_80_columns(cli, tables, name):
    result = cli(*COMMANDS[name])
    assert result.exit_code == 0, result.output
    assert tables, "the command printed no table"
    assert "…" not in result.output
    for table in tables:
        check_at_80_columns(table)
    names = [w for t in tables for w in cell_words(t) if "standard_convolution_three_by_three" in w]
    assert names or name in ("analyze", "benchmark", "models", "compare"), "no site names in the tables"
    if name.startswith("convert"):
        titles = {str(t.title).split(" (")[0] for t in tables}
        assert {"Traced parts and fallbacks", "Converted sites"} <= titles, titles
    if name == "convert":
        assert {"Budget", "Skipped sites"} <= titles and any(t.startswith("Chosen sites") for t in titles), titles


def test_the_training_summary_keeps_a_long_run_folder_whole(cli, tables, tmp_path):
    out = tmp_path / ("a_run_folder_with_a_name_long_enough_to_need_more_than_one_line_of_a_narrow_terminal_" * 2)
    result = cli("train", "digits-demo", "--model", MODEL, "--set", "epochs=1", "--set", "max_steps_per_epoch=1",
                 "--set", "data.image_size=16", "--out", out)
    assert result.exit_code == 0, result.output
    (summary,) = tables
    check_at_80_columns(summary)
    assert str(out) in cell_words(summary)


def test_the_export_table_keeps_a_long_file_name_whole(cli, tables, tmp_path):
    folder = tmp_path / ("a_conversion_folder_with_a_name_long_enough_to_need_more_than_one_line_" * 2)
    converted = cli("convert", "timm:test_resnet", "--input-size", "3,32,32", "--out", folder)
    assert converted.exit_code == 0, converted.output
    tables.clear()
    result = cli("export", folder, "--format", "pt2")
    assert result.exit_code == 0, result.output
    (table,) = tables
    check_at_80_columns(table)
    assert str(folder / "model.pt2") in cell_words(table)


def test_the_check_finds_a_cut_name():
    """The check has teeth: a table that cuts its names fails it."""
    table = Table()
    table.add_column("name", no_wrap=True)
    table.add_column("value", no_wrap=True)
    table.add_row("a" * 70 + ".conv1", "1.23M->4.56K")
    with pytest.raises(AssertionError, match="cut at 80 columns|…"):
        check_at_80_columns(table)
