"""The rows of a per-stage breakdown (``compare``, ``analyze``): a model's stages and what each
counts.

Stages are timm's feature stages (``model.feature_info``) where the model has them, else its
top-level children. A stage owns every module registered after the previous stage, up to the
end of its own module (so a stem's input norm belongs to the stem, a pooling layer between two
stages to the later one); what comes after the last stage is ``head``. Per-stage MACs come from
fvcore's per-module counts (``Budget.by_module``), so the stages add up to the total exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from .counting import Budget

__all__ = ["HEAD", "MODEL_OPS", "Stage", "model_stages", "stage_budgets"]

HEAD = "head"
MODEL_OPS = "(top level)"


@dataclass(frozen=True)
class Stage:
    """A row of the per-stage breakdown, named after its module. ``also`` lists the other
    modules with parameters that the row covers (registered between the previous stage and this
    one, e.g. the stem's input norm). ``head`` is what follows the last stage; ``(top level)``
    holds parameters registered on the model itself and the operators of its own forward."""

    name: str
    reduction: Optional[int] = None
    channels: Optional[int] = None
    also: Tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if not self.also:
            return self.name
        return f"{self.name} ({', '.join(self.also)})" if self.name == HEAD else f"{self.name} (+{', '.join(self.also)})"


def _feature_entries(model: nn.Module) -> List[dict]:
    info = getattr(model, "feature_info", None)
    if isinstance(info, (list, tuple)):
        return [dict(e) for e in info if isinstance(e, dict)]
    if info is not None and hasattr(info, "info"):  # timm FeatureInfo
        return [dict(e) for e in info.info]
    return []


def _boundaries(model: nn.Module, names: List[str]) -> List[Stage]:
    """timm feature stages when ``feature_info`` names modules of this model, else top-level children."""
    known = set(names)
    entries = [e for e in _feature_entries(model) if e.get("module")]
    if entries and all(e["module"] in known for e in entries):
        first: Dict[str, Stage] = {}
        for e in entries:  # one row per module, in registration order
            first.setdefault(e["module"], Stage(e["module"], e.get("reduction"), e.get("num_chs")))
        order = {n: i for i, n in enumerate(names)}
        return sorted(first.values(), key=lambda st: order[st.name])
    return [Stage(name) for name, _ in model.named_children()]


def _owners(names: List[str], boundaries: Sequence[Stage]) -> Dict[str, str]:
    """Qualified module name -> row name. A stage owns every module registered after the previous
    stage's last module, up to its own last module; later modules belong to ``head``."""
    ends: List[Tuple[int, str]] = []
    for stage in boundaries:
        inside = [i for i, n in enumerate(names) if n == stage.name or n.startswith(stage.name + ".")]
        ends.append((max(inside) if inside else (ends[-1][0] if ends else 0), stage.name))
    owners = {"": MODEL_OPS}
    for i, name in enumerate(names):
        if name:
            owners[name] = next((stage for end, stage in ends if i <= end), HEAD)
    return owners


def model_stages(model: nn.Module) -> List[Stage]:
    """The breakdown rows of ``model``: its stages, then ``head`` and ``(top level)``."""
    names = [name for name, _ in model.named_modules()]
    boundaries = _boundaries(model, names)
    owners = _owners(names, boundaries)
    modules = dict(model.named_modules())
    inside = {st.name for st in boundaries}
    containers = {n.rsplit(".", i)[0] for st in boundaries for n in [st.name] for i in range(1, n.count(".") + 1)}
    also: Dict[str, List[str]] = {}
    for name in names:
        if not name or name in containers or any(name == b or name.startswith(b + ".") for b in inside):
            continue
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        if parent and parent not in containers:
            continue  # only the outermost module of a covered subtree is named
        if any(True for _ in modules[name].parameters()):
            also.setdefault(owners[name], []).append(name)
    rows = [Stage(st.name, st.reduction, st.channels, tuple(also.get(st.name, ()))) for st in boundaries]
    return rows + [Stage(HEAD, also=tuple(also.get(HEAD, ()))), Stage(MODEL_OPS)]


def stage_budgets(model: nn.Module, budget: Budget, stages: Sequence[Stage]) -> Dict[str, Tuple[int, Optional[int]]]:
    """Row name -> (params, MACs) of ``model`` for the rows ``model_stages`` gave (on this model
    or on the model it was converted from: the surgery keeps qualified names). The rows sum to
    ``budget.params`` / ``budget.macs``.

    Parameters belong to the module that registers them; a module's own MACs are fvcore's count
    for it minus its children's (the work of its own forward, e.g. a functional pooling).
    """
    names = [name for name, _ in model.named_modules()]
    owners = _owners(names, [st for st in stages if st.name not in (HEAD, MODEL_OPS)])
    params: Dict[str, int] = {}
    macs: Dict[str, int] = {}
    seen = set()
    for name, module in model.named_modules():
        row = owners[name]
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                params[row] = params.get(row, 0) + p.numel()
        if budget.macs is not None:
            total = budget.by_module.get(name, 0)
            children = sum(budget.by_module.get(f"{name}.{c}" if name else c, 0) for c, _ in module.named_children())
            macs[row] = macs.get(row, 0) + total - children
    return {st.name: (params.get(st.name, 0), macs.get(st.name, 0) if budget.macs is not None else None) for st in stages}
