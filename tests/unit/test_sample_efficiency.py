"""benchmarks/sample_efficiency.py's headline arithmetic: where the recipe's val loss falls to the baseline's final
one, interpolated linearly in log(tokens), and what it says when its budgets do not bracket that loss."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from sample_efficiency import bracket_text, crossing  # noqa: E402

BUDGETS = [(1.0, 4.10), (0.125, 4.7155), (0.5, 4.25), (0.25, 4.4192)]  # unsorted on purpose


def test_the_crossing_is_linear_in_log_tokens_between_the_bracketing_budgets() -> None:
    target = 4.5046
    t = (4.7155 - target) / (4.7155 - 4.4192)
    expected = math.exp(math.log(0.125) + t * (math.log(0.25) - math.log(0.125)))
    assert crossing(BUDGETS, target) == pytest.approx(expected, rel=1e-12)
    assert 0.125 < expected < 0.25
    assert bracket_text(BUDGETS, target, crossing(BUDGETS, target)) == f"{expected:.3f}"


def test_an_exact_hit_on_a_budget_is_that_budget() -> None:
    assert crossing(BUDGETS, 4.25) == pytest.approx(0.5, rel=1e-12)


def test_budgets_that_do_not_bracket_the_target_give_a_bound_not_a_number() -> None:
    below_everywhere = 4.9  # the smallest budget already beats it
    assert crossing(BUDGETS, below_everywhere) is None
    assert bracket_text(BUDGETS, below_everywhere, None).startswith("< 0.125")
    never = 4.0  # not even the full budget reaches it
    assert crossing(BUDGETS, never) is None
    assert bracket_text(BUDGETS, never, None) == "> 1"
    assert bracket_text([], never, None) == "n/a"
