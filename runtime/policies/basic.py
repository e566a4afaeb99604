"""The two simple policies: ``none`` (never reuse) and ``static`` (FORA-like)."""
from __future__ import annotations

import torch

from foresight_compile.runtime.policies.base import PolicyState, ReusePolicy


class NoReuse(ReusePolicy):
    """Never reuse: the overhead and equivalence baseline."""

    name = "none"
    needs_cache = False

    def computes_all(self, step: int, warmup: int | None, total: int | None = None,
                     run: int = 0) -> bool:
        return True

    def decide(self, state: PolicyState, out: torch.Tensor) -> None:
        out.fill_(False)


class StaticReuse(ReusePolicy):
    """Compute every block on steps ``s < W`` and ``(s - W) % N == 0``; reuse all otherwise."""

    name = "static"

    def computes_all(self, step: int, warmup: int | None, total: int | None = None,
                     run: int = 0) -> bool:
        if warmup is None or step < warmup:
            return True
        return (step - warmup) % self.options.recompute_every == 0

    def decide(self, state: PolicyState, out: torch.Tensor) -> None:
        out.fill_(True)
