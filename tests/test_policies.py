"""Policies decide from tensors alone: no model needed."""
import pytest
import torch

from foresight_compile import Options
from foresight_compile.runtime.policies import available_policies, get_policy, register_policy
from foresight_compile.runtime.policies.base import MSE, PolicyState


def _state(mse, thr, policy=None):
    """A branch's state as the controller allocates it (the policy's own, with its scratch)."""
    s = (policy.new_state(len(mse), torch.device("cpu")) if policy is not None
         else PolicyState.allocate(len(mse), torch.device("cpu")))
    s.metrics[:, MSE] = torch.tensor(mse)
    s.thresholds.copy_(torch.tensor(thr))
    return s


def _decide(policy, state) -> torch.Tensor:
    """The device decision, written into a preallocated mask as the controller does."""
    out = torch.zeros(state.thresholds.shape, dtype=torch.bool)
    before = out.data_ptr()
    policy.decide(state, out)
    assert out.data_ptr() == before  # written in place
    return out


def test_registry_lists_policies_and_rejects_unknown_and_duplicates():
    assert {"none", "static", "foresight"} <= set(available_policies())
    with pytest.raises(ValueError, match="unknown policy 'x'.*foresight"):
        get_policy("x")
    with pytest.raises(ValueError, match="already registered"):
        register_policy("static")(type("Dup", (), {}))


def test_foresight_schedule_warmup_then_every_r_steps():
    p = get_policy("foresight")(Options(policy="foresight", warmup=4, recompute_every=3))
    forced = [s for s in range(12) if p.computes_all(s, 4)]
    assert forced == [0, 1, 2, 3, 4, 7, 10]


def test_foresight_per_layer_reuses_blocks_under_their_threshold():
    p = get_policy("foresight")(Options(policy="foresight"))
    s = _state([0.1, 0.5, 0.2, 0.9], [0.2, 0.4, 0.2, 1.0])
    assert _decide(p, s).tolist() == [True, False, True, True]


def test_foresight_prefix_skips_up_to_the_deepest_block_under_threshold():
    p = get_policy("foresight")(Options(policy="foresight", decision="prefix"))
    s = _state([0.1, 0.5, 0.2, 0.9], [0.2, 0.4, 0.3, 0.5], p)
    assert _decide(p, s).tolist() == [True, True, True, False]
    s = _state([0.3, 0.5], [0.2, 0.4], p)
    assert _decide(p, s).tolist() == [False, False]


def test_foresight_threshold_is_lambda_times_last_warmup_mse():
    p = get_policy("foresight")(Options(policy="foresight", warmup=4, threshold=0.5))
    s = _state([0.2, 0.6], [-1.0, -1.0])
    p.observe(2, 4, s)
    assert s.thresholds.tolist() == [-1.0, -1.0]
    p.observe(3, 4, s)
    assert s.thresholds.tolist() == pytest.approx([0.1, 0.3])
    assert not _decide(p, _state([0.0, 0.0], [-1.0, -1.0])).any()  # before warmup ends


def test_static_computes_every_n_steps_after_warmup_and_reuses_the_rest():
    p = get_policy("static")(Options(policy="static", warmup=2, recompute_every=3))
    assert [s for s in range(10) if p.computes_all(s, 2)] == [0, 1, 2, 5, 8]
    assert _decide(p, _state([9.0], [-1.0])).tolist() == [True]


def test_none_always_computes():
    p = get_policy("none")(Options(policy="none"))
    assert all(p.computes_all(s, 8) for s in range(50)) and not p.needs_cache


def test_fraction_warmup_unknown_length_computes_everything():
    p = get_policy("static")(Options(policy="static", warmup=0.5))
    assert all(p.computes_all(s, None) for s in range(20))


