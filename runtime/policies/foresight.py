"""Foresight adaptive reuse (Adnan et al., arXiv 2506.00329), as DESIGN.md section 3 states it.

* Steps ``0..W-1`` compute every block; at step ``W-1`` the threshold of block ``l`` is
  ``lambda * MSE(out_l(W-1), out_l(W-2))``.
* After warmup, steps with ``(s - W) % R == 0`` compute every block (refreshing MSE and cache).
* Other steps reuse block ``l`` when ``mse[l] <= thr[l]`` (``decision="per_layer"``, the
  paper), or reuse blocks ``0..k`` for the deepest ``k`` under its threshold
  (``decision="prefix"``, the released code). Blocks that compute refresh their MSE and cache.

Deliberately unlike the released code: state is reset per generation (the controller does
it), each block is compared with its own cache, and MSE is computed in float32.
"""
from __future__ import annotations

import torch

from foresight_compile.runtime.policies import register_policy
from foresight_compile.runtime.policies.base import MSE, PolicyState, ReusePolicy


@register_policy("foresight")
class ForesightReuse(ReusePolicy):
    needs_metric = True

    def computes_all(self, step: int, warmup: int | None, total: int | None = None) -> bool:
        if warmup is None or step < warmup:
            return True
        return (step - warmup) % self.options.recompute_every == 0

    def reusable(self, state: PolicyState) -> torch.Tensor:
        under = state.metrics[:, MSE] <= state.thresholds
        if self.options.decision == "per_layer":
            return under
        # prefix: reuse l iff some block at depth >= l is under its threshold
        return under.flip(0).cumsum(0).flip(0) > 0

    def observe(self, step: int, warmup: int | None, state: PolicyState) -> None:
        if warmup is not None and step == warmup - 1:
            torch.mul(state.metrics[:, MSE], self.options.threshold, out=state.thresholds)
