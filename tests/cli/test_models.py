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
