"""Policies decide from tensors alone: no model needed."""
import pytest
import torch

from foresight_compile import Options
from foresight_compile.runtime.policies import available_policies, get_policy, register_policy
from foresight_compile.runtime.policies.base import MSE, PolicyState


def _state(mse, thr):
    s = PolicyState.allocate(len(mse), torch.device("cpu"))
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
    s = _state([0.1, 0.5, 0.2, 0.9], [0.2, 0.4, 0.3, 0.5])
    assert _decide(p, s).tolist() == [True, True, True, False]
    s = _state([0.3, 0.5], [0.2, 0.4])
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
