"""Source models: ``zoo.py`` (specs such as ``timm:resnet18``, building them, input sizes),
``inputs.py`` (how each family is fed: example inputs, "the output", training targets),
``checkpoints.py`` (their weights) and ``cifar.py`` (the paper's CIFAR architectures, registered
in timm's model registry when this package is imported)."""

from . import checkpoints, inputs, zoo
from . import cifar  # noqa: F401  (registers the CIFAR models in timm)
from .checkpoints import file_sha256, load_checkpoint, read_state_dict
from .inputs import INPUT_FAMILIES, ExampleInputs, InputFamily, as_example_inputs, input_family, output_structure, training_loss
from .zoo import (
    DEFAULT_INPUT_SIZE,
    TORCHVISION_FAMILIES,
    example_inputs_for,
    load_model,
    model_source,
    torchvision_family,
    ModelSpec,
    create_model,
    default_input_size,
    parse_input_size,
    parse_model_spec,
    timm_model_names,
    torchvision_model_names,
)

__all__ = zoo.__all__ + checkpoints.__all__ + inputs.__all__
