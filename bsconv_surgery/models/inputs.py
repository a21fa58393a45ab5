"""Example inputs per model family: the one table that counting, convert's output check, the
benchmark, fidelity and the zoo sweep share.

A family (``INPUT_FAMILIES[name]``) says what ``--input-size`` means for its models, how to make
example arguments of that size, how to read "the output", and how to run a training step:

| family | ``--input-size`` | arguments (batch ``B``) | the output |
|---|---|---|---|
| ``classification``, ``quantization`` | ``C,H,W`` | ``x (B, C, H, W)`` | logits |
| ``segmentation`` | ``C,H,W`` | ``x (B, C, H, W)`` | ``out["out"]`` |
| ``detection`` | ``C,H,W`` | a list of ``B`` images ``(C, H, W)`` | the list of detection dicts |
| ``video`` | ``C,T,H,W`` | ``x (B, C, T, H, W)`` | logits |
| ``optical_flow`` | ``C,H,W`` | two images ``(B, C, H, W)`` | the last flow prediction |
| ``tensor`` | any rank | ``x (B, *SIZE)`` | the (first) output tensor |

``tensor`` is for modules given as they are (an audio net takes ``C,L``, a volume net
``C,D,H,W``). In training mode a detection model needs targets: ``train_args`` adds synthetic
ones (one box per image, plus a mask or keypoints where the model has those heads), so a
backward pass can be checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..core.bounds import bounded_number
from ..core.errors import SurgeryError, arg

__all__ = ["ExampleInputs", "Inputs", "as_example_inputs", "parse_input_size", "InputFamily", "INPUT_FAMILIES", "input_family", "output_structure", "tensors_in",
           "training_loss"]

#: Frames of a default video clip (torchvision's video weights were trained on 16-frame clips).
VIDEO_FRAMES = 16


def tensors_in(out: Any) -> List[torch.Tensor]:
    """Every tensor in a nested output (tensors, dicts, lists, tuples and named tuples), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors_in(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in tensors_in(v)]
    return []


