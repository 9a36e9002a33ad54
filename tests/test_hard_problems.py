"""Hard nonlinear least squares (NIST StRD, certified answers) against MINPACK via scipy.

Every problem from both of NIST's standard starts, float64, batchfit's defaults against
``scipy.optimize.least_squares(method="lm")``'s: batchfit solves at least as many, reaches at
least scipy's digits wherever both solve, and never reports ``ok`` on a wrong answer. The
table is ``docs/hard-problems.md`` (``benchmarks/hard_problems.py``).
"""

import numpy as np
import pytest
from zoo import load_benchmark

hard = load_benchmark("hard_problems")
# The zoo fits 52 hard problems from far starts: a minute on 2 cores, so it is in the full
# suite (README's test command), not the everyday tier.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows():
    return hard.compare()


def test_the_zoo_is_big_enough(rows):
    assert len(hard.PROBLEMS) >= 20 and len(rows) == 2 * len(hard.PROBLEMS)


def test_batchfit_solves_at_least_as_many_as_minpack(rows):
    ours = [(r["problem"], r["start"]) for r in rows if r["batchfit"].solved]
    theirs = [(r["problem"], r["start"]) for r in rows if r["scipy"].solved]
    assert len(ours) >= len(theirs), sorted(set(theirs) - set(ours))


def test_at_least_minpacks_digits_where_both_solve(rows):
    short = [(r["problem"], r["start"], r["batchfit"].digits, r["scipy"].digits)
             for r in rows if r["batchfit"].solved and r["scipy"].solved
             and r["batchfit"].digits < r["scipy"].digits]
    assert not short


def test_never_ok_on_a_wrong_answer(rows):
    wrong = [(r["problem"], r["start"], r["batchfit"].digits) for r in rows
             if r["batchfit"].status == "ok" and not r["batchfit"].solved]
    assert not wrong


def test_digits_are_measured_against_the_certified_values():
    problem = hard.load("Misra1a")
    assert problem.certified[0] == pytest.approx(2.3894212918e02, rel=1e-12)
    assert len(problem.x) == 14 and tuple(problem.starts[0]) == (500, 1e-4)
    assert hard.digits(problem.certified * (1 + 1e-6), problem.certified) == pytest.approx(6)
    assert hard.digits(np.full(2, np.nan), problem.certified) == 0


@pytest.mark.parametrize("name", ["Misra1a", "BoxBOD", "Eckerle4"])
def test_many_noisy_copies_in_one_call(name):
    """1,000 noisy copies from the far start, in one call: no series that is not ``ok`` is
    in fact at its optimum (the statuses do not undersell), restarts never lose a fit, and
    (for the two well-behaved problems) every ``ok`` is at the optimum."""
    plain = hard.batched(name, copies=1000)
    rescued = hard.batched(name, copies=1000, restarts=4)
    for result in (plain, rescued):
        assert result["other_near"] == 0, result
    assert rescued["ok_near"] >= plain["ok_near"]
    if name != "Eckerle4":  # (its far start leaves some fits on a plateau: docs/hard-problems.md)
        assert plain["ok_far"] == rescued["ok_far"] == 0, (plain, rescued)
        # (measured here: 1000 and 994; the margin is for another CPU's rounding)
        assert rescued["ok_near"] >= 980, rescued
