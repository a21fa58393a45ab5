"""Budget targets (``convert --target-macs R`` / ``--target-params R``) and the choice of sites
that reaches them with the least measured loss.

A target is a fraction of the original's count (``0.5``: at most half; ``0 < R <= 1``) or an
absolute count with an optional ``K``/``M``/``G`` suffix (``300M``, ``2.5M``, ``120000``).

**The choice** is a 0/1 covering knapsack: every candidate site ``i`` has a loss ``c_i >= 0``
(its measured fidelity loss when converted alone, or the filter energy it loses without
calibration data) and saves ``s_ik`` of each budgeted quantity ``k`` (MACs, params); the chosen
set minimises ``sum c_i`` subject to ``sum s_ik >= need_k`` for every target. ``choose_sites``
solves it exactly by depth-first branch and bound: sites in order of loss per unit saved, a
lower bound from the fractional (LP) relaxation of each target on the sites not yet decided,
and a greedy start as the first incumbent. Sites the budget does not need are then dropped,
costliest first (a site with zero measured loss is converted only when the budget needs it).
Candidates are few (tens), so it finishes in milliseconds; past ``node_limit`` nodes it stops and
returns the greedy choice (loss per unit saved, then the same pruning), marked ``exact=False``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from ..core.bounds import MAX_INT, MAX_TEXT, bounded_number, shown
from ..core.errors import SurgeryError

__all__ = ["Target", "parse_target", "check_target", "Choice", "choose_sites"]

_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}
_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([kKmMgG]?)\s*$")


@dataclass(frozen=True)
class Target:
    """A budget on ``metric`` (``macs`` or ``params``): ``fraction`` of the original, or ``count``."""

    metric: str
    text: str
    fraction: Optional[float] = None
    count: Optional[int] = None

    def limit(self, total: float) -> float:
        """The most ``metric`` the converted model may have, given the original's ``total``."""
        return self.fraction * total if self.fraction is not None else float(self.count)

    def to_json(self) -> Dict[str, object]:
        out: Dict[str, object] = {"metric": self.metric, "asked": self.text}
        if self.fraction is not None:
            out["fraction"] = self.fraction
        else:
            out["count"] = self.count
        return out


def parse_target(value, metric: str) -> Target:
    """``0.5`` -> half of the original; ``300M`` / ``2.5M`` / ``120000`` -> an absolute count (text or a
    number; ``bounds.py`` refuses inf, NaN and numbers too large)."""
    name = f"target_{metric}"

    def bad(why: str) -> SurgeryError:
        return SurgeryError(f"Bad {name} {shown(value)}: {why}; expected a fraction of the original in (0, 1] such "
                            "as 0.5, or a count such as 300M, 2.5M or 120000.", argument=name)

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, suffix, text = value, "", repr(value)
    else:
        text = str(value).strip()
        match = _COUNT.match(text) if len(text) <= MAX_TEXT and not isinstance(value, bool) else None
        if match is None:
            raise bad("not a number" if len(text) <= MAX_TEXT else "too long")
        number, suffix = match.group(1), match.group(2).upper()
    try:
        number = bounded_number(number, name, low=0, low_open=True)
    except SurgeryError as exc:
        raise bad(str(exc).rsplit("(", 1)[-1].rstrip(".)")) from None
    if not suffix and number <= 1:
        return Target(metric, text, fraction=number)
    count = number * _SUFFIX[suffix]
    if count > MAX_INT:
        raise bad("too large")
    if count < 1 or (not suffix and count != int(count)):
        raise bad("a fraction must lie in (0, 1] and a count must be a positive whole number (or carry a K, M or G "
                  "suffix, such as 2.5M)")
    return Target(metric, text, count=int(round(count)))


def check_target(target: Any) -> Any:
    """A ``core.options.Target`` whose every budget parses (``parse_target``), returned as it is."""
    for metric, value in target.metrics():
        parse_target(value, metric)
    return target


@dataclass
class Choice:
    """The chosen indices, their summed loss, and whether the optimum was proven (``exact``)."""

    chosen: List[int]
    loss: float
    exact: bool
    nodes: int


