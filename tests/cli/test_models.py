"""``bsconv-surgery models``: one JSON object, and a clear message when nothing matches."""

import json


def test_models_command_json_and_errors(cli):
    result = cli("models", "tv:resnet1?", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["matches"] == 1 and data["models"][0]["u"]["sites"] == {"conv->bsconv_u": 17}
    result = cli("models", "no_such_model*")
    assert result.exit_code == 1 and "No timm or torchvision model matches" in result.output
    assert "Traceback" not in result.output


def test_names_only_lists_every_match_and_limit_still_applies_when_given(cli):
    import timm

    every = sorted(set(timm.list_models("resnet*")))
    assert len(every) > 20  # more than the survey's default
    result = cli("models", "timm:resnet*", "--names-only", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["matches"] == len(data["models"]) == len(every)
    assert "Surveying" not in result.stderr and "Listing" not in result.stderr
    result = cli("models", "timm:resnet*", "--names-only", "--limit", "5", "--json")
    assert len(json.loads(result.stdout)["models"]) == 5
    assert f"Listing the first 5 of {len(every)} matches" in result.stderr
