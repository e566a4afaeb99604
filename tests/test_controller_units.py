"""``ReuseController`` driven by hand, no ``torch.compile``: requests and their released
states, generations and their lengths, what ``end`` writes, the statistics, and the frame
group shared by the compiles of one frame.

A ``Scripted`` policy says on the host which steps compute every block and on the device
which blocks the other steps serve, and records what the controller tells it; the
executor's part is ``_run`` (the blocks the mask computes write their metric rows). The
whole (models, policies, concurrent requests, random call sequences) is the business of
``test_safety.py``, ``test_concurrency.py`` and ``test_controller_properties.py``.
"""
from __future__ import annotations

import sys
import threading
import warnings

import pytest
import torch

from foresight_compile import Options
from foresight_compile.errors import ForesightValueError
from foresight_compile.runtime.cache_history import HistoryLayout
from foresight_compile.runtime.context import call_context, request_context
from foresight_compile.runtime.controller import ReuseController
from foresight_compile.runtime.frames import FrameGroup
from foresight_compile.runtime.policies.base import ReusePolicy

# Nothing here compiles: no Dynamo state to reset around each test (conftest).
pytestmark = pytest.mark.shared_dynamo


class Scripted(ReusePolicy):
    """Steps in ``compute`` compute every block; the others serve ``reuse`` (decided on the
    device at the end of the step before)."""

    name = "scripted"
    default_warmup = 1
    needs_metric = True

    def __init__(self, options=None, compute=(0,), reuse=(True, True), needs_cache=True):
        super().__init__(options or Options(policy="static", lowering="eager"))
        self.compute, self.reuse, self.needs_cache = set(compute), reuse, needs_cache
        self.calls = []

    def computes_all(self, step, warmup, total=None, run=0):
        self.calls.append(("computes_all", step, warmup, total, run))
        return step in self.compute

    def decide(self, state, out):
        out.copy_(torch.tensor(self.reuse))

    def observe(self, step, warmup, state, history=None, total=None):
        self.calls.append(("observe", step, warmup, total))


def _controller(policy=None, blocks=2, **kw):
    policy = policy or Scripted()
    return ReuseController(HistoryLayout.every_block(blocks), policy, timestep_index=1,
                           signature_indices=[0], **kw)


def _run(ctrl, x, t, mse=0.0, bad=0.0):
    state = ctrl.begin([x, torch.tensor([t]) if isinstance(t, float) else t])
    for l in range(ctrl.num_blocks):
        if not state.mask[l]:
            state.buffers.store(l, (x.clone(),))
            state.policy_state.rows[l].copy_(torch.tensor([mse, 1.0, bad, mse, 1.0]))
    ctrl.end(state)
    return state


X = torch.ones(2, 3)


def test_steps_serve_what_the_device_decided_and_end_records_each_step():
    policy = Scripted(compute=(0, 3), reuse=(True, False))
    ctrl = _controller(policy)
    masks = [list(_run(ctrl, X, t, mse=0.5).mask) for t in (900.0, 800.0, 700.0, 600.0)]
    assert masks == [[False, False], [True, False], [True, False], [False, False]]
    assert ctrl.block_computes == [2, 4]
    rows = ctrl.rows()
    assert rows.step == [0, 1, 2, 3] and rows.timestep == [900.0, 800.0, 700.0, 600.0]
    assert rows.mask == masks and rows.branch == [0] * 4 and rows.generation == [0] * 4
    # step 0 measures against no cache of its own: its change is zeroed
    assert rows.change[0] == [0.0, 0.0] and rows.change[1] == [0.5, 0.5]
    assert rows.thresholds[1] == [-1.0, -1.0]
    assert [c[1] for c in policy.calls if c[0] == "observe"] == [0, 1, 2, 3]
    # before each step: (step, warmup, total steps, steps since every block computed)
    assert [c[1:] for c in policy.calls if c[0] == "computes_all"] == [
        (0, 1, None, 0), (1, 1, 9, 0), (2, 1, 9, 1), (3, 1, 9, 2)]  # 9: read off the timesteps
    assert set(rows.request) == {ctrl.live_states()[0].request}
    state = ctrl.live_states()[0]
    assert state.step == 4 and state.decision.tolist() == [True, False]
    assert state.finite_ok.tolist() == [True, True]


