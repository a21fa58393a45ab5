"""The model a recipe trains (a spec, converted on the fly when the recipe has ``surgery:``, or a
``convert --out`` directory) and the distillation teacher (the unconverted source model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import SurgeryError
from ..fx.modules import temporary_mode
from ..models.zoo import create_model, parse_model_spec
from ..records import ModelSource
from ..regularization import regularization_sites
from ..surgery import convert, load_converted

__all__ = ["BuiltModel", "build_model", "build_teacher"]


@dataclass
class BuiltModel:
    model: nn.Module
    source: ModelSource  # the unconverted model (the teacher's architecture) and its weights, when known
    description: str
    notes: list


def _output_classes(model: nn.Module, image_size: int) -> int:
    with temporary_mode(model, training=False), torch.no_grad():
        out = model(torch.zeros(1, 3, image_size, image_size))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise SurgeryError(f"The model returns {type(out).__name__} of shape {getattr(out, 'shape', '?')}, "
                           "not logits (batch, classes); train handles classifiers only.")
    return out.shape[1]


def _fit_head(model: nn.Module, num_classes: int, image_size: int, notes: list) -> None:
    """Give the model a fresh ``num_classes`` classifier when its own has another size."""
    have = _output_classes(model, image_size)
    if have == num_classes:
        return
    if hasattr(model, "reset_classifier"):  # timm
        model.reset_classifier(num_classes)
    else:
        linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == have]
        if not linears:
            raise SurgeryError(f"The model predicts {have} classes and the data has {num_classes}, and no final "
                               "nn.Linear was found to replace. Convert it with --num-classes instead.")
        name, old = linears[-1]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                nn.Linear(old.in_features, num_classes, bias=old.bias is not None))
    notes.append(f"classifier replaced: {have} -> {num_classes} classes (the new head starts random)")


def build_model(recipe, num_classes: int) -> BuiltModel:
    """The student: ``recipe.model`` (spec or converted dir), sized for ``num_classes``."""
    if not recipe.model:
        raise SurgeryError("No model: pass --model SPEC_OR_DIR (timm:NAME, tv:NAME, NAME, or a 'convert --out' "
                           "directory), or set model: in the recipe.")
    notes: list = []
    size = recipe.data.image_size
    path = Path(recipe.model).expanduser()
    if path.is_dir():
        if recipe.surgery is not None:
            raise SurgeryError(f"'{path}' is already converted (it has surgery.json), but the recipe has a surgery: "
                               "section too. Remove it (--set surgery=null) or pass a model spec.")
        converted = load_converted(path)
        model, source = converted.model, converted.source
        description = f"{path} (converted from {source.spec}, variant {converted.options.variant})"
    elif path.exists() or "/" in recipe.model:
        raise SurgeryError(f"--model '{recipe.model}' is not a directory written by 'bsconv-surgery convert --out' "
                           "(nor a model spec such as timm:resnet18).")
    else:
        spec = parse_model_spec(recipe.model)
        checkpoint = recipe.checkpoint
        # with weights: build the model as they were trained, then fit the head; else build it sized
        model = create_model(spec, num_classes=None if checkpoint else num_classes, checkpoint=checkpoint)
        source = ModelSource(str(spec), getattr(model, "num_classes", None), checkpoint)
        description = source.spec + (f" with {checkpoint}" if checkpoint else " (random init)")
        if recipe.surgery is not None:
            options = recipe.surgery.options()
            convert(model, options, input_size=(3, size, size), source=spec, count=False)
            description += f", converted on the fly (variant {options.variant})"
    _fit_head(model, num_classes, size, notes)
    sites = sum(1 for _ in regularization_sites(model))
    if sites:
        description += f", {sites} BSConv-S site(s)"
    return BuiltModel(model, source, description, notes)


def build_teacher(built: BuiltModel, distill, num_classes: int) -> nn.Module:
    """The unconverted source model with trained weights, frozen.

    A teacher needs weights: every model here is built with random init, and distilling from a
    random network only teaches noise. So the weights are required: ``distill.teacher_checkpoint``
    (``--teacher-checkpoint``), else the checkpoint the model was converted from.
    """
    spec = built.source.spec
    checkpoint = distill.teacher_checkpoint or built.source.checkpoint
    if not checkpoint:
        raise SurgeryError(
            f"Distillation needs the trained weights of the source model {spec}: pass "
            "--teacher-checkpoint FILE (distill.teacher_checkpoint). Without weights the teacher would be a "
            "random network and would only teach noise."
        )
    try:
        teacher = create_model(parse_model_spec(spec), num_classes=num_classes, checkpoint=checkpoint)
    except SurgeryError as exc:
        raise SurgeryError(f"Teacher {spec} for {num_classes} classes, weights {checkpoint}: {exc}") from None
    teacher.eval().requires_grad_(False)
    return teacher
