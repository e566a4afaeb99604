"""Direct unit tests of the ``budget`` policy (``runtime/policies/budget.py``), driven by hand.

No model and no compile: a ``PolicyState`` and a stand-in for the cache history (the region
exit's compute steps, the run length) are driven step by step as the controller does, and the
policy's device state is checked against an independent Python model of its rule. The values
read from ``aux`` are the ones ``examples/estimate_vs_truth.py`` reads (by the module's column
names). Fast test subset of ``scripts/mutation_test.py`` for budget.py (with test_policies.py).
"""
import math

import numpy as np
import pytest
import torch

from foresight_compile import Options
from foresight_compile.runtime.policies import budget, get_policy
from foresight_compile.runtime.policies.base import FSQ, NSQ, PolicyState

BLOCKS = 4  # the region exit is block 3; the others carry values that must never be read


class _History:
    """Stand-in for ``CacheHistory``: the exit's compute steps (newest first), the last step
    that computed every block, the run of served steps since. The other blocks' rows hold
    steps that would change every estimate if they were read."""

    def __init__(self, slots: int = 2) -> None:
        self.num_blocks = BLOCKS
        self.steps = np.full((BLOCKS, slots), math.nan)
        self.steps[:-1] = -100.0
        self.all_computed_at = -1
        self.run = 0

    def record(self, step: int, computed: bool) -> None:
        if computed:
            self.steps[-1, 1:] = self.steps[-1, :-1].copy()
            self.steps[-1, 0] = step
            self.all_computed_at = step
            self.run = 0
        else:
            self.run += 1


def _policy(**options):
    return get_policy("budget")(Options(**options))


def _state() -> PolicyState:
    state = PolicyState.allocate(BLOCKS, torch.device("cpu"))
    state.storage[:-1, FSQ] = 1e6  # the other blocks' forecast errors (1000): never read
    return state


def _decide(policy, state) -> list[bool]:
    out = torch.zeros(BLOCKS, dtype=torch.bool)
    policy.decide(state, out)
    return out.tolist()


def _step(policy, state, history, step, computed, ferr=0.0, rho=0.0, norm=4.0, warmup=3,
          total=None) -> list[bool]:
    """One step as the controller runs it: the exit's forecast error (when every block
    computed), the executor's latent probe (rho = sqrt(diff / norm)), the history, observe."""
    if computed:
        state.storage[-1, FSQ] = ferr ** 2
        state.storage[-1, NSQ] = 1.0
    state.probe[0] = rho ** 2 * norm
    state.probe[1] = norm
    state.derive()
    history.record(step, computed)
    policy.observe(step, warmup, state, history, total)
    return _decide(policy, state)


def _aux(state, column) -> float:
    return float(state.aux[column])


# -- what the policy is -----------------------------------------------------------------------

def test_budget_is_step_level_and_needs_the_latent_change_not_the_metric():
    p = _policy()
    assert p.name == "budget" and p.needs_cache
    assert p.step_level and p.needs_latent_change and not p.needs_metric
    assert p.lookahead == 1 and _policy(lookahead=2).lookahead == 2


@pytest.mark.parametrize("order, power, warmup", [(0, 1, 2), (1, 2, 3), (2, 3, 4)])
def test_order_sets_the_error_power_and_the_default_warmup(order, power, warmup):
    p = _policy(order=order)
    assert (p.order, p.power, p.default_warmup) == (order, power, warmup)


# -- the host's forced computes: warm-up, tail, longest run ------------------------------------

def test_the_warmup_is_at_least_order_plus_two_steps():
    first = lambda p, warmup: [s for s in range(12) if p.computes_all(s, warmup, 100, run=0)]
    order1, order2, order0 = _policy(), _policy(order=2), _policy(order=0)
    # a shorter warmup than order + 2 is raised to it: the rate needs order + 2 computes
    assert first(order1, 0) == first(order1, 1) == first(order1, 3) == [0, 1, 2]
    assert first(order2, 0) == first(order2, 3) == [0, 1, 2, 3]
    assert first(order0, 0) == [0, 1]
    assert first(order1, 5) == first(order2, 5) == [0, 1, 2, 3, 4]  # a longer one stays
    # an unknown warmup (a fraction of an unknown length) computes everything
    assert all(order1.computes_all(s, None, total) for s in range(60) for total in (None, 50))