def test_step_zero_measures_no_change_nor_forecast_error():
    ctrl = _controller()
    state = _run(ctrl, X, 900.0, mse=0.25)
    assert state.policy_state.mse.tolist() == [0.0, 0.0]
    assert state.policy_state.ferr.tolist() == [0.0, 0.0]
    state = ctrl.begin([X, torch.tensor([800.0])])
    state.policy_state.rows[0].copy_(torch.tensor([0.25, 1.0, 0.0, 0.25, 1.0]))
    ctrl.end(state)
    assert state.policy_state.mse.tolist()[0] == 0.25 and state.policy_state.ferr.tolist()[0] == 0.5


def test_a_non_finite_block_is_never_served_and_metrics_are_none_without_needs_metric():
    policy = Scripted(compute=(0,), reuse=(True, True))
    policy.needs_metric = False
    ctrl = _controller(policy)
    _run(ctrl, X, 900.0, bad=1.0)
    state = _run(ctrl, X, 800.0)
    assert state.mask == [False, False] and state.finite_ok.tolist() == [True, True]
    assert _run(ctrl, X, 700.0).mask == [True, True]
    assert ctrl.rows().change == [None] * 3 and ctrl.rows().thresholds == [None] * 3


def test_a_policy_without_cache_never_decides_and_never_serves():
    policy = Scripted(compute=(), needs_cache=False)
    ctrl = _controller(policy)
    for t in (900.0, 800.0, 700.0):
        state = _run(ctrl, X, t)
        assert state.mask == [False, False]
    assert state.decision.tolist() == [False, False] and not state.next_mask.ready


def test_lookahead_two_serves_from_the_third_step():
    ctrl = _controller(Scripted(compute=(0,)), lookahead=2)
    assert [list(_run(ctrl, X, t).mask) for t in (900.0, 800.0, 700.0)] == [
        [False, False], [False, False], [True, True]]


def test_reduce_sums_the_rows_before_they_are_derived():
    seen = []

    def reduce(ps):
        seen.append(ps)
        ps.sums.copy_(ps.raw)
        ps.sums[:, 0] += 6.0  # what the other ranks add: a squared change of 6
        ps.sums[:, 1] += 1.0  # ... over one more element

    ctrl = _controller(reduce=reduce)
    state = _run(ctrl, X, 900.0)
    assert seen == [state.policy_state]
    _run(ctrl, X, 800.0)
    assert len(seen) == 2
    assert state.policy_state.mse.tolist() == [3.0, 3.0]  # (0 + 6) / (1 + 1), not 0 / 1
    # without a cache there is nothing to agree on: no collective
    quiet = _controller(Scripted(needs_cache=False), reduce=lambda ps: seen.append("called"))
    _run(quiet, X, 900.0)
    assert seen[-1] != "called"


def test_generations_start_on_signature_reset_and_a_timestep_that_does_not_decrease():
    ctrl = _controller()
    first = _run(ctrl, X, 900.0)
    assert (first.generation, first.step, ctrl.generations) == (0, 1, 1)
    assert first.signature == ((X.shape, X.dtype, X.device),) and first.epoch == 0
    assert _run(ctrl, X, 800.0).generation == 0
    assert _run(ctrl, X, 800.5).generation == 1  # outside a request: t went up
    assert _run(ctrl, X.double(), 700.0).generation == 2
    ctrl.reset()
    state = _run(ctrl, X.double(), 600.0)
    assert (state.generation, state.step, state.epoch, ctrl.generations) == (3, 1, 1, 4)
    assert ctrl.group.epoch == 1
    assert state.previous_length == 1


