"""Cache memory: what a branch holds, that the planner knows it before anything runs, the
ceiling a user sets, the narrower storage dtypes, and the pool of released states.

The default policy serves whole steps, so only the region exit keeps a history: a branch
holds ``order + 1`` exit activations and the latent probe, however deep the model. The
per-block policies keep one value per block. ``plan_cache`` runs the backend's own planning
code on shape-only (meta) inputs; its bytes must be what ``stats()`` then reports."""
from __future__ import annotations

import pytest
import torch

import foresight_compile
from foresight_compile import ForesightValueError, models
from foresight_compile.program import programs_of
from conftest import rel_err
from toy import ToyDiT, toy_loop

STEPS = 8


def _deep_wan(layers: int = 30, device: str | None = None):
    """The Wan2.1 block architecture at 30 blocks, narrow (the real width is planned on the
    meta device in ``test_real_wan_configuration_planned_on_the_meta_device``)."""
    import diffusers
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = diffusers.WanTransformer3DModel(
            patch_size=(1, 2, 2), in_channels=4, out_channels=4, freq_dim=256, num_layers=layers,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
            num_attention_heads=2, attention_head_dim=8, text_dim=16, ffn_dim=32).eval()
    return model


def _inputs(device: str = "cpu", t: float = 1000.0):
    return dict(hidden_states=torch.randn(1, 4, 4, 8, 8, device=device),
                timestep=torch.tensor([t], device=device),
                encoder_hidden_states=torch.randn(1, 6, 16, device=device), return_dict=False)


def _generation(model, options: dict) -> foresight_compile.Stats:
    torch._dynamo.reset()
    fast = torch.compile(model, backend="foresight",
                         options={**options, "lowering": "eager", "strict": True})
    inputs = _inputs()
    with torch.no_grad(), foresight_compile.generation(num_steps=STEPS):
        for t in torch.linspace(1000, 100, STEPS):
            fast(**{**inputs, "timestep": t.reshape(1)})
    return foresight_compile.stats(fast)


# Exit activation of _deep_wan on _inputs: (1, 4 frames * 4 * 4 patches, 16 wide) float32.
ACTIVATION = 64 * 16 * 4
LATENT = 4 * 4 * 8 * 8 * 4


@pytest.fixture(scope="module")
def deep_wan():
    return _deep_wan()


@pytest.fixture(scope="module")
def generations(deep_wan):
    """One generation per options set on the 30-block model, shared by the tests (each
    costs a trace of 30 blocks)."""
    done: dict = {}

    def run(**options):
        key = tuple(sorted(options.items()))
        if key not in done:
            done[key] = (_generation(deep_wan, {"warmup": 3, **options}),
                         [bool(ts) for ts in _only_state(deep_wan).buffers.tensors])
        return done[key]
    return run


def _only_state(model):
    (program,) = programs_of(model)
    (state,) = program.controller.live_states() or program.controller._pool
    return state


def test_default_holds_two_exit_activations_and_the_latent_whatever_the_depth(generations):
    stats, held = generations(tolerance=10.0)
    assert stats.reused_fraction > 0  # it served steps from that cache
    assert stats.cache_bytes == 2 * ACTIVATION + LATENT  # <= 3 exit activations + one latent
    # the exit alone; the 29 blocks inside the region hold nothing
    assert [l for l, has in enumerate(held) if has] == [29]


@pytest.mark.parametrize("policy", ["static", "foresight"])
def test_per_block_policies_hold_one_value_per_block(generations, policy):
    stats, held = generations(policy=policy)
    assert all(held)
    assert stats.cache_bytes == 30 * ACTIVATION


def test_region_exit_is_not_used_when_an_inner_value_leaves_the_region():
    class Escaping(ToyDiT):
        """The epilogue also reads block 0's output: the exit alone cannot stand for it."""

        def forward(self, hidden_states, timestep):
            temb = self.t_embed(timestep[:, None].float() / 1000)[:, None, :]
            x = first = self.blocks[0](hidden_states, temb)
            for block in self.blocks[1:]:
                x = block(x, temb)
            return (self.out(x) + first,)

    torch.manual_seed(0)
    model = Escaping(layers=3).eval()
    reference, _ = toy_loop(model, 12)
    fast = torch.compile(model, backend="foresight",
                         options={"lowering": "eager", "strict": True, "tolerance": 10.0})
    with foresight_compile.generation(num_steps=12):
        got, _ = toy_loop(fast, 12)
    (program,) = programs_of(model)
    assert program.layout.cached == (True, True, True)  # every block keeps its cache
    assert foresight_compile.stats(fast).reused_fraction > 0
    assert rel_err(got, reference) < 0.5  # served values, still the model's
    torch._dynamo.reset()


