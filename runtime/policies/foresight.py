"""Foresight adaptive reuse (Adnan et al., arXiv 2506.00329), as docs/DESIGN.md section 3 states it.

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

from foresight_compile.runtime.policies.base import PolicyState, ReusePolicy


class ForesightReuse(ReusePolicy):
    name = "foresight"
    needs_metric = True

    def new_state(self, num_blocks: int, device: torch.device) -> PolicyState:
        state = super().new_state(num_blocks, device)
        if self.options.decision == "prefix":
            # prefix: reuse l iff some block at depth >= l is under its threshold, i.e.
            # (upper-triangular ones @ under) > 0. The scratch is the branch's own: requests
            # decide concurrently, outside the controller's lock.
            state.scratch = (torch.ones(num_blocks, num_blocks, device=device).triu(),
                             torch.zeros(num_blocks, device=device),
                             torch.zeros(num_blocks, device=device))
        return state

    def computes_all(self, step: int, warmup: int | None, total: int | None = None,
                     run: int = 0) -> bool:
        if warmup is None or step < warmup:
            return True
        return (step - warmup) % self.options.recompute_every == 0

    def decide(self, state: PolicyState, out: torch.Tensor) -> None:
        torch.le(state.mse, state.thresholds, out=out)
        if self.options.decision == "per_layer":
            return
        upper, under, count = state.scratch  # new_state's, this branch's own
        under.copy_(out)
        torch.mv(upper, under, out=count)
        torch.gt(count, 0.5, out=out)

    def observe(self, step: int, warmup: int | None, state: PolicyState, clock=None,
                total: int | None = None) -> None:
        if warmup is not None and step == warmup - 1:
            torch.mul(state.mse, self.options.threshold, out=state.thresholds)
