"""The cache never serves a stale, wrong-shaped or non-finite tensor; fallbacks are loud once."""
import warnings

import pytest
import torch

import foresight_compile
from foresight_compile import ForesightFallbackWarning, NotCompiledError, Options
from foresight_compile.runtime.cache_history import HistoryLayout
from foresight_compile.runtime.controller import ReuseController
from foresight_compile.runtime.policies import get_policy
from toy import ToyDiT

STATIC = {"policy": "static", "warmup": 2, "recompute_every": 3, "lowering": "eager", "strict": True}


def _step(model, x, t):
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([t]))[0]


def test_shape_change_mid_generation_starts_fresh_and_matches_uncached():
    torch.manual_seed(0)
    model = ToyDiT(layers=3).eval()
    fast = torch.compile(model, backend="foresight", options=STATIC)
    x = torch.randn(1, 4, 8)
    for i, t in enumerate([1000.0, 900.0, 800.0, 700.0]):  # step 3 reuses everything
        _step(fast, x, t)
    assert foresight_compile.stats(fast).mask[3] == [True, True, True]
    y = torch.randn(2, 6, 8)  # new batch and token count, timestep still decreasing
    out = _step(fast, y, 600.0)
    s = foresight_compile.stats(fast)
    assert s.mask[-1] == [False, False, False] and s.step[-1] == 0
    torch.testing.assert_close(out, _step(model, y, 600.0), rtol=1e-6, atol=1e-6)


def test_new_generation_never_reuses_the_previous_generations_cache():
    torch.manual_seed(0)
    model = ToyDiT(layers=2).eval()
    fast = torch.compile(model, backend="foresight", options=STATIC)
    x = torch.randn(1, 4, 8)
    for t in [1000.0, 900.0, 800.0, 700.0]:
        _step(fast, x, t)
    out = _step(fast, x * 3, 1000.0)  # timestep went up: a new generation
    assert foresight_compile.stats(fast).mask[-1] == [False, False]
    torch.testing.assert_close(out, _step(model, x * 3, 1000.0), rtol=1e-6, atol=1e-6)


def test_non_finite_block_outputs_are_never_served():
    torch.manual_seed(0)
    fast = torch.compile(ToyDiT(layers=2).eval(), backend="foresight", options=STATIC)
    x = torch.randn(1, 4, 8)
    bad = x.clone()
    bad[0, 0, 0] = float("inf")
    for t, inp in [(1000.0, x), (900.0, x), (800.0, bad), (700.0, x), (600.0, x)]:
        _step(fast, inp, t)
    mask = foresight_compile.stats(fast).mask
    assert mask[3] == [False, False]  # static says reuse, but the cache holds inf
    assert mask[4] == [True, True]  # recomputed finite at step 3: reusable again


def _controller(policy="static", **kw):
    opts = Options(policy=policy, lowering="eager", **kw)
    return ReuseController(HistoryLayout.every_block(2, opts.forecast_order + 1),
                           get_policy(policy)(opts), timestep_index=1, signature_indices=[0])


def _computed(state, block, value, mse=0.0):
    """What a block's compiled update does when it computes: its buffers hold ``value``,
    its metric row the raw sums (squared change, count, non-finite flag, forecast error,
    norm)."""
    state.buffers.store(block, (value.clone(),))
    state.policy_state.rows[block].copy_(torch.tensor([mse, 1.0, 0.0, mse, 1.0]))


def _run(ctrl, x, t):
    state = ctrl.begin([x, torch.tensor([t])])
    for l in range(2):
        if not state.mask[l]:
            _computed(state, l, x)
    ctrl.end(state)
    return state


def test_dtype_change_starts_a_new_generation_and_drops_the_cache():
    ctrl = _controller(warmup=1, recompute_every=4)
    x = torch.randn(3, 4)
    _run(ctrl, x, 1000.0)
    _run(ctrl, x, 900.0)
    assert _run(ctrl, x, 800.0).mask == [True, True]
    state = _run(ctrl, x.double(), 700.0)
    assert state.mask == [False, False] and state.step == 1 and state.generation == 1
    assert state.buffers.tensors[0][0].dtype == torch.float64


def test_repeated_timestep_is_a_new_cfg_branch_with_its_own_state():
    ctrl = _controller(warmup=1, recompute_every=4)
    x = torch.randn(3, 4)
    a = _run(ctrl, x, 1000.0)
    b = _run(ctrl, x, 1000.0)
    assert a is not b and (a.branch, b.branch) == (0, 1)
    assert a.buffers.tensors[0][0].data_ptr() != b.buffers.tensors[0][0].data_ptr()
    assert _run(ctrl, x, 900.0) is a and _run(ctrl, x, 900.0) is b