def test_a_named_branch_outside_a_request_restarts_when_its_timestep_repeats():
    ctrl = _controller()
    with call_context(branch="cond"):
        assert _run(ctrl, X, 900.0).step == 1
        assert _run(ctrl, X, 800.0).step == 2
        state = _run(ctrl, X, 800.0)
    assert state.step == 1 and state.generation == 1


def test_non_tensor_signature_arguments_and_timesteps():
    ctrl = ReuseController(HistoryLayout.every_block(1), Scripted(reuse=(True,)),
                           timestep_index=1, signature_indices=[0, 2])
    state = ctrl.begin([X, 900, "a"])
    assert state.signature == ((X.shape, X.dtype, X.device), "a") and state.device.type == "cpu"
    assert state.timestep_record == 900.0 and state.last_timestep == 900.0
    ctrl.end(state)
    assert ctrl.begin([X, 800, "a"]).generation == 0
    ctrl.end(state)
    assert ctrl.begin([X, 700, "b"]).generation == 1


def test_the_timestep_is_the_first_element_of_the_timestep_input():
    ctrl = _controller()
    assert ctrl.begin([X, torch.tensor([900.0, 5.0])]).last_timestep == 900.0


def test_an_empty_timestep_is_refused():
    ctrl = _controller()
    with pytest.raises(ForesightValueError, match=r"the timestep input is empty \(shape \(0,\)\)"):
        ctrl.begin([X, torch.zeros(0)])
    with request_context(), call_context(branch="cond"):
        ctrl.begin([X, torch.zeros(0)])  # not read under a request and a name


def test_named_branches_in_a_request_never_read_the_timestep():
    ctrl = _controller()
    with request_context(num_steps=3) as request:
        with call_context(branch="cond"):
            t = torch.tensor([900.0])
            cond = ctrl.begin([X, t])
            assert cond.timestep_record is t and cond.last_timestep == float("inf")
            ctrl.end(cond)
        with call_context(branch="uncond"):
            uncond = _run(ctrl, X, torch.tensor([900.0]))
        with call_context(branch="cond"):
            assert _run(ctrl, X, torch.tensor([800.0])) is cond
    assert (cond.branch, uncond.branch) == (0, 1) and cond.request == uncond.request == request.id
    assert cond.generation == uncond.generation
    assert ctrl.rows().timestep == [900.0, 900.0, 800.0]


def test_a_request_generation_ends_after_its_num_steps():
    ctrl = _controller()
    with request_context(num_steps=2) as request:
        a = _run(ctrl, X, 900.0)
        generation = a.generation
        assert (a.total_steps, a.length_source, a.warmup) == (2, "given", 1)
        assert _run(ctrl, X, 800.0).generation == generation
        assert _run(ctrl, X, 950.0).generation == generation + 1  # 2 steps ran: new one
        assert a.step == 1 and a.request == request.id
        with call_context(num_steps=None):
            pass
    with request_context():
        state = _run(ctrl, X, 900.0)
        assert state.total_steps is None and state.length_source is None


def test_a_length_read_off_the_timesteps_never_ends_a_request_generation():
    ctrl = _controller()
    with request_context():
        states = [_run(ctrl, X, t) for t in (2.0, 1.0, 0.0)]
    assert states[0] is states[2] and states[0].step == 3 and ctrl.generations == 1
    assert states[0].length_source == "timesteps" and states[0].total_steps == 3


def test_a_given_length_is_not_inferred_and_ends_no_generation_outside_a_request():
    ctrl = _controller(Scripted(Options(policy="static", lowering="eager", num_steps=2)))
    for t in (3.0, 2.0, 1.0):
        state = _run(ctrl, X, t)
    # outside a request a generation ends when its timestep stops decreasing, not at 2 steps
    assert state.step == 3 and ctrl.generations == 1
    assert (state.total_steps, state.length_source) == (2, "given")


