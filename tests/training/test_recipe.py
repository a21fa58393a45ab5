"""Recipes (schema, errors, overrides), learning-rate schedules and the digits data: no training here."""

import re

import pytest
import torch

from bsconv_surgery import SurgeryError
from bsconv_surgery.training.data import build_datasets, parse_data_name
from bsconv_surgery.training.recipe import RECIPES_DIR, load_recipe, recipe_from_dict
from bsconv_surgery.training.run import lr_factor


def test_every_bundled_recipe_loads_and_the_paper_protocols_match_the_notes():
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    assert names == ["digits-demo", "distill-label-free", "finetune-short", "paper-cifar", "paper-finegrained",
                     "paper-imagenet"]
    recipes = {name: load_recipe(name) for name in names}
    cifar, imagenet, fine = recipes["paper-cifar"], recipes["paper-imagenet"], recipes["paper-finegrained"]
    assert (cifar.epochs, cifar.optimizer.lr, cifar.optimizer.momentum, cifar.optimizer.weight_decay) == (200, 0.1, 0.9, 1e-4)
    assert (cifar.schedule.name, cifar.schedule.milestones, cifar.ortho_alpha) == ("multistep", [100, 150, 180], 0.01)
    assert (cifar.data.augment.crop_padding, cifar.data.augment.hflip) == (4, True)
    assert (imagenet.epochs, imagenet.schedule.milestones, imagenet.ortho_alpha) == (100, [30, 60, 90], 0.1)
    assert imagenet.data.augment.random_resized_crop and imagenet.data.augment.resize == 256
    assert (fine.epochs, fine.schedule.name, fine.ortho_alpha, fine.optimizer.lr) == (100, "linear", 0.1, 0.1)
    assert fine.data.augment.gamma and not fine.data.augment.color_jitter
    short = recipes["finetune-short"]
    assert short.schedule.name == "cosine" and short.schedule.warmup_epochs > 0 and short.label_smoothing > 0
    assert recipes["digits-demo"].data.name == "digits"
    free = recipes["distill-label-free"]  # the defaults measured in docs/results.md
    assert free.distill.enabled and free.distill.label_free and not free.distill.features
    assert (free.optimizer.name, free.optimizer.lr, free.optimizer.weight_decay, free.distill.temperature) == \
        ("adamw", 3e-3, 0.05, 4.0)


def test_a_recipe_is_found_by_path_or_by_bundled_name():
    assert load_recipe(RECIPES_DIR / "digits-demo.yaml") == load_recipe("digits-demo") == load_recipe("bsconv_surgery/recipes/digits-demo.yaml")


@pytest.mark.parametrize("data,message", [
    ({"epochz": 3}, "epochz: unknown key. Did you mean 'epochs'? Allowed keys here: amp,"),
    ({"data": {"augment": {"flip": True}}}, "data.augment.flip: unknown key. Did you mean 'hflip'?"),
    ({"optimizer": {"name": "adam"}}, "optimizer.name: Input should be 'sgd' or 'adamw' (got 'adam')"),
    ({"optimizer": {"lr": 0}}, "optimizer.lr: Input should be greater than 0 (got 0)"),
    ({"epochs": "many"}, "epochs: Input should be a valid integer"),
    ({"data": 3}, "data: expected a section"),
    ({"schedule": {"name": "multistep"}}, "multistep needs milestones"),
    ({"schedule": {"name": "multistep", "milestones": [5, 3]}, "epochs": 10}, "milestones must be increasing"),
    ({"schedule": {"name": "multistep", "milestones": [30]}, "epochs": 10}, "not before the last epoch"),
    ({"surgery": {"variant": "q"}}, "surgery: Unknown variant 'q'"),
    ({"surgery": {"p": "7"}}, "Bad p '7'"),
    ({"data": {"name": "mnist"}}, "data.name: Unknown dataset 'mnist'. Valid datasets: digits, cifar10, cifar100"),
    ({"data": {"augment": {"scale": [1.0, 0.5]}}}, "data.augment.scale: expected a range"),
    ([1, 2], "must be a mapping"),
])
def test_bad_recipes_name_the_key_and_what_is_allowed(data, message):
    with pytest.raises(SurgeryError) as info:
        recipe_from_dict(data)
    assert message in str(info.value)


