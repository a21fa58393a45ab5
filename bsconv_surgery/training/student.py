"""The model a recipe trains (a spec, converted on the fly when the recipe has ``surgery:``, or a
``convert --out`` directory) and the distillation teacher (the unconverted source model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import nn

from ..core.errors import SurgeryError
from ..data.datasets import default_image_size
from ..models.checkpoints import check_sha256
from ..models.data_config import DataSettings, data_settings_for
from ..models.heads import output_classes, replace_head
from ..models.inputs import ExampleInputs
from ..models.zoo import create_model, example_inputs_for, load_model, model_from_source, model_source, parse_model_spec
from ..core.records import ConversionReport, ModelSource
from ..layers.regularization import regularization_sites
from ..surgery import convert, load_converted

__all__ = ["BuiltModel", "build_model", "build_teacher", "student_classes", "teacher_weights"]


@dataclass
class BuiltModel:
    model: nn.Module
    source: ModelSource  # the unconverted model (the teacher's architecture) and its weights, when known
    description: str
    notes: list
    classes: Optional[int] = None  # the classes the model predicts
    report: Optional[ConversionReport] = None  # what the conversion did, for a converted model
    image_size: int = 224  # the side of the square images it is trained on
    channels: int = 3  # the channels of those images
    settings: Optional[DataSettings] = None  # the model's data settings (data_settings_for)

    @property
    def image_shape(self) -> tuple:
        return (self.channels, self.image_size, self.image_size)


def _fit_head(model: nn.Module, num_classes: int, shape: tuple, notes: list) -> None:
    """Give the model a fresh ``num_classes`` classifier when its own has another size
    (``models/heads.py``: the one implementation)."""
    have = output_classes(model, shape)
    if have == num_classes:
        return
    try:
        replace_head(model, num_classes, have)
    except SurgeryError:
        raise SurgeryError(f"The model predicts {have} classes and the data has {num_classes}, and no final "
                           "nn.Linear was found to replace. Convert it with --num-classes instead.") from None
    notes.append(f"classifier replaced: {have} -> {num_classes} classes (the new head starts random)")


def student_classes(recipe, classes: Optional[int]) -> Optional[int]:
    """The classes ``build_model`` sizes the student for on data of ``classes`` (``None``:
    unlabelled): the data's, or ``None`` (the model's own) for label-free distillation, which
    unlabelled data implies."""
    return None if recipe.distill.label_free or classes is None else classes


def _spec_inputs(recipe, model: nn.Module) -> tuple:
    """How a spec's model is fed in training, and where its size came from: the recipe's image
    size and channels where it gives them; else the model's own input size when it has trained
    weights (they were trained at it), else the data's usual size (digits 16, CIFAR 32, photos 224)."""
    data, source = recipe.data, model_source(model)
    try:
        own = example_inputs_for(model).size
    except SurgeryError:  # your own model without a declared input size
        own = None
    own = own if own is not None and len(own) == 3 else None
    channels = data.channels or (own[0] if own else 3)
    if data.image_size is not None:
        side, where = data.image_size, "the recipe (data.image_size)"
    elif own and source is not None and source.trained:
        side, where = own[1], "the model's own input size (it has trained weights)"
    else:
        side, where = default_image_size(data.name), f"{data.name or 'the data'}'s usual size (a model without trained weights)"
    return example_inputs_for(model, (channels, side, side)), where


def _converted_note(recipe, inputs: ExampleInputs, notes: list) -> None:
    data, size = recipe.data, inputs.size
    if len(size) == 3 and data.image_size is not None and data.image_size != size[1]:
        notes.append(f"data.image_size {data.image_size} (the recipe) is not the conversion's input size "
                     f"{inputs.label}; the recipe's wins")


def build_model(recipe, num_classes: Optional[int]) -> BuiltModel:
    """The student: ``recipe.model`` (spec or converted dir), sized for ``num_classes`` (``None``:
    the classes it has, as label-free distillation keeps them)."""
    if not recipe.model:
        raise SurgeryError("No model: pass --model SPEC_OR_DIR (timm:NAME, tv:NAME, NAME, or a 'convert --out' "
                           "directory), or set model: in the recipe.")
    notes: list = []
    path = Path(recipe.model).expanduser()
    if path.is_dir():
        if recipe.pretrained or recipe.weights is not None:
            raise SurgeryError(f"'{path}' is a converted model: its weights are in model.safetensors, so pretrained "
                               "and weights do not apply (the teacher's weights come from its surgery.json).")
        if recipe.surgery is not None:
            raise SurgeryError(f"'{path}' is already converted (it has surgery.json), but the recipe has a surgery: "
                               "section too. Remove it (--set surgery=null) or pass a model spec.")
        converted = load_converted(path, trust_code=recipe.trust_code)
        model, source, report = converted.model, converted.source, converted.report
        description = f"{path} (converted from {source.spec}, variant {converted.options.variant})"
        inputs, where = converted.inputs, f"the conversion ({path / 'surgery.json'})"
        _converted_note(recipe, inputs, notes)
    elif path.exists() or "/" in recipe.model:
        raise SurgeryError(f"--model '{recipe.model}' is not a directory written by 'bsconv-surgery convert --out' "
                           "(nor a model spec such as timm:resnet18).")
    else:
        spec = parse_model_spec(recipe.model)
        checkpoint = recipe.checkpoint
        pretrained = recipe.pretrained or recipe.weights is not None
        report = None
        # with weights: build the model as they were trained, then fit the head; else build it sized
        trained = checkpoint is not None or pretrained
        model = load_model(spec, num_classes=None if trained or spec.runs_code else num_classes, checkpoint=checkpoint,
                           pretrained=pretrained, weights=recipe.weights, model_args=recipe.model_args or None)
        source = model_source(model)
        description = source.spec + (f" with {checkpoint}" if checkpoint else
                                     f" with {source.pretrained.label}" if source.pretrained else
                                     " with the weights its own code builds" if source.callable_weights else
                                     " (random init)")
        inputs, where = _spec_inputs(recipe, model)
        if recipe.surgery is not None:
            options = recipe.surgery.options()
            report = convert(model, options, example_inputs=inputs, count=False).report
            description += f", converted on the fly (variant {options.variant})"
    settings = data_settings_for(model, inputs, inputs_from=where)
    notes.extend(settings.notes)
    size = recipe.data.image_size or settings.side or default_image_size(recipe.data.name)
    channels = recipe.data.channels or settings.channels
    if num_classes is not None:
        _fit_head(model, num_classes, (channels, size, size), notes)
    try:
        classes = output_classes(model, (channels, size, size))
    except SurgeryError:  # not a classifier (several outputs): label-free distillation compares them all
        if num_classes is not None:
            raise
        classes = None
    sites = sum(1 for _ in regularization_sites(model))
    if sites:
        description += f", {sites} BSConv-S site(s)"
    return BuiltModel(model, source, description, notes, classes, report, size, channels, settings)