def test_a_long_request_generation_ends_after_its_num_steps_too():
    ctrl = _controller()
    with request_context(num_steps=300):
        for step in range(300):
            state = _run(ctrl, X, 1000.0 - step)
        assert state.step == 300 and ctrl.generations == 1
        _run(ctrl, X, 1.0)
        assert state.step == 1 and ctrl.generations == 2


def test_the_length_comes_from_the_options_then_the_previous_generation():
    ctrl = _controller(Scripted(Options(policy="static", lowering="eager", num_steps=5)))
    state = _run(ctrl, X, 900.0)
    assert (state.total_steps, state.length_source) == (5, "given")
    plain = _controller()
    for t in (4.0, 3.0, 2.0):
        state = _run(plain, X, t)
    assert state.length_source == "timesteps"
    assert _run(plain, X, 10.0).step == 1
    assert (state.previous_length, state.total_steps, state.length_source) == (3, 3, "previous")


def test_the_length_is_inferred_from_the_timesteps():
    ctrl = _controller()
    state = _run(ctrl, X, 40.0)
    assert state.total_steps is None
    _run(ctrl, X, 30.0)  # at step 1: 30 / 10 more calls
    assert (state.total_steps, state.length_source) == (4, "timesteps")
    state.step, state.last_timestep = 2, 20.0
    for timestep in (20.0, 25.0, -1.0, float("-inf")):  # no gap, t went up, t < 0, gap inf: ignored
        ReuseController._infer_length(state, timestep)
        assert state.total_steps == 4
    ReuseController._infer_length(state, 19.99)  # floor(19.99 / 0.01 + 1e-3) = 1999
    assert state.total_steps == 2 + 1999
    state.last_timestep, state.total_steps = 1.0, None
    ReuseController._infer_length(state, 0.0)  # t = 0: the last step
    assert state.total_steps == 3
    state.step, state.last_timestep = 3, 1.0
    ReuseController._infer_length(state, 0.0)
    assert state.total_steps == 4
    state.step = 2
    state.length_source, state.total_steps, state.last_timestep = "previous", 6, 3.0
    ReuseController._infer_length(state, 2.0)  # 2 + 2 = 4 < 6 - 1: shorter, taken
    assert (state.total_steps, state.length_source) == (4, "timesteps")
    state.length_source, state.total_steps = "previous", 5
    ReuseController._infer_length(state, 2.0)  # 4 >= 5 - 1: the last length stands
    assert (state.total_steps, state.length_source) == (5, "previous")
    state.last_timestep = 2.5
    ReuseController._infer_length(state, 2.0)  # 2 + 4 = 6 >= 4: longer, the last stands
    assert (state.total_steps, state.length_source) == (5, "previous")
    state.step, state.last_timestep, state.total_steps = 3, 3.0, 6
    ReuseController._infer_length(state, 2.0)  # 3 + 2 = 5 >= 6 - 1: the last stands
    assert (state.total_steps, state.length_source) == (6, "previous")


