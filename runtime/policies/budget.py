"""``budget``: step-level reuse with forecasts, under a measured error budget (ours).

Every step either computes every block or serves every block a forecast (``order`` k: the
Taylor / Lagrange extrapolation through its last k + 1 computed values, ``cache_history.py``). Why
every block together: when blocks decide on their own, a block that computes reads a
served (forecast) input, and that value enters its history and its finite differences;
measured on the trained tiny video DiT, per-block decisions with forecasts lost 8-20 dB
against the same rule applied to all blocks at once. With all blocks served, only the last
block's forecast reaches the output (the executor runs nothing else of the stack).

The decision follows a signal, not a schedule (TaylorSeer's fixed interval, Foresight's
every-R-steps refresh):

* at each step that computes, the forecast the cache would have served is measured against
  what the stack really produced: ``e = |Y - F| / |Y|`` of the last block's output, at the
  distance ``g`` (steps) from the previous compute; since an order-k extrapolation's error
  grows as ``g^(k+1)``, the error rate is ``c = e / g^(k+1)``;
* the sample's own pace, the relative change of the model's input between the last two
  steps, ``rho``, scales it: the change per step is large early and late in a generation
  (a trained model's block change is U-shaped), small in between;
* serving step ``t`` is estimated to cost ``est = c * (t - s)^(k+1) * RHO_SCALE * rho`` (``s``
  the last compute); a run of served steps accumulates ``A += est``; step ``t`` is served
  while ``A + est <= tolerance``, and every block computes again when it is not. The first
  ``order + 2`` steps (warmup) compute, so the history and ``c`` are measured before any
  reuse; the last ``TAIL`` steps compute (their error lands in the output undamped); at
  most ``max_run`` steps in a row are served (default: an eighth of the generation).

``tolerance`` is the one quality knob: larger serves more steps (a run ends later). It
governs the steps after the first quarter of a generation of known length; the first
quarter is decided at the default's budget and run limit (``EARLY_FRACTION``), unless the
knob is near exact (``tolerance`` up to ``NEAR_EXACT``, or ``max_run=1``). Why: the early
runs' errors are the largest, and the dynamics carry them against what later runs add, so
where the early runs fall sets how much of the final error cancels. A knob that moved them
moved the final PSNR by 1-4 dB either way (``examples/estimate_vs_truth.py``;
docs/DESIGN.md, "What a served step costs"); with them fixed, over ``tolerance`` 0.1-1.0
and ``max_run`` 2-6 on the three trained models, the served share never falls and the PSNR
never rises by more than 0.5 dB as the knob rises (tests/test_quality_knob.py). A length
read from the timesteps (a bare loop's first generation) counts too: early in a shifted
schedule it reads long, so that generation's first "quarter" lasts longer; a Wan 2.2
expert's generation is its own run of steps, as for warm-up and tail.

All of it runs on the device, from the previous step's metrics (or the one before, with
``lookahead=2``): the decision is a bool written into a preallocated flag, host scalars
(distances between steps) enter as Python floats of in-place ops, nothing is allocated and
nothing is read back.
"""
from __future__ import annotations

import math

import torch

from foresight_compile.runtime.policies.base import PolicyState, ReusePolicy

# The last two steps compute: their error lands in the output undamped. Longer tails were
# measured (examples/estimate_vs_truth.py, the sweep of tests/test_quality_knob.py): the
# last tenth of the steps (5 of 50) gave on the three trained models the same points as
# two with a smaller tolerance (tiny-video, 50 steps: 70% served at 44.1 dB either way),
# and 3-4 fewer points of reuse at the default, which took the 50-step speedup under 3x.
TAIL = 2
# A run of served steps spans at most 1/8 of the generation (unless max_run says otherwise):
# measured on both trained models, 50 and 30 steps, longer runs lost 2-6 dB at the same reuse
# (the budget's estimate grows with the gap, but not as fast as the true error far out).
RUN_FRACTION = 8
# The first quarter of a generation (steps t with 4 t < total) is decided at the default's
# budget and run limit (module docstring). Measured on the three trained models at 30 and 50
# steps, sweeping tolerance 0.1-1.0 and max_run 2-6 (tests/test_quality_knob.py): 6 of 33
# sweep steps rose by more than 0.5 dB with the knob deciding every step; none with the
# first quarter fixed; one each (0.9 and 1.1 dB) with the first fifth or the first 3/10.
EARLY_FRACTION = 4
EARLY_TOLERANCE = 0.4  # the default tolerance (foresight_compile.Options; a test holds them equal)
# Early served steps help only when later runs have errors for theirs to cancel. With a
# near-exact tolerance few late steps are served, and early runs at the default's budget
# cost what the tolerance was meant to keep (50 steps, tolerance 0.005: the tiny video DiT
# 48 dB at 16% served with them, the exact output without; the tiny CogVideoX 51.5 dB with
# an early budget of four times the tolerance, 69.6 dB at the tolerance itself). So up to
# NEAR_EXACT the first quarter runs at the tolerance itself, as every step does; from
# FULL_EARLY up at EARLY_TOLERANCE; between, its budget rises linearly from NEAR_EXACT to
# EARLY_TOLERANCE. There the knob is not monotone: measured on the tiny video DiT at 50
# steps, 0.05 served 54% at 48.5 dB, 0.1 66% at 49.1 dB.
NEAR_EXACT = 0.05
FULL_EARLY = 0.1
# rho is about 1/steps in the middle of a generation; the scale makes est ~ c * g^(k+1) there,
# so a tolerance reads as "accumulated relative error of served steps".
RHO_SCALE = 50.0
# aux columns: latent change sums (written by the executor's probe), rate, accumulated
# estimate, per-parity pending estimates, rho, scratch.
_DIFF, _NORM, _RATE, _ACC, _EST, _RHO, _TMP, _FULL, _NEAR = 0, 1, 2, 3, 4, 6, 7, 8, 9