@pytest.mark.parametrize("total", [1, 10, 12, 20, 25, 30, 35, 50, 100])
def test_the_tail_is_the_last_two_steps(total):
    p = _policy()
    tail = 2
    assert p.tail(total) == tail == budget.BudgetReuse.tail(total)
    if total > 10:
        assert p.computes_all(total - tail, 3, total, run=0)
        assert not p.computes_all(total - tail - 1, 3, total, run=0)


@pytest.mark.parametrize("total, longest", [
    (None, 8), (4, 2), (10, 2), (12, 2), (20, 2), (28, 4), (30, 4), (50, 6), (100, 12)])
def test_the_longest_run_is_an_eighth_of_the_steps_and_at_least_two(total, longest):
    p = _policy()
    late = 10 ** 6  # past any first quarter
    assert p.max_run(total, late) == longest
    assert _policy(max_run=5).max_run(total, late) == 5  # the option wins
    step = 3  # after the warmup, before any tail
    if total is None or step < total - p.tail(total):
        assert p.computes_all(step, 3, total, run=longest)
        assert not p.computes_all(step, 3, total, run=longest - 1)
        # a run already past the longest (the length was revised down mid-generation) ends too
        assert p.computes_all(step, 3, total, run=longest + 1)


def test_no_run_given_means_no_step_served_since_the_last_compute():
    p = _policy(max_run=1)
    for step in (10, 20):  # in the first quarter too: max_run=1 is near exact
        assert not p.computes_all(step, 3, 50) and p.computes_all(step, 3, 50, run=1)


# -- the first quarter: the default's budget and run limit, unless the knob is near exact ------

def test_the_early_budget_constant_is_the_default_tolerance():
    assert budget.EARLY_TOLERANCE == Options().tolerance


@pytest.mark.parametrize("total, last_early", [(50, 12), (30, 7), (40, 9), (8, 1)])
def test_the_first_quarter_runs_the_default_budget_and_run_limit(total, last_early):
    p = _policy(tolerance=1.0, max_run=2)
    default_run = max(2, round(total / 8))
    for step in range(total):
        early = step <= last_early
        assert budget.early(step, total) == early, step
        assert p.tolerance_at(step, total) == (0.4 if early else 1.0), step
        assert p.max_run(total, step) == (default_run if early else 2), step
    # the run limit is enforced by computes_all at the step it decides
    if total > 10:
        assert not p.computes_all(last_early, 3, total, run=2)
        assert p.computes_all(last_early + 1, 3, total, run=2)
    # an unknown length has no first quarter: the options decide every step
    assert p.tolerance_at(0, None) == 1.0 and p.max_run(None, 0) == 2 and not budget.early(0, None)
    # max_run=1 holds everywhere
    assert all(_policy(max_run=1).max_run(total, step) == 1 for step in range(total))


@pytest.mark.parametrize("order, lookahead", [(1, 1), (1, 2), (2, 1), (2, 2)])
def test_the_defaults_decide_every_step_as_without_a_first_quarter(order, lookahead, monkeypatch):
    """At the default tolerance and run limit the first quarter changes no decision; at
    another tolerance it does (the comparison can fail)."""
    def both(tolerance):
        with_quarter = _drive(order, lookahead, 30, tolerance, rate=0.05)
        monkeypatch.setattr(budget, "early", lambda step, total: False)
        without = _drive(order, lookahead, 30, tolerance, rate=0.05)
        monkeypatch.undo()
        return with_quarter, without
    (computed, acc), (computed_plain, acc_plain) = both(Options().tolerance)
    assert computed == computed_plain and acc == pytest.approx(acc_plain, rel=1e-6)
    assert not all(computed[3:-2])  # it served steps
    knob, plain = both(0.1)
    assert knob[0] != plain[0]


@pytest.mark.parametrize("tolerance, early", [(0.005, 0.005), (0.05, 0.05), (0.075, 0.225),
                                              (0.09, 0.33), (0.1, 0.4), (0.105, 0.4), (0.2, 0.4),
                                              (3.0, 0.4)])
def test_a_near_exact_knob_also_decides_the_first_quarter(tolerance, early):
    """Up to 0.05 the first quarter runs at the tolerance itself, from 0.1 at the default's,
    linearly between."""
    p = _policy(tolerance=tolerance)
    assert p.tolerance_at(0, 50) == pytest.approx(early)
    assert p.tolerance_at(13, 50) == tolerance


