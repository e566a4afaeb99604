"""Few-step generations (4-8 steps, as distilled Wan / LTX checkpoints run).

The default policy computes its warm-up (order + 2 steps, where the forecast's error rate is
measured) and its tail (the last 2 steps) whatever the length, so a generation of 5 steps or
fewer is the uncached one; from 6 steps on it serves only steps between the two, and only
what its measured error budget allows."""
from __future__ import annotations

import pytest
import torch

import foresight_compile
from conftest import rel_err
from foresight_compile import models


@pytest.fixture(scope="module", params=["tiny-video", "tiny-video-cogvideox"])
def workload(request):
    factory = {"tiny-video": models.tiny_video_workload,
               "tiny-video-cogvideox": models.tiny_cogvideox_workload}[request.param]
    return factory(prompts=1)


@pytest.mark.parametrize("steps", [4, 5, 8])
def test_few_steps_serve_only_between_warmup_and_tail(workload, steps):
    torch._dynamo.reset()
    reference = models.denoise(workload.model, workload, steps)
    fast = torch.compile(workload.model, backend="foresight",
                         options={"lowering": "eager", "strict": True})
    with foresight_compile.generation(num_steps=steps):
        out = models.denoise(fast, workload, steps)
    served = [i for i, row in enumerate(foresight_compile.stats(fast).mask) if any(row)]
    # warm-up: order 1 + 2 = 3 steps; tail: the last 2
    assert all(3 <= i < steps - 2 for i in served), served
    if steps <= 5:
        assert served == [] and rel_err(out, reference) <= 1e-5  # the uncached generation
    torch._dynamo.reset()
