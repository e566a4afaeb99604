"""A bare ``torch.compile`` loop decides as the pipeline path does.

``generation(num_steps=N)`` tells the controller a generation's length, which sets the
default policy's tail (the last steps compute) and its run limit (an eighth of the steps).
A plain loop says nothing: the controller takes the last generation's length, and reads
the remaining length off the timesteps (``t / (t_prev - t)`` calls at this step's pace) for
the first generation, or when the timesteps say this one is shorter than the last.
"""
from __future__ import annotations

import pytest
import torch

import foresight_compile
from foresight_compile import models


def _served_steps(fast, steps: int) -> list[bool]:
    return [all(row) for row in foresight_compile.stats(fast).mask[-steps:]]


@pytest.fixture(scope="module", params=["tiny-video", "tiny-video-cogvideox",
                                        pytest.param("tiny-video-hunyuan", marks=pytest.mark.slow)])
def workload(request):
    return models.FACTORIES[request.param](prompts=1)


def test_the_bare_loop_decides_as_the_pipeline_path_from_the_second_generation(workload):
    steps = 30
    torch._dynamo.reset()
    fast = torch.compile(workload.model, backend="foresight",
                         options={"lowering": "eager", "strict": True})
    with foresight_compile.generation(num_steps=steps):
        models.denoise(fast, workload, steps)
    known = _served_steps(fast, steps)
    foresight_compile.reset(fast)
    bare = []
    for _ in range(2):  # two generations, no context: one after the other on this thread
        models.denoise(fast, workload, steps)
        bare.append(_served_steps(fast, steps))
    assert sum(known) >= steps // 3  # it serves
    assert bare[1] == known  # the second generation knows the length from the first
    # the first reads it off the timesteps: its tail computes, as the known length's does
    assert bare[0][-2:] == known[-2:] == [False, False]
    assert sum(bare[0]) >= sum(known) - 2
    torch._dynamo.reset()


def test_a_shorter_generation_after_a_longer_one_still_computes_its_tail(workload):
    torch._dynamo.reset()
    fast = torch.compile(workload.model, backend="foresight",
                         options={"lowering": "eager", "strict": True})
    models.denoise(fast, workload, 40)
    models.denoise(fast, workload, 20)  # the last length (40) is wrong for this one
    short = _served_steps(fast, 20)
    with foresight_compile.generation(num_steps=20):
        models.denoise(fast, workload, 20)
    assert short[-2:] == [False, False] == _served_steps(fast, 20)[-2:]
    assert any(short)
    torch._dynamo.reset()


@pytest.mark.parametrize("schedule", ["flow-matching shifted", "linear to zero"])
def test_the_length_read_off_the_timesteps_is_never_long_over_the_last_steps(schedule):
    from foresight_compile.runtime.controller import ReuseController
    from foresight_compile.runtime.state import BranchState
    steps = 30
    if schedule == "linear to zero":  # DDIM 'leading' spacing: ends at t = 0
        timesteps = [1000 - 1000 * (i + 1) / steps for i in range(steps)]
    else:  # diffusers' FlowMatchEulerDiscreteScheduler(shift=3)
        import diffusers
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps.tolist()
    state = BranchState.__new__(BranchState)
    state.length_source, state.total_steps = None, None
    guesses = []
    for i, t in enumerate(timesteps):
        state.step = i
        if i:
            ReuseController._infer_length(state, t)
            guesses.append(state.total_steps)
        state.last_timestep = t
    # never longer than the truth over the last steps (a long guess would serve the tail)
    assert all(g <= steps for g in guesses[-4:]), guesses
    assert all(g >= steps - 1 for g in guesses[-4:]), guesses  # and at most one step short
