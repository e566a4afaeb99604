"""The default policy's quality knob swept on the trained models (eager lowering, fidelity
only; speed follows the served share, which a timing would only blur).

``tolerance`` and ``max_run``: the served share never falls as the knob rises, and the
final PSNR against the uncached run never rises by more than ``ALLOWANCE``. The default
suite sweeps one model at 30 steps; the benchmark job both shipped models at 30 and 50.

What the allowance stands for (``examples/estimate_vs_truth.py``): within a run of served
steps the errors add coherently, across runs they partly cancel, so which steps a run covers
(it shifts with the knob) moves a realisation by up to 1-2 dB around the runs'
root-sum-square. The tiny CogVideoX at 30 steps still shows it between tolerance 0.2 and
0.4 (41.1 then 43.1 dB): a strict xfail until the policy removes that interference.
"""
from __future__ import annotations

import pytest
import torch

import foresight_compile
from foresight_compile import models
from foresight_compile.bench.metrics import psnr

ALLOWANCE = 0.5  # dB
TOLERANCES = (0.1, 0.2, 0.4, 0.6, 1.0)
WORKLOADS = {"tiny-video": models.tiny_video_workload,
             "tiny-video-cogvideox": models.tiny_cogvideox_workload}


def _sweep(name: str, steps: int, option_sets: list[dict]) -> list[tuple[float, float]]:
    """(served share, PSNR dB) per option set, one generation each."""
    dit = WORKLOADS[name](prompts=4)
    reference = models.denoise(dit.model, dit, steps)
    points = []
    for options in option_sets:
        torch._dynamo.reset()
        fast = torch.compile(dit.model, backend="foresight",
                             options={"lowering": "eager", "strict": True, **options})
        with foresight_compile.generation(num_steps=steps):
            out = models.denoise(fast, dit, steps)
        points.append((foresight_compile.stats(fast).reused_fraction, psnr(out, reference)))
    torch._dynamo.reset()
    return points


def _assert_monotone(points, labels) -> None:
    for (served, db), (next_served, next_db), a, b in zip(points, points[1:], labels, labels[1:]):
        assert next_served >= served, f"{b} serves less than {a}: {points}"
        assert next_db <= db + ALLOWANCE, f"{b} is {next_db - db:.1f} dB above {a}: {points}"
    assert points[-1][0] > points[0][0]  # the knob does something


def test_tolerance_is_monotone_on_the_trained_video_dit_at_30_steps():
    tolerances = (0.1, 0.4, 1.0)
    points = _sweep("tiny-video", 30, [{"tolerance": t} for t in tolerances])
    _assert_monotone(points, tolerances)


_CASES = [(n, s) for n in WORKLOADS for s in (30, 50)]


@pytest.mark.slow
@pytest.mark.parametrize("name, steps", [
    pytest.param(n, s, marks=pytest.mark.xfail(strict=True, reason=(
        "interference between runs: 0.2 -> 41.1 dB, 0.4 -> 43.1 dB (module docstring)")))
    if (n, s) == ("tiny-video-cogvideox", 30) else (n, s) for n, s in _CASES])
def test_tolerance_is_monotone_on_every_trained_model(name, steps):
    _assert_monotone(_sweep(name, steps, [{"tolerance": t} for t in TOLERANCES]), TOLERANCES)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_max_run_is_monotone_on_every_trained_model(name):
    runs = (2, 3, 4, 6)
    # a tolerance that never binds: the run limit alone decides
    _assert_monotone(_sweep(name, 50, [{"tolerance": 100.0, "max_run": r} for r in runs]), runs)
