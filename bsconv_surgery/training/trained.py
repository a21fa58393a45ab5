"""The model a ``train`` run folder holds: ``load_trained(run)`` rebuilds it as the run built it
and loads the weights of ``best.pt`` (or ``last.pt``).

The path is the one a resumed run takes: the recipe saved in the checkpoint (validated), the
student built from it by ``build_model`` (the spec with its starting weights and on-the-fly
surgery, or the ``convert --out`` folder it names), sized for the classes it was trained on, and
the checkpoint's weights loaded strictly. Building it the same way matters: a torchvision model
built with published weights can compute differently from one built without (inception's
``transform_input``), so the starting weights the recipe names must still be there. The classes
are recorded in the checkpoint; a run saved before they were is sized from its data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

from torch import nn

from ..core.bounds import flag
from ..core.errors import SurgeryError
from ..io.files import recover_swap
from ..models.checkpoints import state_dict_problems
from ..models.code import check_trusted
from ..models.inputs import ExampleInputs
from ..models.zoo import example_inputs_for
from .checkpoint import read_checkpoint
from .data import data_classes
from .recipe import Recipe, recipe_from_dict
from .run import BEST, LAST, RECIPE_FILE
from .student import build_model, student_classes

__all__ = ["TrainedModel", "load_trained", "is_run_folder"]


@dataclass
class TrainedModel:
    """A run's model in eval mode with a checkpoint's weights; ``inputs``: the training image size;
    ``epoch``: the epochs the checkpoint holds; ``val_acc``: its validation accuracy (the agreement
    with the teacher on unlabelled data); ``description``: the model as the run described it."""

    model: nn.Module
    inputs: ExampleInputs
    run: Path
    checkpoint: Path
    recipe: Recipe
    epoch: int
    val_acc: Optional[float]
    description: str

    def to_json(self) -> Dict[str, Any]:
        return {"run": str(self.run), "checkpoint": str(self.checkpoint), "model": self.description,
                "epoch": self.epoch, "val_acc": self.val_acc, **self.inputs.to_json()}


def is_run_folder(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a folder ``train`` wrote (it holds ``recipe.yaml``, ``last.pt`` or ``best.pt``)."""
    path = Path(path)
    return path.is_dir() and any((path / name).is_file() for name in (RECIPE_FILE, LAST, BEST))


def _classes(ckpt: Dict[str, Any], recipe: Recipe) -> Optional[int]:
    """The classes the run sized its student for: recorded in the checkpoint, else from its data."""
    if "num_classes" in ckpt:
        classes = ckpt["num_classes"]
        if classes is not None and (not isinstance(classes, int) or isinstance(classes, bool) or classes < 1):
            raise SurgeryError(f"The checkpoint records num_classes {classes!r}, not a number of classes.")
        return classes
    return student_classes(recipe, data_classes(recipe.data))


def load_trained(run: Union[str, Path], checkpoint: str = BEST, *, trust_code: bool = False) -> TrainedModel:
    """The model of the ``train`` run folder ``run`` with the weights of ``checkpoint`` (``best.pt``:
    the epoch with the best validation accuracy; or ``last.pt``), in eval mode, fed as it was trained
    (channels x image_size x image_size). A run of a model whose spec runs your own code (``py:`` /
    ``file:``, itself or the ``convert --out`` folder it trained) is rebuilt only with
    ``trust_code=True``, as ``load_converted`` rebuilds such a folder.

    >>> import tempfile, bsconv_surgery as bs
    >>> from bsconv_surgery.training import load_recipe, run_training
    >>> from bsconv_surgery.training.trained import load_trained
    >>> recipe = load_recipe("digits-demo", ["model=timm:test_resnet", "epochs=1", "max_steps_per_epoch=1",
    ...                                      "data.image_size=16", "data.workers=0"])
    >>> with tempfile.TemporaryDirectory() as out:
    ...     _ = run_training(recipe, out + "/run", log=lambda message: None)
    ...     trained = load_trained(out + "/run")
    >>> trained.epoch, trained.inputs.size, trained.model.training
    (1, (3, 16, 16), False)
    """
    run = Path(run)
    recover_swap(run)  # a kill while train --force replaced it
    if not is_run_folder(run):
        raise SurgeryError(f"'{run}' is not a run folder written by 'bsconv-surgery train' (recipe.yaml, last.pt, "
                           "best.pt).")
    path = run / checkpoint
    if not path.is_file():
        raise SurgeryError(f"The run folder '{run}' has no {checkpoint}: it is written at the end of an epoch, and no "
                           "epoch has finished yet. Train it further (bsconv-surgery train --resume --out "
                           f"{run}).")
    ckpt = read_checkpoint(path)
    saved = recipe_from_dict(ckpt["recipe"], f"recipe saved in {path}")
    recipe = saved.model_copy(update={"trust_code": flag(trust_code, "trust_code")})  # this call's, not the run's
    try:
        if recipe.model and not Path(recipe.model).expanduser().is_dir():
            check_trusted(recipe.model, recipe.trust_code)
        built = build_model(recipe, _classes(ckpt, recipe))
    except SurgeryError as exc:
        where = (" (a relative folder is read from the current folder, as when the run started)"
                 if recipe.model and not Path(recipe.model).is_absolute() and not Path(recipe.model).exists()
                 and "/" in recipe.model else "")
        # the template, not str(exc): the CLI still names its flags
        raise SurgeryError(f"Cannot rebuild the model the run '{run}' trained (model: {recipe.model}{where}) as the "
                           f"run built it: {exc.template}") from None
    problems = state_dict_problems(built.model, ckpt["model"])
    if problems:
        raise SurgeryError(f"The weights in '{path}' do not fit the model its recipe builds ({built.description}): "
                           + "; ".join(problems) + ".")
    built.model.load_state_dict(ckpt["model"])
    built.model.eval()
    epoch = int(ckpt["epoch"])
    val_acc = next((r.get("val_acc") for r in ckpt["history"] if r.get("epoch") == epoch), None)
    return TrainedModel(built.model, example_inputs_for(built.model, built.image_shape), run, path, recipe, epoch,
                        val_acc, built.description)