class _Stop(Exception):
    pass


def _prune(chosen: List[int], costs: Sequence[float], savings: Sequence[Sequence[float]],
           needs: Sequence[float]) -> List[int]:
    """Drop chosen sites the targets do not need, costliest first."""
    chosen = list(chosen)
    for i in sorted(chosen, key=lambda j: (-costs[j], j)):
        rest = [j for j in chosen if j != i]
        if all(sum(s[j] for j in rest) >= need for s, need in zip(savings, needs)):
            chosen = rest
    return sorted(chosen)


def choose_sites(costs: Sequence[float], savings: Sequence[Sequence[float]], needs: Sequence[float],
                 node_limit: int = 500_000) -> Optional[Choice]:
    """Minimise ``sum costs[i]`` over subsets whose ``sum savings[k][i] >= needs[k]`` for every
    ``k`` (see the module docstring); ``None`` when no subset reaches the targets."""
    n, targets = len(costs), len(needs)
    if any(c < 0 or math.isnan(c) for c in costs):
        raise ValueError("site losses must be non-negative numbers")
    if all(need <= 0 for need in needs):
        return Choice([], 0.0, True, 0)
    useful = [i for i in range(n) if any(s[i] > 0 for s in savings)]
    if any(sum(max(s[i], 0) for i in useful) < need for s, need in zip(savings, needs)):
        return None
    scale = [max(need, 1e-300) for need in needs]

    def weight(i: int) -> float:  # loss per unit of the (normalised) savings it brings
        gain = sum(max(s[i], 0) / sc for s, sc in zip(savings, scale))
        return costs[i] / gain if gain > 0 else math.inf

    order = sorted(useful, key=lambda i: (weight(i), i))
    rank = {i: r for r, i in enumerate(order)}
    by_ratio = [sorted((i for i in useful if s[i] > 0), key=lambda i, s=s: (costs[i] / s[i], i)) for s in savings]

    greedy, got = [], [0.0] * targets
    for i in order:
        if all(g >= need for g, need in zip(got, needs)):
            break
        greedy.append(i)
        got = [g + s[i] for g, s in zip(got, savings)]
    greedy = _prune(greedy, costs, savings, needs)
    best = {"cost": sum(costs[i] for i in greedy), "set": greedy}
    nodes = 0

    def bound(pos: int, got: List[float]) -> float:
        """A lower bound on the loss still to add with the sites from ``pos`` on (LP relaxation of
        each target alone; the largest of them)."""
        low = 0.0
        for k in range(targets):
            need = needs[k] - got[k]
            if need <= 0:
                continue
            cost = 0.0
            for i in by_ratio[k]:
                if rank[i] < pos:
                    continue
                s = savings[k][i]
                if s >= need:
                    cost += costs[i] * need / s
                    need = 0.0
                    break
                cost += costs[i]
                need -= s
            if need > 0:
                return math.inf
            low = max(low, cost)
        return low

    def search(pos: int, got: List[float], cost: float, chosen: List[int]) -> None:
        nonlocal nodes
        nodes += 1
        if nodes > node_limit:
            raise _Stop
        if all(g >= need for g, need in zip(got, needs)):
            if cost < best["cost"] - 1e-12 * max(1.0, abs(best["cost"])):
                best["cost"], best["set"] = cost, list(chosen)
            return
        if pos == len(order) or cost + bound(pos, got) >= best["cost"] - 1e-12 * max(1.0, abs(best["cost"])):
            return
        i = order[pos]
        chosen.append(i)
        search(pos + 1, [g + s[i] for g, s in zip(got, savings)], cost + costs[i], chosen)
        chosen.pop()
        search(pos + 1, got, cost, chosen)

    try:
        search(0, [0.0] * targets, 0.0, [])
        exact = True
    except _Stop:
        exact = False
    chosen = _prune(best["set"], costs, savings, needs)
    return Choice(chosen, sum(costs[i] for i in chosen), exact, nodes)