class BudgetReuse(ReusePolicy):
    name = "budget"
    needs_metric = False
    needs_latent_change = True
    step_level = True

    def __init__(self, options) -> None:
        super().__init__(options)
        self.order = options.forecast_order
        self.power = self.order + 1
        self.lookahead = options.lookahead

    @property
    def default_warmup(self) -> int:  # type: ignore[override]
        return self.order + 2

    def computes_all(self, step: int, warmup: int | None, total: int | None = None,
                     run: int = 0) -> bool:
        if warmup is None or step < max(warmup, self.order + 2):
            return True
        if total is not None and step >= total - self.tail(total):
            return True
        return run >= self.max_run(total, step)

    @staticmethod
    def tail(total: int) -> int:
        """How many steps at the end of a generation of ``total`` steps compute (``TAIL``
        whatever the length: a longer tail moved points along the front, not above it)."""
        return TAIL

    def max_run(self, total: int | None, step: int) -> int:
        """The longest run of served steps reaching step ``step``: the option (in the first
        quarter only 1, no two served steps in a row), else an eighth of the generation."""
        option = self.options.max_run
        if option is not None and (option == 1 or not early(step, total)):
            return option
        return 8 if total is None else max(2, round(total / RUN_FRACTION))

    def tolerance_at(self, step: int, total: int | None) -> float:
        """The budget of a run reaching step ``step``: the option; in the first quarter the
        default's from ``FULL_EARLY`` up, the option up to ``NEAR_EXACT``, linear between."""
        tolerance = self.options.tolerance
        if not early(step, total) or tolerance <= NEAR_EXACT:
            return tolerance
        if tolerance >= FULL_EARLY:
            return EARLY_TOLERANCE
        share = (tolerance - NEAR_EXACT) / (FULL_EARLY - NEAR_EXACT)
        return NEAR_EXACT + share * (EARLY_TOLERANCE - NEAR_EXACT)

    def observe(self, step: int, warmup: int | None, state: PolicyState, history=None,
                total: int | None = None) -> None:
        aux = state.aux
        last = history.num_blocks - 1  # the region exit: its forecast is what is served
        if history.all_computed_at == step:
            previous = history.steps[last, 1]
            gap = 1.0 if math.isnan(previous) else step - previous
            torch.mul(state.ferr[last], 1.0 / gap ** self.power, out=aux[_RATE])
            aux[_ACC].zero_()
        else:
            aux[_ACC].add_(aux[_EST + step % 2])
        torch.div(aux[_DIFF], aux[_NORM], out=aux[_RHO])
        aux[_RHO].sqrt_()
        target = step + self.lookahead  # the step this end-of-step decision is for
        gap = target - history.steps[last, 0]
        est = aux[_EST + target % 2]
        torch.mul(aux[_RATE], aux[_RHO], out=est)
        if self.lookahead == 1:
            est.mul_(RHO_SCALE * gap ** self.power)
            torch.add(aux[_ACC], est, out=aux[_TMP])
        else:
            self._two_ahead(step, warmup, total, state, history, gap)
        # NaN (no latent change measured yet) compares False: compute.
        torch.le(aux[_TMP], self.tolerance_at(target, total), out=state.flags[0])

    def _two_ahead(self, step: int, warmup, total, state: PolicyState, history, gap: float) -> None:
        """Decide step t + 2 at the end of step t, before step t + 1 ran: step t + 1 computes
        when the host forces it or when the decision made at the end of step t - 1 (still
        in ``flags[0]``) said so; then t + 2 starts a new run (gap 1, nothing accumulated),
        else it continues the run through t + 1."""
        aux, flags = state.aux, state.flags
        est = aux[_EST + (step + 2) % 2]  # holds rate * rho
        if self.computes_all(step + 1, warmup, total, history.run):
            flags[1].fill_(False)
        else:
            flags[1].copy_(flags[0])  # step t + 1 is served
        # served through t + 1: A + est(t + 1) + est at the full gap; else est at gap 1
        full, near, continued = aux[_FULL], aux[_NEAR], aux[_TMP]
        torch.mul(est, RHO_SCALE * gap ** self.power, out=full)
        torch.mul(est, RHO_SCALE, out=near)
        torch.add(aux[_ACC], aux[_EST + (step + 1) % 2], out=continued)
        continued.add_(full)
        torch.where(flags[1], continued, near, out=continued)
        torch.where(flags[1], full, near, out=est)

    def decide(self, state: PolicyState, out: torch.Tensor) -> None:
        out.copy_(state.flags[0].expand(out.shape[0]))


def early(step: int, total: int | None) -> bool:
    """Step ``step`` lies in the first quarter of a generation of known length ``total``."""
    return total is not None and step * EARLY_FRACTION < total
