"""The shared views of function-matching distillation: batched augmentation and mixup on input tensors.

Function matching (Beyer et al., CVPR 2022, "Knowledge distillation: a good teacher is patient and
consistent") feeds teacher and student the *same* aggressively augmented view of every batch, and
mixes unlabelled images of the batch with each other: the teacher labels whatever the student sees,
so the student learns the teacher's function around the data, not only on it. Everything here works
on a batch tensor ``(N, C, H, W)`` with torch alone (one ``grid_sample`` per batch, any device), so
it runs on the tensors a ``distill`` step already has, with no data loader involved.

``augmentation_for(size)`` picks the augmentation by input size:

- below 96 px (digits at 16, MTCNN windows at 12/24/48): random translations by up to
  ``max(1, round(size / 8))`` pixels (2 at 12 and 16, 3 at 24, 6 at 48; the border pixels repeat
  into the gap), horizontal flips (``flip=False`` for inputs where the mirror image means something
  else, such as digits), and mild brightness / contrast jitter;
- from 96 px: an inception-style random resized crop (8-100% of the area, aspect ratio 3/4-4/3,
  resized back to the input size), flips and the same jitter.

Randomness comes from torch's global generator (seed it with ``torch.manual_seed``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..core.errors import SurgeryError

__all__ = ["Augmentation", "augmentation_for", "mixup", "SharedView", "LARGE_INPUT"]

#: From this input size (the shorter side, pixels) on, a random resized crop replaces translations.
LARGE_INPUT = 96

Tensor = torch.Tensor


@dataclass(frozen=True)
class Augmentation:
    """A random view of every image of a batch ``(N, C, H, W)``, drawn per image.

    ``shift``: largest translation in pixels (border pixels repeat into the gap); ``crop_scale``:
    ``(min, max)`` area fraction of an inception-style random resized crop (``None``: no crop);
    ``flip``: horizontal flips with probability 1/2; ``brightness`` / ``contrast``: jitter amplitudes
    (a shift by up to ``brightness`` times the batch's standard deviation, a scaling of each image
    around its mean by a factor in ``[1 - contrast, 1 + contrast]``). Shape, dtype and device are kept.
    """

    shift: int = 0
    crop_scale: Optional[Tuple[float, float]] = None
    flip: bool = True
    brightness: float = 0.1
    contrast: float = 0.2

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or not x.is_floating_point():
            raise SurgeryError(f"Augmentation works on float image batches (N, C, H, W), got {tuple(x.shape)} "
                               f"{x.dtype}.")
        theta = self._geometry(x)
        if theta is not None:
            grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return self._jitter(x)

    def _geometry(self, x: Tensor) -> Optional[Tensor]:
        n, _, h, w = x.shape
        if not self.shift and self.crop_scale is None and not self.flip:
            return None
        sx, sy = torch.ones(n), torch.ones(n)
        tx, ty = torch.zeros(n), torch.zeros(n)
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            area = torch.empty(n).uniform_(lo, hi)
            ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3)).exp()
            sx, sy = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
            tx, ty = (torch.rand(n) * 2 - 1) * (1 - sx), (torch.rand(n) * 2 - 1) * (1 - sy)
        if self.shift:
            # a whole number of pixels: 2 / size per pixel in grid units (align_corners=False)
            tx = tx + torch.randint(-self.shift, self.shift + 1, (n,)) * 2.0 / w
            ty = ty + torch.randint(-self.shift, self.shift + 1, (n,)) * 2.0 / h
        if self.flip:
            sx = sx * torch.where(torch.rand(n) < 0.5, -1.0, 1.0)
        zeros = torch.zeros(n)
        theta = torch.stack([torch.stack([sx, zeros, tx], 1), torch.stack([zeros, sy, ty], 1)], 1)
        return theta.to(x.device)

    def _jitter(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        if self.contrast:
            factor = torch.empty(n, 1, 1, 1).uniform_(1 - self.contrast, 1 + self.contrast).to(x.device, x.dtype)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * factor + mean
        if self.brightness:
            offset = torch.empty(n, 1, 1, 1).uniform_(-self.brightness, self.brightness).to(x.device, x.dtype)
            x = x + offset * x.detach().std().clamp_min(1e-6)
        return x


def _image_size(example: Any) -> int:
    if isinstance(example, int) and not isinstance(example, bool):
        return example
    if isinstance(example, Tensor):
        if example.dim() < 2:
            raise SurgeryError(f"augmentation_for needs an image tensor (C, H, W) or (N, C, H, W), got {tuple(example.shape)}.")
        return int(min(example.shape[-2:]))
    if isinstance(example, (tuple, list)) and example and all(isinstance(v, Tensor) for v in example):
        images = [t for t in example if t.dim() == 4]
        if images:
            return _image_size(images[0])
    if isinstance(example, (tuple, list)) and len(example) in (2, 3) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in example):
        return int(min(example[-2:]))
    raise SurgeryError(f"augmentation_for takes an input size (16, (3, 16, 16)) or example inputs, got {example!r:.80}.")


def augmentation_for(example_inputs_or_size: Any, *, flip: bool = True, jitter: bool = True) -> Augmentation:
    """The augmentation suited to an input size (module docstring): translations by a few pixels
    below ``LARGE_INPUT`` px, an inception-style random resized crop from there on.

    ``example_inputs_or_size``: an int (the shorter side), ``(C, H, W)`` / ``(H, W)``, an example
    tensor ``(N, C, H, W)``, or a tuple of example tensors (the first 4-D one decides).

    >>> augmentation_for(16, flip=False)
    Augmentation(shift=2, crop_scale=None, flip=False, brightness=0.1, contrast=0.2)
    >>> augmentation_for((3, 224, 224)).crop_scale
    (0.08, 1.0)
    """
    size = _image_size(example_inputs_or_size)
    if size < 1:
        raise SurgeryError(f"augmentation_for: the input size must be positive, got {size}.")
    amplitude = {"brightness": 0.1, "contrast": 0.2} if jitter else {"brightness": 0.0, "contrast": 0.0}
    if size >= LARGE_INPUT:
        return Augmentation(crop_scale=(0.08, 1.0), flip=flip, **amplitude)
    return Augmentation(shift=max(1, round(size / 8)), flip=flip, **amplitude)


def mixup(x: Tensor, alpha: float, partner: Optional[Tensor] = None, weight: Optional[Tensor] = None) -> Tensor:
    """Each image mixed with another image of the same batch: ``w x + (1 - w) x[partner]`` with ``w``
    drawn per image from ``Beta(alpha, alpha)`` (``alpha=1``: uniform). No labels are involved: in
    function matching the teacher labels the mixed image. ``partner`` / ``weight`` fix the pairing
    and the weights (so several inputs of one batch mix alike)."""
    n = x.shape[0]
    if partner is None:
        partner = torch.randperm(n, device=x.device)
    if weight is None:
        weight = torch.distributions.Beta(float(alpha), float(alpha)).sample((n,))
    shape = (n,) + (1,) * (x.dim() - 1)
    w = weight.to(x.device, x.dtype).reshape(shape)
    return w * x + (1 - w) * x[partner]


class SharedView:
    """What teacher and student both see in a function-matching step: the batch's inputs augmented
    (``augment``: a callable on a 4-D float tensor, applied to every such input; ``True``:
    ``augmentation_for`` the first batch's size, with ``flip``) and then mixed (``mixup_alpha``: the
    Beta parameter, ``None`` for none; one pairing for all inputs of the batch). Inputs that are not
    float tensors pass through unchanged."""

    def __init__(self, augment: Union[bool, None, Callable[[Tensor], Tensor]] = None,
                 mixup_alpha: Optional[float] = None, flip: bool = True):
        self.augment, self.mixup_alpha, self.flip = augment, mixup_alpha, flip

    def __call__(self, args: Sequence[Any]) -> Tuple[Any, ...]:
        if self.augment is True:  # resolved on the first batch: the augmentation for its size
            self.augment = augmentation_for(tuple(args), flip=self.flip)
        with torch.no_grad():
            out = [self.augment(a) if self.augment and _image(a) else a for a in args]
            if self.mixup_alpha:
                n = next((a.shape[0] for a in out if _batched_float(a)), 0)
                if n > 1:
                    partner = torch.randperm(n)
                    weight = torch.distributions.Beta(float(self.mixup_alpha), float(self.mixup_alpha)).sample((n,))
                    out = [mixup(a, self.mixup_alpha, partner.to(a.device), weight) if _batched_float(a) and
                           a.shape[0] == n else a for a in out]
        return tuple(out)

    def __repr__(self) -> str:
        return f"SharedView(augment={self.augment!r}, mixup_alpha={self.mixup_alpha!r})"


def _image(a: Any) -> bool:
    return isinstance(a, Tensor) and a.dim() == 4 and a.is_floating_point()


def _batched_float(a: Any) -> bool:
    return isinstance(a, Tensor) and a.dim() >= 1 and a.is_floating_point()


AugmentArgument = Union[bool, None, Callable[[Tensor], Tensor]]
