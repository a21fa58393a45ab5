"""The validated values of training, shared by the recipe schema (``recipe.py``) and the Python
API (``distill()``): one definition of what a learning rate, a temperature or a feature weight
may be, so a value the recipe refuses is refused by ``distill()`` too, with the same rule.

Every number is finite (no inf or NaN) and bounded so that the optimizer's float32 arithmetic
cannot overflow (a learning rate of 1e300 is an error here, not an overflow inside AdamW).
"""

from __future__ import annotations

from typing import Annotated, Any, Dict, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .bounds import MAX_INT, shown
from .errors import SurgeryError

__all__ = ["Text", "LearningRate", "WeightDecay", "Temperature", "FeatureWeight", "Momentum", "Steps", "DistillMethod",
           "MixupAlpha", "EmaDecay", "DistillArguments", "validated_arguments"]

def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty (leave the key out, or set it to null, for its default)")
    return value


#: A path or a name: an empty string is an error, never "not given" (``teacher_checkpoint: ''``).
Text = Annotated[str, AfterValidator(_not_blank)]

LearningRate = Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False, description="Peak learning rate.")]
WeightDecay = Annotated[float, Field(ge=0, le=1e3, allow_inf_nan=False)]
Temperature = Annotated[float, Field(gt=0, le=1e3, allow_inf_nan=False,
                                     description="Softmax temperature of the distillation loss.")]
FeatureWeight = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False,
                                       description="Weight of the site-level feature loss.")]
#: A BatchNorm momentum (``stale_bn_momentum``).
Momentum = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
#: A count of steps, epochs or a logging interval.
Steps = Annotated[int, Field(ge=1, le=MAX_INT)]
#: How distillation feeds the two models: the batches as they come, or function matching (shared
#: augmented and mixed views, an average of the student's weights; ``recovery/distill.py``).
DistillMethod = Literal["plain", "function_matching"]
#: 0 turns mixup off (``None``, where allowed, means "the method's").
MixupAlpha = Annotated[float, Field(ge=0, le=1e3, allow_inf_nan=False,
                                    description="Beta(alpha, alpha) mixing of the batch's images with each other; 0: none.")]
#: 0 turns the average off.
EmaDecay = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False,
                                  description="Decay of the moving average of the student's weights; 0: none.")]


class DistillArguments(BaseModel):
    """The numeric and named arguments of ``distill()`` (strict: ``steps=2.5`` or ``lr="0.1"`` are errors)."""

    model_config = ConfigDict(strict=True, extra="forbid")

    steps: Steps
    lr: LearningRate
    weight_decay: WeightDecay
    temperature: Temperature
    feature_weight: FeatureWeight
    log_every: Steps
    schedule: Literal["onecycle", "cosine", "constant"]
    stale_bn_momentum: Optional[Momentum]
    method: DistillMethod
    augment: Optional[bool]
    mixup: Optional[MixupAlpha]
    ema: Optional[EmaDecay]


def validated_arguments(model: type, values: Dict[str, Any], function: str) -> BaseModel:
    """``model.model_validate(values)``; every problem is named by its argument in one
    ``SurgeryError`` (``argument``: the first one)."""
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        errors = exc.errors()
        problems = []
        for err in errors:
            name = ".".join(str(part) for part in err["loc"])
            message = err["msg"].removeprefix("Value error, ").rstrip(".")
            problems.append(f"{name}={shown(err.get('input'))}: {message[0].lower()}{message[1:]}")
        first = str(errors[0]["loc"][0]) if errors and errors[0]["loc"] else None
        raise SurgeryError(f"Bad argument(s) of {function}(): " + "; ".join(problems) + ".", argument=first) from None
