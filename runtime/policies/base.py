"""The policy interface and the per-branch device state it reads and writes."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

# Column layout of PolicyState.metrics.
MSE, FINITE = 0, 1


@dataclasses.dataclass
class PolicyState:
    """Device tensors of one branch. ``metrics[l] = (mse, finite)`` is written by the executor
    each time block ``l`` computes: the MSE (float32) of its output against its cache, and 1.0
    when every output element is finite."""

    metrics: torch.Tensor  # float32 [L, 2]
    thresholds: torch.Tensor  # float32 [L]
    rows: tuple[torch.Tensor, ...] = ()  # views metrics[l], made once: no per-step indexing

    def __post_init__(self) -> None:
        self.rows = self.metrics.unbind(0)

    @classmethod
    def allocate(cls, num_blocks: int, device: torch.device) -> "PolicyState":
        return cls(metrics=torch.zeros(num_blocks, 2, dtype=torch.float32, device=device),
                   thresholds=torch.full((num_blocks,), -1.0, dtype=torch.float32, device=device))

    def reset(self) -> None:
        self.metrics.zero_()
        self.thresholds.fill_(-1.0)


class ReusePolicy:
    """Base class. Subclasses set ``needs_cache``/``needs_metric`` and override the hooks."""

    name: ClassVar[str] = "?"
    needs_cache: ClassVar[bool] = True  # False: never reuses, so no buffers are kept
    needs_metric: ClassVar[bool] = False  # True: the executor computes MSE against the cache

    def __init__(self, options) -> None:
        self.options = options

    def computes_all(self, step: int, warmup: int | None, total: int | None = None) -> bool:
        """Host decision before ``step`` of a generation of ``total`` steps (None: unknown):
        True when every block must compute."""
        raise NotImplementedError

    def reusable(self, state: PolicyState) -> torch.Tensor:
        """Device decision for a step that is not ``computes_all``: bool [L], True = reuse."""
        raise NotImplementedError

    def caches_residual(self, block: int) -> bool:
        """True: block's cache holds ``out - in`` and reuse serves ``in + residual``."""
        return self.options.reuse == "residual"

    def observe(self, step: int, warmup: int | None, state: PolicyState) -> None:
        """After ``step`` ran (its metrics are in ``state``): update device state."""
