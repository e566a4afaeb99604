"""ProfilingDiT: block profile, background-only residual reuse, profile files, optimize()."""
import dataclasses

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import foresight_compile
from conftest import rel_err
from foresight_compile import models
from foresight_compile.profiling import BlockProfile, profile_blocks
from foresight_compile.runtime.policies.profiling import refresh_steps


def _profile(dit, seed=0):
    return profile_blocks(dit.model, lambda m: models.denoise(m, dit, 5), seed=seed)


def test_profile_is_deterministic_for_a_seed_and_covers_every_block():
    dit = models.wan(layers=4)
    a, b = _profile(dit), _profile(dit)
    assert a == b
    assert a.block_paths == [f"blocks.{i}" for i in range(4)] and a.input_shape == [1, 4, 8, 16, 16]
    assert all(0.0 <= r <= 1.0 for r in a.r_attn)
    assert a.foreground == [r >= a.tau for r in a.r_attn]


def test_profiling_does_not_change_the_models_output():
    dit = models.wan(layers=2)
    plain = models.denoise(dit.model, dit, 4)
    seen = []
    profile_blocks(dit.model, lambda m: seen.append(models.denoise(m, dit, 4)))
    assert torch.equal(seen[0], plain)


def test_refresh_interval_shrinks_from_max_to_min():
    steps = sorted(refresh_steps(warmup=6, total=50, interval_max=6, interval_min=2))
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert steps[0] == 6 and gaps[0] == 6 and gaps[-1] <= 3 and gaps == sorted(gaps, reverse=True)
    assert sorted(refresh_steps(4, None, 5, 2, horizon=20)) == [4, 9, 14, 19]
    assert sorted(refresh_steps(3, 1, 4, 2, horizon=10)) == [3, 7, 9]  # stale total: then Tmin


def test_background_blocks_reuse_residuals_and_foreground_blocks_always_compute():
    dit = models.wan(layers=4)
    prof = dataclasses.replace(_profile(dit), foreground=[True, False, True, False])
    fast = torch.compile(dit.model, backend="foresight", options={
        "policy": "profiling", "profile": prof, "warmup": 3, "interval_max": 4, "interval_min": 4,
        "lowering": "eager"})
    models.denoise(fast, dit, 1)
    foresight_compile.reset(fast, clear_stats=True)
    calls = []

    def counted(**kw):
        with profile(activities=[ProfilerActivity.CPU]) as prof_:
            out = fast(**kw)
        calls.append(sum(e.count for e in prof_.key_averages()
                         if e.key == "aten::scaled_dot_product_attention"))
        return out

    out = models.denoise(counted, dit, 12)
    s = foresight_compile.stats(fast)
    refresh = {0, 1, 2, 3, 7, 11}
    for step, (row, n) in enumerate(zip(s.mask, calls)):
        expected = [False] * 4 if step in refresh else [False, True, False, True]
        assert row == expected, step
        assert n == 2 * (4 - sum(row))  # two attentions per computed Wan block
    assert s.block_computes == [12, 6, 12, 6]
    assert rel_err(out, models.denoise(dit.model, dit, 12)) < 0.05


def test_profile_file_round_trips_and_mismatches_are_refused(tmp_path):
    dit = models.wan(layers=3)
    prof = _profile(dit)
    path = str(tmp_path / "wan.profile.json")
    prof.save(path)
    assert BlockProfile.load(path) == prof
    fast = torch.compile(dit.model, backend="foresight",
                         options={"policy": "profiling", "profile": path, "lowering": "eager"})
    models.denoise(fast, dit, 2)
    assert foresight_compile.stats(fast).steps == 2
    other = models.wan(layers=2)
    with pytest.raises(ValueError, match="profile made for 3 blocks"):
        models.denoise(torch.compile(other.model, backend="foresight",
                                     options={"policy": "profiling", "profile": path}), other, 1)
    torch._dynamo.reset()
    big = models.wan(layers=3, size=32)
    with pytest.raises(ValueError, match="input shape"):
        models.denoise(torch.compile(big.model, backend="foresight",
                                     options={"policy": "profiling", "profile": prof}), big, 1)
    with pytest.raises(ValueError, match="needs options\\['profile'\\]"):
        models.denoise(torch.compile(big.model, backend="foresight",
                                     options={"policy": "profiling"}), big, 1)
    (tmp_path / "bad.json").write_text('{"format": 99}')
    with pytest.raises(ValueError, match="format 99"):
        BlockProfile.load(str(tmp_path / "bad.json"))


def test_optimize_with_profiling_calibrates_on_the_first_call():
    from test_pipelines import wan_pipe
    pipe, run = wan_pipe()
    reference = run(8, 32)
    foresight_compile.optimize(pipe, policy="profiling", lowering="eager", warmup=2,
                               interval_max=3, interval_min=2)
    first = run(8, 32)
    assert torch.equal(first, reference)  # the calibration generation runs uncached
    prof = foresight_compile.calibrated_profile(pipe)
    assert prof is not None and len(prof.block_paths) == 2
    prof = dataclasses.replace(prof, foreground=[False, True])
    torch._dynamo.reset()
    foresight_compile.restore(pipe)
    foresight_compile.optimize(pipe, policy="profiling", profile=prof, lowering="eager",
                               warmup=2, interval_max=3, interval_min=2)
    run(8, 32)
    s = foresight_compile.stats(pipe.transformer)
    assert s.block_computes[1] == 16 and s.block_computes[0] < 16  # cond + uncond per step
