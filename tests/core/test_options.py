"""``options.py`` and ``registry.py``: one selection rule and one message for unknown names."""

import pytest

from bsconv_surgery import SurgeryError
from bsconv_surgery.core.options import SurgeryOptions
from bsconv_surgery.core.registry import INITIALIZERS, VARIANTS, Registry


def test_include_and_exclude_on_one_or_several_names():
    options = SurgeryOptions.create("u", include=["layer4.*"], exclude=["*.conv2"])
    assert options.selects("layer4.0.conv1") and not options.selects("layer4.0.conv2")
    assert not options.selects("layer1.0.conv1")
    assert options.selects("layer1.x", "layer4.y")  # a site of several modules: any name may be included
    assert not options.selects("layer4.a", "layer4.b.conv2")  # ... and any name excludes it
    assert SurgeryOptions().selects("anything")


def test_kernel_selection():
    options = SurgeryOptions.create("u", kernel_sizes="3,1x7")
    assert options.selects_kernel((3, 3)) and options.selects_kernel([1, 7]) and not options.selects_kernel((5, 5))
    assert options.kernel_sizes_label == "1x7,3x3"
    assert SurgeryOptions().selects_kernel((9, 9))


def test_registries_name_what_is_valid():
    assert VARIANTS.names() == ["s", "u"] and "svd" in INITIALIZERS
    with pytest.raises(SurgeryError, match=r"Unknown variant 'x'\. Valid variants: s, u\."):
        VARIANTS.get("x")
    with pytest.raises(SurgeryError, match=r"Unknown --init .y.\. Valid inits: auto, default, svd\."):
        INITIALIZERS.get("y", "--init")
    table = Registry("colour")
    table.register("red", 1)
    assert table["red"] == 1 and list(table) == ["red"] and len(table) == 1


def test_options_json_round_trip():
    options = SurgeryOptions.create("s", kernel_sizes=[3, (1, 7)], p="1/6", with_bn=True, exclude="stem")
    assert SurgeryOptions.from_json(options.to_json()) == options
    assert options.to_json()["p"] == "1/6" and options.to_json()["exclude"] == ["stem"]