def output_structure(out: Any, dynamic_first: bool = False) -> Any:
    """A JSON-able picture of an output: a tensor's shape, dicts and lists kept as such.
    ``dynamic_first``: the first dimension of each tensor is data-dependent (a detection count)
    and shown as ``"n"``."""
    if isinstance(out, torch.Tensor):
        shape = list(out.shape)
        return (["n"] + shape[1:]) if dynamic_first and shape else shape
    if isinstance(out, dict):
        return {str(k): output_structure(v, dynamic_first) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [output_structure(v, dynamic_first) for v in out]
    return None


def training_loss(out: Any) -> torch.Tensor:
    """A scalar to call ``backward()`` on: the sum of the means of every floating tensor of a
    training-mode output (a detection model's loss dict, logits, a flow list, aux outputs)."""
    tensors = [t for t in tensors_in(out) if t.is_floating_point() and t.requires_grad]
    if not tensors:
        raise SurgeryError("The model's training-mode output holds no tensor that needs a gradient.")
    return torch.stack([t.float().mean() for t in tensors]).sum()


def _randn(shape: Sequence[int], gen: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _batch(size: Sequence[int], batch: int, gen) -> Tuple[torch.Tensor, ...]:
    return (_randn((batch, *size), gen),)


def _detection(size: Sequence[int], batch: int, gen) -> Tuple[List[torch.Tensor], ...]:
    return ([_randn(size, gen) for _ in range(batch)],)


def _flow(size: Sequence[int], batch: int, gen) -> Tuple[torch.Tensor, ...]:
    return (_randn((batch, *size), gen), _randn((batch, *size), gen))


def _as_is(x: torch.Tensor) -> tuple:
    return (x,)


def _image_list(x: torch.Tensor) -> tuple:
    return (list(x),)


def _with_next(x: torch.Tensor) -> tuple:
    return (x, x.roll(-1, 0))


def _first_tensor(out: Any) -> Any:
    if isinstance(out, dict):
        return out.get("logits", next((v for v in out.values() if isinstance(v, torch.Tensor)), None))
    if isinstance(out, (tuple, list)):
        return next((v for v in out if isinstance(v, torch.Tensor)), None)
    return out


def _segmentation_output(out: Any) -> Any:
    return out["out"] if isinstance(out, dict) and "out" in out else _first_tensor(out)


def _flow_output(out: Any) -> Any:
    return out[-1] if isinstance(out, (list, tuple)) and out else out


def _detection_targets(model: nn.Module, size: Sequence[int], batch: int) -> List[Dict[str, torch.Tensor]]:
    """One box per image (label 1), with a mask or keypoints where the model predicts them."""
    _, h, w = size
    x0, y0, x1, y1 = 0.1 * w, 0.1 * h, 0.6 * w, 0.7 * h
    roi = getattr(model, "roi_heads", None)
    targets = []
    for _ in range(batch):
        t = {"boxes": torch.tensor([[x0, y0, x1, y1]]), "labels": torch.tensor([1])}
        if getattr(roi, "mask_head", None) is not None:
            mask = torch.zeros(1, h, w, dtype=torch.uint8)
            mask[:, int(y0):int(y1), int(x0):int(x1)] = 1
            t["masks"] = mask
        if getattr(roi, "keypoint_predictor", None) is not None:
            k = roi.keypoint_predictor.kps_score_lowres.out_channels
            xs = torch.linspace(x0 + 1, x1 - 1, k)
            t["keypoints"] = torch.stack([xs, torch.full((k,), (y0 + y1) / 2), torch.ones(k)], 1)[None]
        targets.append(t)
    return targets


@dataclass(frozen=True)
class InputFamily:
    """How the models of one family are fed (see the module docstring)."""

    name: str
    layout: str  # what --input-size means, e.g. "C,T,H,W"; "" for any rank
    default: Tuple[int, ...]
    _make: Callable[[Sequence[int], int, Optional[torch.Generator]], tuple]
    _output: Callable[[Any], Any] = _first_tensor
    _from_batch: Callable[[torch.Tensor], tuple] = _as_is
    images: bool = True  # fed (a batch of) images: digits / imagefolder calibration apply
    dynamic_output: bool = False  # output sizes depend on the data (detection counts)
    needs_targets: bool = False

    @property
    def rank(self) -> Optional[int]:
        return len(self.layout.split(",")) if self.layout else None

    @property
    def example(self) -> str:
        return ",".join(map(str, self.default))

    def check_size(self, size: Sequence[int], model_label: str = "") -> Tuple[int, ...]:
        """``size`` as a tuple, or a ``SurgeryError`` naming the layout this family needs."""
        size = tuple(int(v) for v in size)
        if (self.rank is not None and len(size) != self.rank) or not size or min(size) < 1:
            what = f"{model_label} ({self.name} model)" if model_label else f"a {self.name} model"
            layout = self.layout or "positive integers"
            raise SurgeryError(
                f"Bad input size '{','.join(map(str, size))}' for {what}: expected {arg('example_inputs')} {layout} "
                f"such as {self.example}."
            )
        return size

    def make(self, size: Sequence[int], batch: int = 1, generator: Optional[torch.Generator] = None,
             device=None, dtype=None) -> tuple:
        """Standard-normal example arguments of ``size`` for ``batch`` samples (seed 0 unless a
        generator is given), on ``device`` in ``dtype``."""
        gen = generator if generator is not None else torch.Generator().manual_seed(0)
        return _to(self._make(tuple(size), batch, gen), device, dtype)

    def from_batch(self, x: torch.Tensor) -> tuple:
        """Arguments for a batch ``x (B, *size)`` of calibration samples (optical flow: each image
        with the next one of the batch)."""
        return self._from_batch(x)

    def output(self, out: Any) -> Any:
        """"The output" of a forward: logits, ``out["out"]``, the last flow, the detection list."""
        return self._output(out)

    def structure(self, out: Any) -> Any:
        """What ``convert`` checks is unchanged by the surgery (detection counts shown as ``n``)."""
        return output_structure(out, dynamic_first=self.dynamic_output)

    def train_args(self, model: nn.Module, size: Sequence[int], batch: int = 2,
                   generator: Optional[torch.Generator] = None) -> tuple:
        """Arguments of a training-mode forward (detection: images and synthetic targets)."""
        args = self.make(size, batch, generator)
        if self.needs_targets:
            args = (*args, _detection_targets(model, size, batch))
        return _to(args, *_place(model))


def _place(model: nn.Module):
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return (param.device, param.dtype) if param is not None else (None, None)


def _to(args: Any, device, dtype) -> Any:
    if isinstance(args, torch.Tensor):
        return args.to(device=device, dtype=dtype if args.is_floating_point() else None)
    if isinstance(args, dict):
        return {k: _to(v, device, dtype) for k, v in args.items()}
    if isinstance(args, (list, tuple)):
        return type(args)(_to(v, device, dtype) for v in args)
    return args


INPUT_FAMILIES: Dict[str, InputFamily] = {f.name: f for f in (
    InputFamily("classification", "C,H,W", (3, 224, 224), _batch),
    InputFamily("quantization", "C,H,W", (3, 224, 224), _batch),
    InputFamily("segmentation", "C,H,W", (3, 520, 520), _batch, _segmentation_output),
    InputFamily("detection", "C,H,W", (3, 800, 800), _detection, lambda out: out, _image_list, dynamic_output=True,
                needs_targets=True),
    InputFamily("video", "C,T,H,W", (3, VIDEO_FRAMES, 112, 112), _batch, images=False),
    InputFamily("optical_flow", "C,H,W", (3, 224, 224), _flow, _flow_output, _with_next),
    InputFamily("tensor", "", (3, 224, 224), _batch, images=False),
)}


def input_family(name: Optional[str]) -> InputFamily:
    """The family called ``name`` (``None``: ``tensor``, a module fed one tensor)."""
    family = INPUT_FAMILIES.get(name or "tensor")
    if family is None:
        raise SurgeryError(f"Unknown input family '{name}'. Valid families: {', '.join(INPUT_FAMILIES)}.")
    return family


def _rebatch(arg: Any, batch: int) -> Any:
    """One argument with ``batch`` samples, the first ones, repeated when there are fewer: a tensor
    along its first dimension, a list (of images) by its items; anything else as it is."""
    if isinstance(arg, torch.Tensor) and arg.dim() > 0 and arg.shape[0] != batch:
        reps = -(-batch // arg.shape[0])
        return arg.repeat(reps, *([1] * (arg.dim() - 1)))[:batch]
    if isinstance(arg, list) and arg and len(arg) != batch:
        return [arg[i % len(arg)] for i in range(batch)]
    return arg


@dataclass(frozen=True)
class ExampleInputs:
    """How a model is fed, made once at the edge and passed to every stage: the model's ``family``
    (the table above) and its input ``size`` (``C,H,W``; ``C,T,H,W`` for video; any rank for
    ``tensor``), plus the caller's own example arguments when given (``given``: a tuple, used as
    they are at their batch size, re-batched by taking or repeating samples otherwise).

    >>> import torch, bsconv_surgery as bs
    >>> inputs = bs.ExampleInputs.of("classification", (3, 32, 32))
    >>> [tuple(a.shape) for a in inputs.make(batch=2)]
    [(2, 3, 32, 32)]
    >>> bs.ExampleInputs.from_args(torch.zeros(1, 1, 16000)).size
    (1, 16000)
    """

    family: InputFamily
    size: Tuple[int, ...]
    given: Optional[tuple] = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, family: Union[str, InputFamily, None], size: Sequence[int], model_label: str = "") -> "ExampleInputs":
        """Random example arguments of ``family`` (a name or an ``InputFamily``; ``None``: ``tensor``)
        at ``size``, checked against the layout the family takes."""
        fam = family if isinstance(family, InputFamily) else input_family(family)
        return cls(fam, fam.check_size(size, model_label))

    @classmethod
    def from_args(cls, args: Any) -> "ExampleInputs":
        """The caller's example arguments: one tensor ``(B, *size)`` or a tuple of arguments (the
        first one's size is recorded; a list of ``(C, H, W)`` images first, as torchvision's
        detection models take them, is fed and compared as detection); an ``ExampleInputs`` is
        returned as it is."""
        if isinstance(args, ExampleInputs):
            return args
        given = tuple(args) if isinstance(args, (tuple, list)) else (args,)
        first = given[0] if given else None
        if isinstance(first, list) and first and all(isinstance(i, torch.Tensor) and i.dim() == 3 for i in first):
            # a list of (C, H, W) images: torchvision's detection convention, compared as detections
            return cls(input_family("detection"), tuple(int(s) for s in first[0].shape), given)
        if not isinstance(first, torch.Tensor) or first.dim() < 2:
            raise SurgeryError(
                "example_inputs must be a tensor with a batch dimension, such as torch.randn(1, 3, 224, 224), a "
                f"tuple of the model's arguments, or an ExampleInputs; got {_describe(args)}.")
        return cls(input_family(None), tuple(int(s) for s in first.shape[1:]), given)

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def label(self) -> str:
        """``3x224x224``: the size as messages and reports write it."""
        return "x".join(map(str, self.size))

    def make(self, batch: int = 1, generator: Optional[torch.Generator] = None, device=None, dtype=None) -> tuple:
        """Arguments for ``batch`` samples on ``device`` in ``dtype``: the given ones (re-batched), or
        the family's fixed standard-normal ones (seed 0 unless a generator is given)."""
        if self.given is not None and generator is None:
            return _to(tuple(_rebatch(a, batch) for a in self.given), device, dtype)
        return self.family.make(self.size, batch, generator, device, dtype)

    def from_batch(self, x: torch.Tensor) -> tuple:
        return self.family.from_batch(x)

    def output(self, out: Any) -> Any:
        return self.family.output(out)

    def structure(self, out: Any) -> Any:
        return self.family.structure(out)

    def train_args(self, model: nn.Module, batch: int = 2, generator: Optional[torch.Generator] = None) -> tuple:
        """Arguments of a training-mode forward (detection: images and synthetic targets)."""
        if self.given is not None and generator is None and not self.family.needs_targets:
            return _to(tuple(_rebatch(a, batch) for a in self.given), *_place(model))
        return self.family.train_args(model, self.size, batch, generator)

    def to_json(self) -> Dict[str, Any]:
        return {"family": self.name, "input_size": list(self.size)}


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return f"{value!r}"[:80] if isinstance(value, (str, int, float, tuple, list)) else f"a {type(value).__name__}"


#: What the library's functions take as "how the model is fed".
Inputs = Union[ExampleInputs, torch.Tensor, tuple, list, str, None]


def as_example_inputs(value: Inputs) -> ExampleInputs:
    """The one reader of example inputs given to a library function: an ``ExampleInputs``; a
    tensor or a tuple of the model's arguments (``ExampleInputs.from_args``); or an input size
    (``(3, 32, 32)``, ``"3,32,32"``) of one tensor (the ``tensor`` family)."""
    if isinstance(value, ExampleInputs):
        return value
    if isinstance(value, torch.Tensor) or (isinstance(value, (tuple, list)) and value
                                           and isinstance(value[0], (torch.Tensor, list, tuple))):
        return ExampleInputs.from_args(value)
    if isinstance(value, (str, tuple, list)):  # an input size: the one parser of --input-size and the API
        return ExampleInputs(input_family(None), parse_input_size(value))
    raise SurgeryError(
        f"Bad example inputs {_describe(value)}: expected an ExampleInputs, a tensor with a batch dimension such "
        "as torch.randn(1, 3, 224, 224), a tuple of the model's arguments, or an input size such as (3, 224, 224).")


def parse_input_size(value: Union[str, Sequence[int]]) -> Tuple[int, ...]:
    """Parse ``C,H,W`` (e.g. ``3,224,224``), ``C,T,H,W`` for video, ``C,L`` for a 1-D model: positive
    integers, as the text ``"3,224,224"`` (``--input-size``, recipes) or a sequence such as
    ``(3, 224, 224)`` (the Python API): one parser for both (``ExampleInputs.of`` checks the rank
    a family takes)."""
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else value
    try:
        values = tuple(_whole(p) for p in parts)
    except (TypeError, ValueError):
        values = ()
    if not values or min(values) < 1:
        raise SurgeryError(f"Bad input size '{_show(value)}': expected positive integers such as 3,224,224 (C,H,W), "
                           "3,16,112,112 (C,T,H,W for video) or 1,16000 (C,L for a 1-D model).")
    return values


def _whole(value: Any) -> int:
    """A dimension: a whole number of at most 2**31 - 1 (``bounds.py``: no bool, inf, NaN or 5000 digits)."""
    try:
        return bounded_number(value, "input_size", integer=True, high=2**31 - 1)
    except SurgeryError:
        raise ValueError(value) from None


def _show(value) -> str:
    text = value if isinstance(value, str) else ",".join(map(str, value)) if isinstance(value, (tuple, list)) \
        else repr(value)
    return text if len(text) <= 60 else f"{text[:50]}...({len(text)} characters)"
