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
from foresight_compile.runtime.policies.base import PolicyState, ReusePolicy


@register_policy("foresight")
class ForesightReuse(ReusePolicy):
    needs_metric = True

    def __init__(self, options) -> None:
        super().__init__(options)
        # prefix: reuse l iff some block at depth >= l is under its threshold, i.e.
        # (upper-triangular ones @ under) > 0; made once per device and block count.
        self._prefix: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def computes_all(self, step: int, warmup: int | None, total: int | None = None,
                     run: int = 0) -> bool:
        if warmup is None or step < warmup:
            return True
        return (step - warmup) % self.options.recompute_every == 0

    def decide(self, state: PolicyState, out: torch.Tensor) -> None:
        torch.le(state.mse, state.thresholds, out=out)
        if self.options.decision == "per_layer":
            return
        key = (out.device, out.shape[0])
        if key not in self._prefix:
            n = out.shape[0]
            self._prefix[key] = (torch.ones(n, n, device=out.device).triu(),
                                 torch.zeros(n, device=out.device),
                                 torch.zeros(n, device=out.device))
        upper, under, count = self._prefix[key]
        under.copy_(out)
        torch.mv(upper, under, out=count)
        torch.gt(count, 0.5, out=out)

    def observe(self, step: int, warmup: int | None, state: PolicyState, clock=None,
                total: int | None = None) -> None:
        if warmup is not None and step == warmup - 1:
            torch.mul(state.mse, self.options.threshold, out=state.thresholds)
