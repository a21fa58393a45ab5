"""Progressive conversion: the chosen sites converted in ``k`` stages, with distillation between
them (as MUSCO compresses a part, recovers, then compresses the next).

The budget's sites are chosen once, for the final target (``select_for_targets``); they are then
ordered by their measured loss per unit saved (cheapest first) and cut into ``k`` consecutive
groups of about equal savings, so the cumulative budget reaches the target at the last stage.
Stage ``j`` converts group ``j`` of the student (``--init svd`` from the student's current, already
distilled weights), re-estimates its BatchNorm statistics and distils it from the original for its
share of the steps (``split_steps``). ``k = 1`` is one-shot conversion.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

from ..core.bounds import bounded_number
from ..core.errors import SurgeryError

__all__ = ["stage_groups", "split_steps", "check_stages", "MAX_STAGES"]

MAX_STAGES = 16


def check_stages(stages: Any) -> int:
    return int(bounded_number(stages, "progressive", integer=True, low=1, high=MAX_STAGES))


def _per_unit(row: Dict[str, Any], metric: str) -> float:
    saved = row.get(f"{metric}_saved") or 0
    return row["loss"] / saved if saved > 0 else math.inf


def stage_groups(selection: Dict[str, Any], sites: Sequence[str], stages: int) -> List[List[str]]:
    """``sites`` (the selection's, in network order) in at most ``stages`` groups: the chosen ones
    by loss per unit saved of the first target's metric (cheapest first), cut where their
    cumulative savings pass ``j / stages`` of the total; sites that keep the computation (chosen by
    no budget) go with the first group. Fewer sites than stages: one site per stage."""
    chosen = selection.get("chosen") or []
    if not chosen:
        raise SurgeryError("The budget chose no site to convert; there is nothing to compress progressively.")
    metric = selection["targets"][0]["metric"]
    order = sorted(chosen, key=lambda row: (_per_unit(row, metric), row["name"]))
    total = sum(max(row.get(f"{metric}_saved") or 0, 0) for row in order) or 1
    count = min(stages, len(order))
    groups: List[List[str]] = [[] for _ in range(count)]
    done = 0.0
    for i, row in enumerate(order):
        left = len(order) - i
        stage = min(count - 1, int(done / total * count + 1e-9))
        stage = max(stage, count - left)  # every later stage still gets a site
        groups[stage].append(row["name"])
        done += max(row.get(f"{metric}_saved") or 0, 0)
    kept = [name for name in sites if name not in {row["name"] for row in chosen}]
    groups[0] = kept + groups[0]
    return [g for g in groups if g]


def split_steps(steps: int, stages: int) -> List[int]:
    """``steps`` in ``stages`` shares as equal as can be (the later stages get the remainder)."""
    base, extra = divmod(steps, stages)
    return [base + (1 if j >= stages - extra else 0) for j in range(stages)]