def test_budget_computes_the_warmup_the_tail_and_after_a_run_of_an_eighth_of_the_steps():
    p = get_policy("budget")(Options())
    assert p.order == 1 and p.default_warmup == 3
    # the tail: the last two steps, whatever the length
    assert [s for s in range(50) if p.computes_all(s, 3, 50, run=0)] == [0, 1, 2, 48, 49]
    assert [s for s in range(30) if p.computes_all(s, 3, 30, run=0)] == [0, 1, 2, 28, 29]
    assert [s for s in range(12) if p.computes_all(s, 3, 12, run=0)] == [0, 1, 2, 10, 11]
    assert p.computes_all(20, 3, 50, run=6) and not p.computes_all(20, 3, 50, run=5)
    assert p.computes_all(12, 3, 30, run=4)  # 30 steps: runs of at most 4
    assert p.computes_all(12, 3, None, run=8) and not p.computes_all(12, 3, None, run=7)
    fixed = get_policy("budget")(Options(max_run=2))
    assert fixed.computes_all(20, 3, 50, run=2)


def _budget_step(policy, state, clock, step, computed, ferr_last=0.0, rho_sq=(0.0, 1.0)):
    from foresight_compile.runtime.policies.base import FSQ, NSQ
    mask = [not computed] * clock.num_blocks
    if computed:
        state.storage[-1, FSQ] = ferr_last ** 2
        state.storage[-1, NSQ] = 1.0
    state.aux[0], state.aux[1] = rho_sq
    state.derive()
    clock.record(step, mask)
    policy.observe(step, 3, state, clock)
    return _decide(policy, state).tolist()


def test_budget_serves_while_the_accumulated_estimate_stays_under_the_tolerance():
    from foresight_compile.runtime.cache_history import CacheHistory, HistoryLayout
    policy = get_policy("budget")(Options(tolerance=1.0))
    state = PolicyState.allocate(2, torch.device("cpu"))
    clock = CacheHistory(HistoryLayout.exit_only(2, 1, slots=2), torch.device("cpu"))
    # latent change rho = sqrt(1e-4 / 1) = 0.01, x RHO_SCALE 50 = 0.5
    for step in range(3):
        decision = _budget_step(policy, state, clock, step, True, ferr_last=0.1, rho_sq=(1e-4, 1.0))
    # rate = 0.1 / 1^2; the estimate for step 3 (gap 1): 0.1 * 1 * 0.5 = 0.05 <= 1
    assert decision == [True, True]
    decision = _budget_step(policy, state, clock, 3, False, rho_sq=(1e-4, 1.0))
    # step 4 (gap 2): accumulated 0.05 + 0.1 * 4 * 0.5 = 0.25 <= 1
    assert decision == [True, True]
    decision = _budget_step(policy, state, clock, 4, False, rho_sq=(1e-4, 1.0))
    # step 5 (gap 3): 0.25 + 0.1 * 9 * 0.5 = 0.7 <= 1; step 6 (gap 4): 0.7 + 0.8 > 1
    assert decision == [True, True]
    assert _budget_step(policy, state, clock, 5, False, rho_sq=(1e-4, 1.0)) == [False, False]
    # a large measured forecast error at the next compute makes the very next step compute
    assert _budget_step(policy, state, clock, 6, True, ferr_last=50.0, rho_sq=(1e-4, 1.0)) == [False, False]


def test_budget_deciding_two_steps_ahead_does_not_compute_twice_in_a_row():
    """With lookahead 2, the decision for step t + 2 is made before step t + 1 runs; when
    t + 1 computes, t + 2 starts a fresh run instead of deciding from the old one."""
    from foresight_compile.runtime.cache_history import CacheHistory, HistoryLayout
    policy = get_policy("budget")(Options(tolerance=1.0, lookahead=2))
    state = PolicyState.allocate(2, torch.device("cpu"))
    clock = CacheHistory(HistoryLayout.exit_only(2, 1, slots=2), torch.device("cpu"))
    decisions, computed = {}, []
    for step in range(12):
        reuse = not policy.computes_all(step, 3, 30, clock.run) and decisions.get(step, False)
        computed.append(not reuse)
        decisions[step + 2] = _budget_step(policy, state, clock, step, not reuse, ferr_last=0.1,
                                           rho_sq=(1e-4, 1.0))[0]
    assert computed == [True] * 3 + [False] * 3 + [True] + [False] * 4 + [True]  # runs of <= 4