def teacher_weights(source: ModelSource, distill) -> str:
    """Where the teacher's weights come from, for the log."""
    checkpoint = distill.teacher_checkpoint or source.checkpoint
    if checkpoint:
        return f"weights {checkpoint}"
    if source.pretrained is not None:
        return f"its pretrained weights {source.pretrained.label}"
    if source.callable_weights:
        return "the weights its own code builds"
    return "no weights"


def build_teacher(built: BuiltModel, distill, num_classes: Optional[int]) -> nn.Module:
    """The unconverted source model with trained weights, frozen, predicting ``num_classes``
    (label-free distillation: the student's own classes).

    A teacher needs weights: distilling from a random network only teaches noise. They come from
    ``distill.teacher_checkpoint`` (``--teacher-checkpoint``), else from the student's provenance:
    the checkpoint it was converted from, or the published weights it was built with (rebuilt
    from the cache: the recorded revision and SHA-256). Without any, ``train`` refuses; so it does
    when the conversion gave the pretrained model a fresh head (that head would be random), or
    when the teacher's classes are not the data's.
    """
    source = built.source
    spec = source.spec
    checkpoint = distill.teacher_checkpoint or source.checkpoint
    if checkpoint and not distill.teacher_checkpoint and source.checkpoint_sha256:
        check_sha256(checkpoint, source.checkpoint_sha256, f"the model was converted from ({spec})",
                     "restore that file, or pass the teacher's weights with --teacher-checkpoint FILE "
                     "(distill.teacher_checkpoint).")
    if checkpoint:
        try:
            parsed = parse_model_spec(spec)
            # your own model's callable gets the classes it was built with; the zoo's get the data's
            teacher = create_model(parsed, num_classes=source.num_classes if parsed.runs_code else num_classes,
                                   checkpoint=checkpoint, model_args=source.model_args)
        except SurgeryError as exc:
            raise SurgeryError(f"Teacher {spec} for {num_classes} classes, weights {checkpoint}: {exc}") from None
    elif source.pretrained is not None:
        weights = source.pretrained
        if source.head_replaced is not None:
            old, new = source.head_replaced
            raise SurgeryError(
                f"The conversion gave {spec} a fresh {new}-class head in place of the {old}-class head of its pretrained "
                f"weights {weights.name}, so the source model as published would teach through a random head. "
                "Fine-tune the unconverted model on your classes and pass its weights with --teacher-checkpoint FILE.")
        if num_classes is not None and weights.num_classes is not None and weights.num_classes != num_classes:
            raise SurgeryError(
                f"The teacher {spec} with its pretrained weights {weights.name} predicts {weights.num_classes} classes "
                f"and the data has {num_classes}: distillation compares the two models' outputs class by class. "
                "Train on data with the weights' classes, or pass a teacher fine-tuned on your classes with "
                "--teacher-checkpoint FILE.")
        teacher = model_from_source(source, load_weights=True)
    elif source.callable_weights:  # your own code builds the trained weights itself; it ran for the student
        teacher = model_from_source(source, trust_code=True)
    else:
        raise SurgeryError(
            f"Distillation needs the trained weights of the source model {spec}: pass "
            "--teacher-checkpoint FILE (distill.teacher_checkpoint), or convert from trained weights (--pretrained or "
            "--checkpoint). Without weights the teacher would be a random network and would only teach noise."
        )
    teacher.eval().requires_grad_(False)
    if num_classes is not None and built.classes is not None:  # distillation compares the outputs class by class
        have = output_classes(teacher, built.image_shape)
        if have != num_classes:
            raise SurgeryError(f"The teacher {spec} predicts {have} classes and the data has {num_classes}: distillation "
                               "compares the two models' outputs class by class. Build the model with the data's "
                               "classes (--num-classes, or --model-arg num_classes=N for your own code), or pass a "
                               "teacher fine-tuned on them with --teacher-checkpoint FILE.")
    return teacher
