"""``ConversionResult``: the converted model and what was done to it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

from torch import nn

from ..core.options import SurgeryOptions
from ..core.records import ConversionReport, ModelSource
from ..io.saving import save_converted
from ..models.inputs import ExampleInputs

__all__ = ["ConversionResult"]


@dataclass
class ConversionResult:
    """``model`` is the user's own module with submodules swapped; ``report`` what was done;
    ``options`` the resolved options; ``source`` where the model came from (``None`` for a module
    given without a spec or weights); ``inputs`` how it is fed (its family and input size).

    >>> import torch, bsconv_surgery as bs
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3))
    >>> result = bs.convert(net, "u", example_inputs=torch.randn(1, 3, 16, 16))
    >>> result.report.params_before, result.report.params_after, result.input_size
    (2768, 624, (3, 16, 16))
    """

    model: nn.Module
    report: ConversionReport
    options: SurgeryOptions
    source: Optional[ModelSource]
    inputs: ExampleInputs

    @property
    def input_size(self) -> Tuple[int, ...]:
        return self.inputs.size

    @property
    def input_family(self) -> str:
        return self.inputs.name

    def save(self, out_dir: Union[str, Path], force: bool = False) -> Path:
        """Write ``model.safetensors`` and ``surgery.json`` to ``out_dir`` (atomic, see
        ``io/saving.py``); the report then names where it was saved (``saved_to``)."""
        path = save_converted(self, out_dir, force=force)
        self.report.saved_to = str(out_dir)
        return path