def test_the_knob_changes_no_decision_of_the_first_quarter_and_some_after_it():
    total = 32  # steps 0-7 early
    runs = {(tolerance, max_run): _drive(1, 1, total, tolerance, max_run=max_run)[0]
            for tolerance in (0.1, 0.2, 0.6) for max_run in (None, 2)}
    first = {tuple(computed[:8]) for computed in runs.values()}
    assert len(first) == 1
    assert len({tuple(computed[8:]) for computed in runs.values()}) >= 3
    # an unknown length: the knob decides from the first step after the warmup
    unknown = {tuple(_drive(1, 1, total, t, known=False)[0][:8]) for t in (0.1, 0.6)}
    assert len(unknown) == 2


@pytest.mark.parametrize("lookahead", [1, 2])
def test_the_decision_for_the_first_step_after_the_quarter_uses_the_knob(lookahead):
    """A run still going at the boundary: its accumulated estimate lies between the knob
    (0.1) and the default's budget (0.4), so the step it decides computes when that step is
    past the first quarter (total 40: step 10) and is served when it is still in it."""
    for target, served in ((9, True), (10, False)):
        p = _policy(tolerance=0.1, lookahead=lookahead)
        state, history = _state(), _History()
        step = target - lookahead
        history.steps[-1] = [step - 1, step - 4]  # the last compute: the step before
        history.all_computed_at = step - 1
        state.aux[budget._RATE] = 0.05 if lookahead == 1 else 0.02
        state.flags[0] = True  # (lookahead 2) the step between was decided served
        state.aux[budget._EST + step % 2] = 0.05  # the estimate made for this served step
        _step(p, state, history, step, False, rho=0.02, total=40)
        accumulated = _aux(state, budget._TMP)
        assert 0.1 < accumulated <= 0.4, accumulated
        assert bool(state.flags[0]) == served, (target, accumulated)


# -- the estimate, against a Python model of the rule ------------------------------------------

def _model(order, lookahead, schedule, tolerance):
    """Rate, rho, accumulated estimate and decision after each step, from the docstring's rule:
    at a compute ``c = e / g^(k+1)`` (g: steps since the previous compute, 1 for the first),
    a run accumulates the estimates of its served steps, the estimate for step ``t`` is
    ``c * rho * RHO_SCALE * (t - s)^(k+1)`` and ``t`` is served while ``A + est <= tol``."""
    power, rate, acc, last, previous = order + 1, 0.0, 0.0, None, None
    est, rows = {}, []
    for step, (computed, ferr, rho) in enumerate(schedule):
        if computed:
            previous, last = last, step
            rate = ferr / (1 if previous is None else step - previous) ** power
            acc = 0.0
        else:
            acc += est[step]
        target = step + lookahead
        # RHO_SCALE: rho ~ 1/50 mid-generation, x 50 makes est ~ c * g^(k+1) there
        est[target] = rate * rho * 50.0 * (target - last) ** power
        rows.append((rate, rho, acc, est[target], acc + est[target] <= tolerance))
    return rows


# computes at 0, 1, 2 (warmup), a run of 4 served steps, a compute at gap 5, a run of 3
SCHEDULE = [(True, 0.3, 0.011), (True, 0.25, 0.013), (True, 0.2, 0.009), (False, 0, 0.012),
            (False, 0, 0.017), (False, 0, 0.008), (False, 0, 0.014), (True, 1.7, 0.010),
            (False, 0, 0.019), (False, 0, 0.007), (False, 0, 0.015), (True, 0.9, 0.012)]


@pytest.mark.parametrize("order", [1, 2])
def test_rate_rho_estimates_and_decisions_follow_the_rule_step_by_step(order):
    tolerance = 0.5 if order == 1 else 2.0
    p = _policy(order=order, tolerance=tolerance)
    state, history = _state(), _History(slots=order + 1)
    expected = _model(order, 1, SCHEDULE, tolerance)
    assert {row[4] for row in expected} == {True, False}  # both decisions occur
    for step, ((computed, ferr, rho), (rate, rho_, acc, est, serve)) in enumerate(
            zip(SCHEDULE, expected)):
        decision = _step(p, state, history, step, computed, ferr, rho)
        where = f"step {step}"
        assert _aux(state, budget._RATE) == pytest.approx(rate, rel=1e-5), where
        assert _aux(state, budget._RHO) == pytest.approx(rho_, rel=1e-5), where
        assert _aux(state, budget._ACC) == pytest.approx(acc, rel=1e-5, abs=1e-9), where
        assert _aux(state, budget._EST + (step + 1) % 2) == pytest.approx(est, rel=1e-5), where
        assert _aux(state, budget._TMP) == pytest.approx(acc + est, rel=1e-5), where
        assert decision == [serve] * BLOCKS, where


