"""ProfilingDiT reuse (Ma et al., arXiv 2504.03140), on a ``BlockProfile``.

Foreground-focused blocks compute every step. Background blocks cache a residual
(``out - in``) and serve ``in + residual``: every block computes for ``warmup`` (``s0``)
steps, then caches refresh every ``T_s`` steps, ``T_s`` shrinking linearly from
``interval_max`` to ``interval_min`` over the remaining steps of the generation (constant
``interval_max`` when the step count is unknown). A contiguous run of background blocks is
served block by block: the sum of the blocks' residuals cached at one step is exactly the
run's residual ``out_b - in_a`` of that step (up to float rounding), at one add per block.
"""
from __future__ import annotations

import torch

from foresight_compile.errors import ForesightValueError
from foresight_compile.runtime.policies.base import PolicyState, ReusePolicy
from foresight_compile.runtime.policies.profile import BlockProfile


def refresh_steps(warmup: int, total: int | None, interval_max: int, interval_min: int,
                  horizon: int = 10_000) -> set[int]:
    """Steps (from ``warmup`` on) that recompute every block. Past ``total`` (a guess from
    a previous generation may be short) the interval stays at ``interval_min``."""
    steps, s = set(), warmup
    while s < max(horizon, total or 0):
        steps.add(s)
        if total is None:
            interval = interval_max
        else:
            frac = (s - warmup) / max(1, total - 1 - warmup)
            interval = round(interval_max - (interval_max - interval_min) * min(1.0, frac))
        s += max(1, interval)
    return steps


class ProfilingReuse(ReusePolicy):
    name = "profiling"
    def __init__(self, options) -> None:
        super().__init__(options)
        profile = options.profile
        if profile is None:
            raise ForesightValueError(
                "policy 'profiling' needs options['profile']: a path to a profile JSON or a "
                "BlockProfile from foresight_compile.profile_blocks(model, run); "
                "foresight_compile.optimize(pipe, policy='profiling') calibrates on its first call")
        self.profile = BlockProfile.load(profile) if isinstance(profile, str) else profile
        self._background = None
        self._schedule: dict[tuple, set[int]] = {}

    def computes_all(self, step: int, warmup: int | None, total: int | None = None,
                     run: int = 0) -> bool:
        if warmup is None or step < warmup:
            return True
        key = (warmup, total)
        if key not in self._schedule:
            self._schedule[key] = refresh_steps(warmup, total, self.options.interval_max,
                                                self.options.interval_min)
        return step in self._schedule[key]

    def decide(self, state: PolicyState, out: torch.Tensor) -> None:
        if self._background is None or self._background.device != out.device:
            self._background = torch.tensor([not fg for fg in self.profile.foreground],
                                            dtype=torch.bool, device=out.device)
        out.copy_(self._background)

    def caches_residual(self, block: int) -> bool:
        return not self.profile.foreground[block]
