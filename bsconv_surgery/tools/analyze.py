"""Intra-kernel correlation analysis (paper 3.1, Fig. 3): ``bsconv-surgery analyze``.

For every filter ``F(n)`` (``M x K x K``) of every standard conv (groups 1, kernel > 1; the convs
the surgery replaces) the ``M`` slices are ``M`` samples of dimension ``K^2``; PCA on them gives
the share of their variance explained by the first principal component (``pc1``). PCA centres
the samples first, so a filter whose slices are all scaled copies of one blueprint has
``pc1 = 1``. With ``M`` samples the centred matrix has rank at most ``M - 1``, so for ``M <= 2``
``pc1`` is trivially 1; a filter whose slices are all equal has no variance and no ``pc1``
(counted as ``undefined``, left out of histograms and means).

Next to it, ``svd_energy_kept`` is the uncentred counterpart: the share of the filters' energy
(squared Frobenius norm) that their best rank-1 approximation keeps, summed over a stage. That
is exactly what ``convert --init svd`` keeps of those convs (``energy_kept`` in its report).

Filters are grouped by stage as ``compare`` groups its budgets (``stages.model_stages``: timm
feature stages where the model has them, else top-level children; ``head`` after the last).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch
from torch import nn

from ..core.errors import SurgeryError
from ..fx.discovery import conv_kind, is_conv
from ..passes.initializers import filter_rank1
from ..io.files import atomic_file
from ..io.plots import check_plot_path
from ..models.checkpoints import check_finite
from ..analysis.stages import HEAD, Stage, model_stages

__all__ = ["pc1_shares", "ConvStats", "StageStats", "Analysis", "analyze", "check_plot_path", "write_plot", "BINS"]

BINS = 20  # histogram bins over [0, 1] in the JSON and the PNG; the terminal merges pairs
_UNDEFINED_TOL = 1e-10  # centred variance below this share of the filter's energy: no PCA


def pc1_shares(weight: torch.Tensor) -> torch.Tensor:
    """PC1 share of each filter of a ``(N, M, *kernel)`` kernel (1-D, 2-D or 3-D: samples of dimension
    ``prod(kernel)``), ``NaN`` where undefined (float64)."""
    n, m = weight.shape[:2]
    a = weight.detach().to(torch.float64).reshape(n, m, -1)
    centred = a - a.mean(dim=1, keepdim=True)
    var = torch.linalg.svdvals(centred).square()
    total = var.sum(1)
    defined = total > _UNDEFINED_TOL * a.square().sum((1, 2))
    share = var[:, 0] / total.clamp_min(1e-300)
    return torch.where(defined, share, torch.full_like(share, float("nan")))


@dataclass
class ConvStats:
    name: str
    stage: str
    in_channels: int
    out_channels: int
    kernel: List[int]
    pc1: torch.Tensor  # (N,), NaN where undefined
    energy: float  # sum of the filters' squared norms
    rank1_energy: float  # what their rank-1 approximations keep

    def to_json(self) -> Dict[str, Any]:
        defined = self.pc1[~self.pc1.isnan()]
        return {
            "name": self.name,
            "stage": self.stage,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel": self.kernel,
            "filters": int(self.pc1.numel()),
            "undefined": int(self.pc1.numel() - defined.numel()),
            "pc1_mean": float(defined.mean()) if defined.numel() else None,
            "pc1_min": float(defined.min()) if defined.numel() else None,
            "svd_energy_kept": self.rank1_energy / self.energy if self.energy > 0 else 1.0,
        }


@dataclass
class StageStats:
    name: str
    convs: List[ConvStats] = field(default_factory=list)

    @property
    def values(self) -> torch.Tensor:
        """The defined PC1 shares of all filters of the stage."""
        allv = torch.cat([c.pc1 for c in self.convs]) if self.convs else torch.zeros(0, dtype=torch.float64)
        return allv[~allv.isnan()]

    @property
    def filters(self) -> int:
        return sum(int(c.pc1.numel()) for c in self.convs)

    def histogram(self, bins: int = BINS) -> List[int]:
        v = self.values
        if not v.numel():
            return [0] * bins
        return torch.histc(v.clamp(0, 1), bins=bins, min=0.0, max=1.0).to(torch.int64).tolist()

    def to_json(self) -> Dict[str, Any]:
        v = self.values
        energy = sum(c.energy for c in self.convs)
        return {
            "name": self.name,
            "convs": len(self.convs),
            "filters": self.filters,
            "undefined": self.filters - int(v.numel()),
            "pc1_mean": float(v.mean()) if v.numel() else None,
            "pc1_median": float(v.median()) if v.numel() else None,
            "svd_energy_kept": sum(c.rank1_energy for c in self.convs) / energy if energy > 0 else None,
            "histogram": {"edges": [i / BINS for i in range(BINS + 1)], "counts": self.histogram()},
        }


@dataclass
class Analysis:
    model: str
    stages: List[StageStats]

    @property
    def convs(self) -> List[ConvStats]:
        return [c for s in self.stages for c in s.convs]

    def overall(self) -> StageStats:
        return StageStats("all", self.convs)

    def to_json(self) -> Dict[str, Any]:
        overall = self.overall().to_json()
        overall.pop("name")
        return {
            "model": self.model,
            "statistic": "share of each filter's variance across its M slices explained by PC1 (paper 3.1, Fig. 3)",
            "overall": overall,
            "stages": [s.to_json() for s in self.stages],
            "convs": [c.to_json() for c in self.convs],
        }


def _row_of(name: str, rows: List[Stage]) -> str:
    """The ``model_stages`` row that covers module ``name`` (its stage module or an ``also`` module)."""
    for row in rows:
        if any(name == root or name.startswith(root + ".") for root in (row.name, *row.also)):
            return row.name
    return HEAD


def analyze(model: nn.Module, label: Optional[str] = None) -> Analysis:
    """PC1 shares of every standard conv of ``model``, grouped by stage (empty stages left out)."""
    rows = model_stages(model)
    stage_names = [row.name for row in rows]
    stages: Dict[str, StageStats] = {}
    check_finite({f"{name}.weight": m.weight for name, m in model.named_modules()
                  if isinstance(m, nn.Conv2d) and conv_kind(m) == "standard"},
                 f"The model {label or type(model).__name__}")
    for name, module in model.named_modules():
        if not is_conv(module) or conv_kind(module) != "standard":
            continue
        r = filter_rank1(module.weight)
        stage = _row_of(name, rows)
        stages.setdefault(stage, StageStats(stage)).convs.append(ConvStats(
            name, stage, module.in_channels, module.out_channels, list(module.kernel_size),
            pc1_shares(module.weight), float(r.energy.sum()), float(r.sigma.square().sum()),
        ))
    order = {n: i for i, n in enumerate(stage_names)}
    ordered = sorted(stages.values(), key=lambda s: order.get(s.name, len(order)))
    if not ordered:
        raise SurgeryError(f"{label or type(model).__name__} has no standard convolution (groups 1, kernel > 1) to analyze.")
    return Analysis(label or type(model).__name__, ordered)


# ---------------------------------------------------------------------------------------------
# the PNG
# ---------------------------------------------------------------------------------------------


def write_plot(analysis: Analysis, path: Union[str, Path], force: bool = False) -> Path:
    """Per-stage histograms of the PC1 shares (share of the stage's filters per bin), with each
    stage's mean in the legend and as a dashed line; written atomically (temporary file, rename)."""
    # matplotlib: the optional 'plot' extra (check_plot_path said so if it is missing)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = check_plot_path(path, force)
    fig = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    edges = [i / BINS for i in range(BINS + 1)]
    for i, stage in enumerate(analysis.stages):
        v = stage.values
        if not v.numel():
            continue
        color = f"C{i % 10}"
        weights = [1.0 / v.numel()] * v.numel()
        mean = float(v.mean())
        ax.hist(v.tolist(), bins=edges, weights=weights, histtype="step", linewidth=1.8, color=color,
                label=f"{stage.name} (mean {mean:.2f}, {v.numel()} filters)")
        ax.axvline(mean, color=color, linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("variance explained by PC1 (per filter)")
    ax.set_ylabel("share of the stage's filters")
    ax.set_title(f"{analysis.model}: intra-kernel correlations (BSConv paper, Fig. 3)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