def test_overrides_are_yaml_values_on_dotted_keys():
    recipe = load_recipe("digits-demo", ["optimizer.lr=0.05", "epochs=3", "surgery.variant=s", "surgery.p=1/6",
                                         "data.augment.gamma=[0.9, 1.1]"], {"model": "timm:test_resnet"})
    assert (recipe.optimizer.lr, recipe.epochs, recipe.model) == (0.05, 3, "timm:test_resnet")
    assert str(recipe.surgery.options().p) == "1/6"
    assert recipe.data.augment.gamma == (0.9, 1.1)
    assert load_recipe("digits-demo", ["surgery=null"]).surgery is None
    for bad, message in [("foo", "expected KEY=VALUE"), ("=3", "expected KEY=VALUE"), ("epochs.x=1", "'epochs' is a value"),
                         ("epochs=[1", "not valid YAML")]:
        with pytest.raises(SurgeryError, match="Bad --set") as info:
            load_recipe("digits-demo", [bad])
        assert message in str(info.value)


def _factors(name, epochs=4, steps=10, **schedule):
    recipe = recipe_from_dict({"epochs": epochs, "schedule": {"name": name, **schedule}})
    factor = lr_factor(recipe.schedule, epochs, steps, recipe.optimizer.lr)
    return [factor(step) for step in range(epochs * steps)]


def test_schedules_warmup_cosine_multistep_and_linear_to_zero():
    cosine = _factors("cosine", warmup_epochs=1)
    assert cosine[:3] == pytest.approx([0.1, 0.2, 0.3]) and cosine[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cosine[9:], cosine[10:])) and cosine[-1] < 0.01
    multistep = _factors("multistep", milestones=[2, 3])
    assert multistep[19] == 1.0 and multistep[20] == pytest.approx(0.1) and multistep[30] == pytest.approx(0.01)
    linear = _factors("linear")  # per epoch, to zero: 1, 3/4, 1/2, 1/4
    assert [linear[e * 10] for e in range(4)] == pytest.approx([1.0, 0.75, 0.5, 0.25]) and linear[9] == 1.0


def test_digits_are_resized_three_channel_and_split_the_same_way_every_time():
    recipe = load_recipe("digits-demo", ["data.image_size=12"])
    a, b = build_datasets(recipe.data), build_datasets(recipe.data)
    assert (len(a.train), len(a.val), a.num_classes) == (1437, 360, 10)
    image, label = a.val[0]
    assert image.shape == (3, 12, 12) and image.dtype == torch.float32 and isinstance(label, int)
    assert torch.equal(a.val.labels, b.val.labels) and torch.equal(a.val.images, b.val.images)
    assert torch.equal(a.val[5][0], b.val[5][0])  # evaluation has no randomness


def test_data_names():
    assert parse_data_name("digits") == ("digits", None)
    assert parse_data_name("imagefolder:/data/dogs")[1].as_posix() == "/data/dogs"
    for bad in ("mnist", "imagefolder:", "cifar10:x"):
        with pytest.raises(SurgeryError, match="Valid datasets"):
            parse_data_name(bad)


@pytest.mark.parametrize("overrides,keys", [
    (["optimizer.lr=.inf"], ["optimizer.lr: a finite number is needed (got inf)"]),
    (["schedule.min_lr=.nan", "ortho_alpha=-.inf"], ["ortho_alpha: a finite number is needed (got -inf)",
                                                      "schedule.min_lr: a finite number is needed (got nan)"]),
    (["data.augment.gamma=[0.8, .inf]"], ["data.augment.gamma.1: a finite number is needed (got inf)"]),
])
def test_non_finite_numbers_are_refused_with_their_keys(overrides, keys):
    with pytest.raises(SurgeryError) as info:
        load_recipe("digits-demo", overrides)
    lines = [line.strip("- ").rstrip(".") for line in str(info.value).splitlines()[1:]]
    assert sorted(lines) == sorted(keys)


def test_a_recipe_path_that_does_not_exist_is_an_error_not_the_bundled_recipe(tmp_path, monkeypatch):
    for text in ("/no/such/dir/digits-demo.yaml", "digits-demo.yaml", "./digits-demo", "recipes/digits-demo.yml"):
        monkeypatch.chdir(tmp_path)  # no recipes/ folder here
        with pytest.raises(SurgeryError, match=f"Recipe file '{re.escape(text)}' does not exist. A bundled recipe "
                                               "is called 'digits-demo': pass just that name to use it."):
            load_recipe(text)
    assert load_recipe("digits-demo").name == "digits-demo"  # a bare name: the bundled one
    (tmp_path / "mine.yaml").write_text("epochs: 3\n")
    assert load_recipe("mine.yaml").epochs == 3  # a file that exists
