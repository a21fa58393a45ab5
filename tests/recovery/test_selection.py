"""Budget targets and the exact covering knapsack (``selection.py``, issue 15)."""

import itertools
import random

import pytest

from bsconv_surgery import SurgeryError
from bsconv_surgery.recovery.selection import choose_sites, parse_target


@pytest.mark.parametrize("text, fraction, count", [
    ("0.5", 0.5, None), ("1", 1.0, None), (" 0.25 ", 0.25, None), ("300M", None, 300_000_000),
    ("2.5M", None, 2_500_000), ("120000", None, 120_000), ("1.2G", None, 1_200_000_000), ("40k", None, 40_000),
])
def test_budget_strings(text, fraction, count):
    target = parse_target(text, "macs")
    assert (target.fraction, target.count) == (fraction, count)
    assert target.limit(1000) == (fraction * 1000 if fraction is not None else count)


@pytest.mark.parametrize("text", ["0", "-1", "1.5", "abc", "0.3X", "", "0.5M5", "1e400", "9" * 5000, "inf", "nan",
                                  "9" * 30, 1e400, 10**400, float("nan"), -0.5, True, None])
def test_bad_budget_values_name_the_argument(text):
    """Text or numbers (the Python API): inf, NaN, 5000 digits, bool are one clear error, never OverflowError."""
    with pytest.raises(SurgeryError, match=r"^Bad target_params .{1,60}: .*; expected a fraction") as error:
        parse_target(text, "params")
    assert error.value.argument == "target_params" and len(str(error.value)) < 300


def _brute_force(costs, savings, needs):
    best = None
    for r in range(len(costs) + 1):
        for subset in itertools.combinations(range(len(costs)), r):
            if all(sum(s[i] for i in subset) >= need for s, need in zip(savings, needs)):
                cost = sum(costs[i] for i in subset)
                best = cost if best is None or cost < best else best
    return best


@pytest.mark.parametrize("seed", range(40))
def test_the_choice_is_optimal_and_meets_the_budget(seed):
    rng = random.Random(seed)
    n, targets = rng.randint(1, 11), rng.choice([1, 2])
    costs = [rng.random() * (rng.random() < 0.85) for _ in range(n)]
    savings = [[rng.randint(-5, 30) for _ in range(n)] for _ in range(targets)]
    needs = [rng.randint(0, 80) for _ in range(targets)]
    choice, best = choose_sites(costs, savings, needs), _brute_force(costs, savings, needs)
    if best is None:
        assert choice is None
        return
    assert choice.exact and choice.loss == pytest.approx(best, abs=1e-12)
    assert all(sum(s[i] for i in choice.chosen) >= need for s, need in zip(savings, needs))
    # minimal: no chosen site can go without breaking the budget
    for i in choice.chosen:
        rest = [j for j in choice.chosen if j != i]
        assert not all(sum(s[j] for j in rest) >= need for s, need in zip(savings, needs))


def test_free_sites_are_converted_only_when_the_budget_needs_them():
    # site 0 costs nothing but the budget is met by site 1 alone, which is cheaper than 0 + 2
    choice = choose_sites([0.0, 0.2, 0.3], [[5, 10, 6]], [10])
    assert choice.chosen == [1]
    assert choose_sites([0.0, 0.2], [[5, 10]], [4]).chosen == [0]


def test_unreachable_and_empty_budgets():
    assert choose_sites([0.1, 0.2], [[3, 4]], [8]) is None
    assert choose_sites([0.1], [[3]], [0]).chosen == []


def test_a_large_problem_is_solved_quickly_or_falls_back():
    rng = random.Random(0)
    costs = [rng.random() for _ in range(80)]
    savings = [[rng.randint(1, 1000) for _ in range(80)]]
    choice = choose_sites(costs, savings, [sum(savings[0]) / 2])
    assert choice.exact and sum(savings[0][i] for i in choice.chosen) >= sum(savings[0]) / 2
    capped = choose_sites(costs, savings, [sum(savings[0]) / 2], node_limit=5)
    assert not capped.exact and sum(savings[0][i] for i in capped.chosen) >= sum(savings[0]) / 2
    assert capped.loss >= choice.loss - 1e-12