def test_served_steps_accumulate_the_estimate_made_for_them():
    """A run's estimates are added as its steps are served: a run with a large latent change
    on one step ends earlier than the same run without it."""
    def run(spike):
        p = _policy(tolerance=1.0)
        state, history = _state(), _History()
        for step in range(3):
            _step(p, state, history, step, True, ferr=0.1, rho=0.01)
        served = []
        for step in range(3, 9):
            rho = 0.03 if step == spike else 0.01
            served.append(_step(p, state, history, step, False, rho=rho)[0])
        return served
    # rho 0.01 (x50: 0.5), rate 0.1: estimates 0.05, 0.2, 0.45, 0.8 at gaps 1..4
    assert run(spike=None) == [True, True, False, False, False, False]
    # rho 0.03 at step 3: est(4) = 0.6, 0.65 <= 1 still, but it is accumulated at step 4
    assert run(spike=3) == [True, False, False, False, False, False]


def test_a_missing_latent_change_computes():
    """No latent change measured (0 / 0: NaN) compares False: the next step computes."""
    for lookahead in (1, 2):
        p = _policy(tolerance=10.0, lookahead=lookahead)
        state, history = _state(), _History()
        for step in range(3):
            _step(p, state, history, step, True, ferr=0.1, rho=0.01)
        assert _step(p, state, history, 3, False, rho=0.01) == [True] * BLOCKS
        assert _step(p, state, history, 4, False, rho=0.0, norm=0.0) == [False] * BLOCKS
        assert math.isnan(_aux(state, budget._TMP))


def test_decide_broadcasts_the_first_flag_in_place():
    p = _policy()
    state = _state()
    state.flags[0], state.flags[1] = True, False
    assert _decide(p, state) == [True] * BLOCKS
    state.flags[0], state.flags[1] = False, True
    state.flags[-1] = True
    assert _decide(p, state) == [False] * BLOCKS


# -- lookahead 2: the same decisions, one step earlier -----------------------------------------

RHO = [0.02, 0.018, 0.012, 0.009, 0.011, 0.006, 0.008, 0.004, 0.010, 0.003, 0.007, 0.005,
       0.012, 0.002, 0.009, 0.006, 0.015, 0.004, 0.003, 0.011, 0.008, 0.005, 0.013, 0.020,
       0.016, 0.025, 0.030, 0.022, 0.035, 0.040, 0.028, 0.045]


def _drive(order, lookahead, total, tolerance, rate=0.02, max_run=None, known=True):
    """Run a generation of ``total`` steps; the forecast error at each compute is ``rate *
    gap^(k+1)`` (a constant rate), the latent change at step t is RHO[t + lookahead - 1] (the
    lookahead-2 policy sees each value one step earlier). ``known=False``: the policy is not
    told the length (no first quarter, no tail). Returns the steps that computed and the
    accumulated estimate after each step."""
    p = _policy(order=order, tolerance=tolerance, lookahead=lookahead, max_run=max_run)
    state, history = _state(), _History(slots=order + 1)
    decided, computed, accumulated, last = {}, [], [], None
    length = total if known else None
    for step in range(total):
        compute = p.computes_all(step, 3, length, history.run) or not decided.get(step, False)
        gap = 1 if last is None else step - last
        if compute:
            last = step
        computed.append(compute)
        decision = _step(p, state, history, step, compute, ferr=rate * gap ** (order + 1),
                         rho=RHO[step + lookahead - 1], warmup=3, total=length)
        decided[step + lookahead] = decision[0]
        accumulated.append(_aux(state, budget._TMP))
    return computed, accumulated


@pytest.mark.parametrize("order, tolerance", [(1, 0.1), (1, 0.6), (2, 0.2), (2, 1.5)])
def test_lookahead_two_decides_as_lookahead_one_on_the_metrics_one_step_earlier(order, tolerance):
    total = 30
    one, acc_one = _drive(order, 1, total, tolerance)
    two, acc_two = _drive(order, 2, total, tolerance)
    assert two == one
    # the estimate for step t + 2 made at the end of step t is the one lookahead 1 makes at
    # the end of step t + 1, whether t + 1 computed (a new run) or was served (the run goes on)
    assert acc_two[:-1] == pytest.approx(acc_one[1:], rel=1e-5)
    runs = "".join("C" if c else "s" for c in one).split("C")
    lengths = sorted({len(r) for r in runs if r})
    assert len(lengths) >= 2 and max(lengths) <= 4  # runs end on the budget and on max_run
    assert one[-budget.TAIL:] == [True] * budget.TAIL and one[:3] == [True] * 3  # warmup and tail
