"""The policy interface and the per-branch device state it reads and writes."""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

# Column layout of PolicyState.metrics.
MSE, FINITE = 0, 1
# Each block's metric row starts on its own 64-byte boundary: the compiled update segments
# write their row in place, and compiled code may assume aligned inputs (Triton does).
ROW_STRIDE = 16


@dataclasses.dataclass
class PolicyState:
    """Device tensors of one branch, allocated once and then only written in place.

    ``metrics[l] = (mse, finite)`` is written by block ``l``'s compiled update each time it
    computes: the MSE (float32) of its output (or residual) against its cache, and 1.0 when
    every output element is finite. ``thresholds`` belongs to the policy. ``rows[l]`` is
    the view of block ``l``'s row that the update writes; ``mse``/``finite`` are column
    views, so nothing is indexed per step."""

    storage: torch.Tensor  # float32 [L, ROW_STRIDE]; metrics is its first two columns
    thresholds: torch.Tensor  # float32 [L]
    metrics: torch.Tensor = dataclasses.field(init=False)  # float32 [L, 2] (view)
    rows: tuple[torch.Tensor, ...] = dataclasses.field(init=False)
    mse: torch.Tensor = dataclasses.field(init=False)
    finite: torch.Tensor = dataclasses.field(init=False)
    scratch: torch.Tensor = dataclasses.field(init=False)  # bool [L], for policies' out=

    def __post_init__(self) -> None:
        self.metrics = self.storage[:, :2]
        self.rows = tuple(self.storage[l, :2] for l in range(self.storage.shape[0]))
        self.mse = self.metrics[:, MSE]
        self.finite = self.metrics[:, FINITE]
        self.scratch = torch.zeros(self.storage.shape[0], dtype=torch.bool,
                                   device=self.storage.device)

    @classmethod
    def allocate(cls, num_blocks: int, device: torch.device) -> "PolicyState":
        return cls(storage=torch.zeros(num_blocks, ROW_STRIDE, dtype=torch.float32, device=device),
                   thresholds=torch.full((num_blocks,), -1.0, dtype=torch.float32, device=device))

    def reset(self) -> None:
        self.storage.zero_()
        self.thresholds.fill_(-1.0)


class ReusePolicy:
    """Base class. Subclasses set ``needs_cache``/``needs_metric`` and override the hooks.

    Every device hook writes into preallocated tensors (``out=``, in-place ops): the
    controller calls them on every step and a step allocates nothing."""

    name: ClassVar[str] = "?"
    needs_cache: ClassVar[bool] = True  # False: never reuses, so no buffers are kept
    needs_metric: ClassVar[bool] = False  # True: stats report the change metric and thresholds

    def __init__(self, options) -> None:
        self.options = options

    def computes_all(self, step: int, warmup: int | None, total: int | None = None) -> bool:
        """Host decision before ``step`` of a generation of ``total`` steps (None: unknown):
        True when every block must compute."""
        raise NotImplementedError

    def decide(self, state: PolicyState, out: torch.Tensor) -> None:
        """Device decision for a step that is not ``computes_all``: write bool [L] into
        ``out``, True = reuse."""
        raise NotImplementedError

    def caches_residual(self, block: int) -> bool:
        """True: block's cache holds ``out - in`` and reuse serves ``in + residual``."""
        return self.options.reuse == "residual"

    def observe(self, step: int, warmup: int | None, state: PolicyState) -> None:
        """After ``step`` ran (its metrics are in ``state``): update device state in place."""