def test_reset_forces_a_new_generation():
    ctrl = _controller(warmup=1, recompute_every=4)
    x = torch.randn(3, 4)
    _run(ctrl, x, 1000.0)
    ctrl.reset()
    state = _run(ctrl, x, 900.0)
    assert state.generation == 1 and state.mask == [False, False]


def test_cache_buffers_keep_their_address_across_steps():
    ctrl = _controller(warmup=0, recompute_every=1)
    x = torch.randn(3, 4)
    first = _run(ctrl, x, 1000.0).buffers.tensors[0][0].data_ptr()
    for t in (900.0, 800.0, 700.0):
        assert _run(ctrl, x + t, t).buffers.tensors[0][0].data_ptr() == first


def test_model_without_blocks_runs_plain_inductor_with_one_warning():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    x = torch.randn(2, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = torch.compile(mlp, backend="foresight")
        with torch.no_grad():
            out = fast(x)
            out2 = fast(x)
    ours = [w for w in caught if issubclass(w.category, ForesightFallbackWarning)]
    assert len(ours) == 1 and "no stack of repeated blocks" in str(ours[0].message)
    torch._dynamo.reset()
    with torch.no_grad():
        plain = torch.compile(mlp, backend="inductor")(x)
    assert torch.equal(out, plain) and torch.equal(out, out2)
    # A service that logs stats keeps running: the report says why nothing is accelerated.
    report = foresight_compile.stats(fast)
    assert not report.accelerated and "no stack of repeated blocks" in report.reason
    with pytest.raises(NotCompiledError):  # a model never compiled is still an error
        foresight_compile.stats(torch.nn.Linear(4, 4))


def test_strict_mode_raises_the_reason_instead_of_falling_back():
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    fast = torch.compile(mlp, backend="foresight", options={"strict": True})
    with pytest.raises(foresight_compile.BlockDiscoveryError, match="no stack of repeated blocks"):
        fast(torch.randn(2, 4))


def test_stats_accepts_the_original_model_too():
    model = ToyDiT(layers=2).eval()
    fast = torch.compile(model, backend="foresight", options=STATIC)
    _step(fast, torch.randn(1, 4, 8), 1000.0)
    assert foresight_compile.stats(model).steps == foresight_compile.stats(fast).steps == 1


def test_named_branches_and_generation_context_replace_guessing():
    from foresight_compile.runtime.context import Request, call_context

    ctrl = _controller(warmup=0.5, recompute_every=4)
    x = torch.randn(3, 4)
    with call_context(request=Request(), num_steps=4):
        with call_context(branch="uncond"):
            u = _run(ctrl, x, 1000.0)
        with call_context(branch="cond"):
            c = _run(ctrl, x, 1000.0)
        with call_context(branch="cond"):
            assert _run(ctrl, x, 900.0) is c  # by name, not by call order
        assert u.warmup == c.warmup == 2  # fraction resolved from the pipeline's step count
    first_generation = c.generation
    with call_context(request=Request(), num_steps=4, branch="cond"):
        again = _run(ctrl, x, 800.0)  # a new generation although t kept falling
    # A new request has its own state (never the previous request's cache), from step 0.
    assert again is not c and again.generation == first_generation + 1 and again.step == 1
    assert again.buffers.tensors[0][0].data_ptr() != c.buffers.tensors[0][0].data_ptr()


def test_generation_api_starts_fresh_generations():
    torch.manual_seed(0)
    model = ToyDiT(layers=2).eval()
    fast = torch.compile(model, backend="foresight", options=STATIC)
    x = torch.randn(1, 4, 8)
    with foresight_compile.generation(num_steps=3):
        for t in (1000.0, 900.0, 800.0):
            _step(fast, x, t)
    with foresight_compile.generation(num_steps=3):
        _step(fast, x, 700.0)
    s = foresight_compile.stats(fast)
    assert s.step == [0, 1, 2, 0] and s.generation[-1] == s.generation[0] + 1
    with pytest.raises(ValueError, match="branch name"):
        with foresight_compile.branch(""):
            pass


class _ShiftBlock(torch.nn.Module):
    """out = in + a constant shift: the residual never changes, the output always does."""

    def __init__(self, dim):
        super().__init__()
        self.seed = torch.nn.Parameter(torch.randn(dim))
        self.a = torch.nn.Linear(dim, dim)
        self.b = torch.nn.Linear(dim, dim)

    def forward(self, x, temb):
        h = torch.tanh(self.a(self.seed)) * 0.5
        h = torch.sigmoid(self.b(h)) - 0.5
        h = h * 0.1 + h.square() * 0.01
        return x + h.expand_as(x)


def test_residual_reuse_is_exact_when_the_residual_is_constant():
    torch.manual_seed(0)
    model = ToyDiT(layers=3).eval()
    model.blocks = torch.nn.ModuleList(_ShiftBlock(8) for _ in range(3))
    x = torch.randn(1, 4, 8)
    reference = [_step(model, x + i, t) for i, t in enumerate([1000.0, 900.0, 800.0, 700.0, 600.0])]
    outs = {}
    for reuse in ("residual", "output"):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="foresight", options={**STATIC, "reuse": reuse})
        outs[reuse] = [_step(fast, x + i, t) for i, t in enumerate([1000.0, 900.0, 800.0, 700.0, 600.0])]
        assert foresight_compile.stats(fast).mask[3] == [True, True, True]
    torch.testing.assert_close(outs["residual"][3], reference[3], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(outs["output"][3], reference[3], atol=1e-3)  # stale outputs


def test_residual_reuse_needs_the_host_branch_form():
    with pytest.raises(ValueError, match="'reuse'='residual'"):
        Options(reuse="residual", form="graph")


def _masks_with_lookahead(lookahead: int) -> list[list[bool]]:
    opts = Options(policy="foresight", lowering="eager", warmup=2, recompute_every=3,
                   threshold=1.0, lookahead=lookahead)
    ctrl = ReuseController(HistoryLayout.every_block(2), get_policy("foresight")(opts),
                           timestep_index=1, signature_indices=[0], lookahead=lookahead)
    x = torch.randn(3, 4)
    # The MSE each block reports when it computes at a step (thresholds: 0.5 after warmup):
    # at step 2 block 1 is over its threshold, afterwards both are under.
    mse = {0: (0.0, 0.0), 1: (0.5, 0.5), 2: (0.1, 9.0), 3: (0.1, 0.1), 4: (0.1, 0.1),
           5: (0.1, 0.1), 6: (0.1, 0.1)}
    masks = []
    for step, t in enumerate([1000.0, 900.0, 800.0, 700.0, 600.0, 500.0, 400.0]):
        state = ctrl.begin([x, torch.tensor([t])])
        masks.append(list(state.mask))
        for l in range(2):
            if not state.mask[l]:
                _computed(state, l, x, mse[step][l])
        ctrl.end(state)
    return masks


def test_lookahead_two_decides_each_step_from_the_metrics_two_steps_back():
    computed = [False, False]
    # Steps 0-1 warm up, 2 and 5 recompute everything.
    one = _masks_with_lookahead(1)
    assert one == [computed] * 3 + [[True, False], [True, True], computed, [True, True]]
    two = _masks_with_lookahead(2)
    # Step 3 reads the decision made after step 1, step 4 the one after step 2 (block 1
    # over), step 6 the one after step 4.
    assert two == [computed] * 3 + [[True, True], [True, False], computed, [True, True]]


def test_lookahead_two_never_serves_a_non_finite_output():
    torch.manual_seed(0)
    opts = {**STATIC, "warmup": 1, "recompute_every": 2, "lookahead": 2}
    model = ToyDiT(layers=2).eval()
    fast = torch.compile(model, backend="foresight", options=opts)
    x = torch.randn(1, 4, 8)
    bad = x.clone()
    bad[0, 0, 0] = float("inf")
    outs = [_step(fast, inp, t) for t, inp in
            [(1000.0, x), (900.0, x), (800.0, x), (700.0, bad), (600.0, x), (500.0, x)]]
    mask = foresight_compile.stats(fast).mask
    assert mask[4] == [True, True]  # decided two steps back, before the inf appeared
    # Step 3 computed inf and left the caches at their step-1 values: step 4 serves those.
    assert torch.isfinite(outs[4]).all()
    torch.testing.assert_close(outs[4], outs[2], rtol=0, atol=0)


def test_lookahead_accepts_one_or_two_only():
    with pytest.raises(ValueError, match="'lookahead' must be 1 or 2"):
        Options(lookahead=3)
