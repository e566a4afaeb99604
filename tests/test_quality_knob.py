"""The default policy's quality knob swept on the trained models (eager lowering, fidelity
only; speed follows the served share, which a timing would only blur).

``tolerance`` and ``max_run``: the served share never falls as the knob rises, and the
final PSNR against the uncached run never rises by more than ``ALLOWANCE``. The default
suite sweeps one model at 30 steps; the benchmark job the three shipped models at 30 and 50.

What the allowance stands for (``examples/estimate_vs_truth.py``): within a run of served
steps the errors add coherently; across runs they add or cancel depending on where the runs
fall, and early runs (high noise, the largest propagated errors) cancel part of what later
runs add. Which steps a run covers shifts with the knob, and with it that cancellation, by
1-4 dB. Measured: computing the first tenth of the steps (``warmup=0.1``, no early runs)
made ``max_run`` monotone on the tiny video DiT (52.5, 46.0, 42.0, 37.0 dB for runs of 2, 3,
4, 6) and the tiny HunyuanVideo, but cost 2-5 dB at the default (tiny video DiT, 50 steps,
with a tail of a tenth of the steps: 68% served at 40.3 dB against 70% at 44.1 dB): the
default's fidelity includes that cancellation. Forecasts extrapolated in sigma instead of
the step index (3-7 dB worse at the default), of order 2 (as non-monotone), and of the
region's residual instead of its output (-3.1 to +0.5 dB) did not remove it. The cases that still rise by more than the allowance are xfails (not strict: which step a
run covers can flip on another CPU's rounding, and with it these realisations):
tolerance 0.2 -> 0.4 on the tiny CogVideoX at 30 steps (41.5 then 43.3 dB) and on the tiny
HunyuanVideo at 50 (45.8 then 47.2 dB), 0.6 -> 1.0 on the tiny video DiT at 50 (40.8 then
41.8 dB at the same 76% served); ``max_run`` 2 -> 3 -> 4 at 50 steps on the tiny video DiT
(42.8, 43.9, 45.7 dB) and 2 -> 3 on the tiny HunyuanVideo (51.5 then 55.6 dB).
"""
from __future__ import annotations

import pytest
import torch

import foresight_compile
from foresight_compile import models
from foresight_compile.bench.metrics import psnr

ALLOWANCE = 0.5  # dB
TOLERANCES = (0.1, 0.2, 0.4, 0.6, 1.0)
WORKLOADS = ("tiny-video", "tiny-video-cogvideox", "tiny-video-hunyuan")  # models.FACTORIES
# Measured realisations that still rise by more than the allowance (module docstring).
_INTERFERENCE = {("tiny-video-cogvideox", 30): "0.2 -> 41.5 dB, 0.4 -> 43.3 dB",
                 ("tiny-video-hunyuan", 50): "0.2 -> 45.8 dB, 0.4 -> 47.2 dB",
                 ("tiny-video", 50): "0.6 -> 40.8 dB, 1.0 -> 41.8 dB (both 76% served)"}


def _sweep(name: str, steps: int, option_sets: list[dict]) -> list[tuple[float, float]]:
    """(served share, PSNR dB) per option set, one generation each."""
    dit = models.FACTORIES[name](prompts=4)
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
    pytest.param(n, s, marks=pytest.mark.xfail(
        strict=False, reason=f"interference between runs: {_INTERFERENCE[n, s]}"))
    if (n, s) in _INTERFERENCE else (n, s) for n, s in _CASES])
def test_tolerance_is_monotone_on_every_trained_model(name, steps):
    _assert_monotone(_sweep(name, steps, [{"tolerance": t} for t in TOLERANCES]), TOLERANCES)


@pytest.mark.slow
@pytest.mark.parametrize("name", [
    pytest.param("tiny-video", marks=pytest.mark.xfail(strict=False, reason=(
        "interference between runs: runs of 2, 3, 4 -> 42.8, 43.9, 45.7 dB"))),
    "tiny-video-cogvideox",
    pytest.param("tiny-video-hunyuan", marks=pytest.mark.xfail(strict=False, reason=(
        "interference between runs: runs of 2 -> 51.5 dB, of 3 -> 55.6 dB")))])
def test_max_run_is_monotone_on_every_trained_model(name):
    runs = (2, 3, 4, 6)
    # a tolerance that never binds: the run limit alone decides
    _assert_monotone(_sweep(name, 50, [{"tolerance": 100.0, "max_run": r} for r in runs]), runs)
