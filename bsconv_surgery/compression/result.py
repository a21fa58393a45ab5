"""``CompressResult``: the compressed model, how close it stays to the original, and what each stage did."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from torch import nn

from ..conversion.result import ConversionResult
from ..core.records import ConversionReport

__all__ = ["CompressResult", "TARGET_AGREEMENT", "POINTS"]

#: The agreement with the original, on the held-out split, that ``compress`` aims for.
TARGET_AGREEMENT = 0.99
#: The three points where the held-out fidelity is measured, in order.
POINTS = ("zero_shot", "recalibrated", "distilled")


@dataclass
class CompressResult:
    """What ``compress`` did. ``conversion``: the ``ConversionResult`` of the kept weights (its
    ``model``, ``report``; ``save`` writes what ``convert --out`` writes); ``fidelity``: the
    held-out fidelity (``measure_fidelity``'s numbers: ``top1_agreement``, ``kl_divergence``,
    ``relative_logit_error``, per-output errors, accuracies with labels) at each of ``POINTS``
    (``recalibrated`` is ``None`` without BatchNorms); ``kept``: the point whose weights the model
    has (distillation that ends worse than before is not kept); ``split``, ``selection``,
    ``stages`` (one record per distillation stage), ``speed`` (``benchmark``, batch 1),
    ``export``, ``notes`` and ``seconds`` per stage.

    >>> import torch, bsconv_surgery as bs
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
    ...                           torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    >>> _ = net(torch.randn(1, 3, 8, 8))
    >>> result = bs.compress(net, [torch.randn(16, 3, 8, 8) for _ in range(4)], target_macs=0.6, steps=0,
    ...                      example_inputs=(3, 8, 8), speed_check=False)
    >>> result.kept, result.fidelity["recalibrated"], result.split["holdout"], result.split["unit"]
    ('zero_shot', None, 13, 'samples')
    """

    conversion: ConversionResult
    fidelity: Dict[str, Optional[Dict[str, Any]]]
    kept: str
    split: Dict[str, Any]
    selection: Dict[str, Any]
    stages: List[Dict[str, Any]]
    progressive: int
    steps: int
    speed: Optional[Dict[str, Any]] = None
    export: Optional[Dict[str, Any]] = None
    notes: List[str] = field(default_factory=list)
    seconds: Dict[str, float] = field(default_factory=dict)
    out: Optional[str] = None
    resumed: bool = False

    @property
    def model(self) -> nn.Module:
        return self.conversion.model

    @property
    def report(self) -> ConversionReport:
        return self.conversion.report

    @property
    def final(self) -> Dict[str, Any]:
        """The held-out fidelity of the kept weights."""
        return self.fidelity[self.kept]

    @property
    def agreement(self) -> Optional[float]:
        return self.final.get("top1_agreement")

    @property
    def target_met(self) -> bool:
        return self.agreement is not None and self.agreement >= TARGET_AGREEMENT

    def save(self, out_dir: Union[str, Path], force: bool = False) -> Path:
        """``ConversionResult.save``: ``model.safetensors`` + ``surgery.json`` (``load_converted``)."""
        return self.conversion.save(out_dir, force=force)

    def to_json(self) -> Dict[str, Any]:
        report = self.report
        return {
            "model": report.model,
            "out": self.out,
            "params": {"before": report.params_before, "after": report.params_after},
            "macs": {"before": report.macs_before, "after": report.macs_after},
            "sites": [r.name for r in report.replaced],
            "split": dict(self.split),
            "selection": self.selection,
            "progressive": self.progressive,
            "steps": self.steps,
            "stages": list(self.stages),
            "fidelity": {point: self.fidelity.get(point) for point in POINTS},
            "kept": self.kept,
            "target_agreement": TARGET_AGREEMENT,
            "target_met": self.target_met,
            "speed": self.speed,
            "export": self.export,
            "notes": list(self.notes),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
            "resumed": self.resumed,
        }