# Planning 30 blocks on the meta device costs a trace: the default suite plans the default,
# the benchmark job the per-block policy and the narrower storages too.
_PLANNED = [pytest.param({"tolerance": 10.0}, 2 * ACTIVATION + LATENT, id="default"),
            pytest.param({"policy": "static"}, 30 * ACTIVATION, marks=pytest.mark.slow,
                         id="static"),
            pytest.param({"order": 2, "cache_dtype": "bfloat16"}, 3 * ACTIVATION // 2 + LATENT,
                         marks=pytest.mark.slow, id="order2-bf16"),  # 3 bf16 slots
            pytest.param({"policy": "foresight", "cache_dtype": "float8_e4m3fn"},
                         30 * (ACTIVATION // 4 + 4), marks=pytest.mark.slow, id="foresight-fp8")]


@pytest.mark.parametrize("options, formula", _PLANNED)
def test_plan_cache_on_meta_inputs_equals_what_a_generation_then_holds(generations, options,
                                                                       formula):
    meta_model = _deep_wan(device="meta")
    (plan,) = foresight_compile.plan_cache(meta_model, **_inputs("meta"), options=[options])
    stats, _ = generations(**options)
    assert plan.bytes_per_branch == stats.cache_bytes, (options, plan)
    # the formula: slots x exit activation (+ the scales of a scaled storage) + the latent
    assert plan.bytes_per_branch == formula
    if options == {"tolerance": 10.0}:
        assert plan.cached_blocks == ("blocks.29",) and plan.slots == 2
        assert "region exit (blocks.29)" in str(plan)


def test_max_cache_bytes_below_the_plan_raises_at_compile_time_with_what_fits():
    # The default caches the exit only, so its bytes do not depend on the depth: 3 blocks
    # of the same architecture need what 30 need.
    shallow = _deep_wan(layers=3)
    torch._dynamo.reset()
    needed = 2 * ACTIVATION + LATENT
    fast = torch.compile(shallow, backend="foresight",
                         options={"lowering": "eager", "max_cache_bytes": needed - 1})
    with pytest.raises(ForesightValueError) as raised:
        with torch.no_grad():
            fast(**_inputs())
    message = str(raised.value)
    assert f"needs {needed} bytes" in message and f"'max_cache_bytes'={needed - 1}" in message
    assert f"order=0, cache_dtype=None ({ACTIVATION + LATENT} bytes)" in message
    assert programs_of(shallow) == []  # nothing compiled, nothing allocated
    torch._dynamo.reset()
    stats = _generation(shallow, {"max_cache_bytes": needed, "tolerance": 10.0})
    assert stats.cache_bytes == needed  # at the ceiling: runs


def test_max_cache_bytes_is_checked_again_for_shapes_seen_later():
    model = ToyDiT(layers=3).eval()
    fast = torch.compile(model, backend="foresight", dynamic=True,
                         options={"lowering": "eager", "strict": True, "policy": "static",
                                  "max_cache_bytes": 3 * 4 * 8 * 4 * 4})
    with torch.no_grad(), foresight_compile.generation(num_steps=4):
        fast(hidden_states=torch.randn(1, 4 * 4, 8), timestep=torch.tensor([999.0]))
    with torch.no_grad(), pytest.raises(ForesightValueError, match="these inputs need"):
        with foresight_compile.generation(num_steps=4):
            fast(hidden_states=torch.randn(1, 4 * 5, 8), timestep=torch.tensor([999.0]))
    torch._dynamo.reset()


@pytest.mark.parametrize("storage, dtype, per_value", [
    ("bfloat16", torch.bfloat16, 0), ("float8_e4m3fn", torch.float8_e4m3fn, 1)])
def test_cache_dtype_stores_narrow_and_serves_in_the_model_dtype(storage, dtype, per_value):
    torch.manual_seed(0)
    model = ToyDiT(dim=16, layers=3).eval()
    options = {"policy": "static", "warmup": 2, "recompute_every": 3}
    outputs = {}
    for name, extra in (("wide", {}), ("narrow", {"cache_dtype": storage})):
        torch._dynamo.reset()
        fast = torch.compile(model, backend="foresight",
                             options={**options, **extra, "lowering": "eager", "strict": True})
        with foresight_compile.generation(num_steps=12):
            outputs[name], _ = toy_loop(fast, 12, shape=(1, 4, 16))
        stats = foresight_compile.stats(fast)
    (program,) = programs_of(model)
    (state,) = program.controller.live_states() or program.controller._pool
    held = state.buffers.tensors[0]
    assert held[0].dtype == dtype and len(held) == 1 + per_value
    assert stats.cache_bytes == 3 * (4 * 16 * dtype.itemsize + 4 * per_value)
    assert outputs["narrow"].dtype == torch.float32 and stats.reused_fraction > 0
    # what narrowing costs: the stored values' rounding, nothing more
    error = rel_err(outputs["narrow"], outputs["wide"])
    assert 0 < error < (2e-2 if per_value else 5e-3)
    torch._dynamo.reset()


def test_pooled_states_count_in_the_report_and_stay_bounded():
    torch.manual_seed(0)
    model = ToyDiT(layers=3).eval()
    fast = torch.compile(model, backend="foresight",
                         options={"lowering": "eager", "strict": True, "policy": "static"})
    for _ in range(8):  # eight requests, one after the other
        with foresight_compile.generation(num_steps=4):
            toy_loop(fast, 4)
    stats = foresight_compile.stats(fast)
    per_state = 3 * 4 * 8 * 4
    assert stats.pooled_bytes == per_state == stats.cache_bytes  # one released state kept
    assert "pooled" in str(stats)
    torch._dynamo.reset()