def test_a_fractional_warmup_of_an_unknown_length_warns_once():
    ctrl = _controller(Scripted(Options(policy="static", lowering="eager", warmup=0.5)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        state = _run(ctrl, X, 900.0)  # begin()'s caller's caller: where the warning points
        assert state.warmup is None
        assert _run(ctrl, X, 900.0).warmup is None  # a second branch: no second warning
        ctrl.reset()
        _run(ctrl, X, 800.0)
    assert [str(w.message)[:40] for w in caught] == ["foresight: 'warmup' is a fraction but th"]
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)
    quiet = _controller(Scripted(Options(policy="static", lowering="eager", warmup=0.5),
                                 needs_cache=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(quiet, X, 900.0)
    with request_context(num_steps=10), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _run(_controller(Scripted(Options(policy="static", lowering="eager",
                                                 warmup=0.5))), X, 900.0).warmup == 5


def test_closed_requests_pool_their_states_for_the_next_ones():
    ctrl = _controller()
    with request_context(num_steps=3) as first:
        states = [_run(ctrl, X, 900.0) for _ in range(5)]  # the pool keeps 4
        assert ctrl.live_states() == states and ctrl.pooled_bytes == 0
        assert ctrl.cache_bytes == sum(s.history.nbytes for s in states) > 0
    assert ctrl.live_states() == [] and len(ctrl._pool) == 4
    assert ctrl.pooled_bytes == ctrl.cache_bytes == 4 * states[0].history.nbytes
    ctrl._release(first)  # released once only
    assert len(ctrl._pool) == 4
    with request_context() as second:
        again = _run(ctrl, X, 900.0)
        assert again is states[0] and again.request != first.id and again.request == second.id
        assert again.step == 1 and again.generation > states[-1].generation
        assert again.previous_length is None and again.total_steps is None
        other = _run(ctrl, X, 900.0)
        assert other is states[1] and other.branch == 1
        assert ctrl.cache_bytes == 2 * again.history.nbytes + ctrl.pooled_bytes
        assert ctrl.pooled_bytes == 2 * again.history.nbytes
    # after reset(): a pooled state starts a new generation too (its epoch is the current one)
    ctrl.reset()
    with request_context():
        _run(ctrl, X, 900.0)
    newest = max(s.generation for s in ctrl._pool)
    with request_context():
        assert _run(ctrl, X, 800.0).generation > newest
    for state in ctrl._pool:  # a pooled state serves a branch of its own device only
        state.device = torch.device("meta")
    with request_context():
        assert _run(ctrl, X, 900.0) not in states


def test_a_branch_another_compile_ran_since_starts_a_new_generation():
    group = FrameGroup()
    a, b = _controller(group=group), _controller(group=group)
    assert a.group is group and _controller().group is not group
    for _ in range(2):  # at epoch 0, then 1: the restart must not depend on the epoch's value
        with request_context():
            first = _run(a, X, 900.0)
            assert _run(a, X, 800.0).generation == first.generation
            _run(b, X.double(), 700.0)
            assert _run(a, X, 600.0).step == 1  # a new generation
            assert _run(a, X, 500.0).step == 2
        a.reset()


def test_a_pooled_state_joins_the_generation_of_its_new_request():
    ctrl = _controller()
    with request_context():
        cond = _run(ctrl, X, 900.0)
        with request_context():  # another request comes and goes: its state is pooled
            assert _run(ctrl, X, 900.0).generation == cond.generation + 1
        uncond = _run(ctrl, X, 900.0)  # the first request's second branch takes it
    assert uncond.branch == 1 and uncond.generation == cond.generation


def test_generation_ids_never_run_out():
    ctrl = _controller()
    for _ in range(70):
        ctrl.reset()
        state = _run(ctrl, X, 900.0)
    assert state.generation == 69 and ctrl.generations == 70


def test_reset_with_clear_stats_clears_the_counts_and_rows():
    ctrl = _controller()
    _run(ctrl, X, 900.0)
    ctrl.reset()
    assert ctrl.block_computes == [1, 1] and len(ctrl.rows().step) == 1
    ctrl.reset(clear_stats=True)
    assert ctrl.block_computes == [0, 0] and ctrl.rows().step == []
    assert ctrl._epoch == 2 and ctrl.group.epoch == 2


def test_calls_outside_a_request_are_the_threads():
    ctrl = _controller()
    _run(ctrl, X, 900.0)
    seen = []
    thread = threading.Thread(target=lambda: seen.append(_run(ctrl, X, 900.0)))
    thread.start()
    thread.join()
    mine = ctrl.live_states()
    assert seen[0].branch == 0 and seen[0] not in mine[:1]
    assert seen[0].request != mine[0].request
