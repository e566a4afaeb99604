"""StepClock: when each block last computed, and the forecast weights that follow from it.

Forecast reuse (``order`` k >= 1) serves block ``l`` at step ``t`` the extrapolation through
its last ``k + 1`` computed values ``v_0`` (newest), ``v_1``, ... at steps ``s_0 > s_1 > ...``:
the Lagrange (equivalently, Newton finite-difference / Taylor) polynomial, evaluated at ``t``,

    F(t) = sum_j w_j v_j,    w_j = prod_{i != j} (t - s_i) / (s_j - s_i),

which is exact when the served quantity is a polynomial of degree <= k in the step index,
whatever the distances between the computed steps. With fewer than ``k + 1`` values of
this generation the order drops to what is there (one value: a copy). The host knows every
``s_i`` (it decided the masks), so it computes the weights (a few float operations per
block) and writes them into a preallocated table the compiled serve and update segments
read: a changing distance never recompiles anything. On the CPU the table is written
through a numpy view; on CUDA through a pinned host copy, queued without blocking.

The last row of the table holds scalars a policy passes to its device decision.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from foresight_compile.runtime.policies.base import ROW_STRIDE


class StepClock:
    def __init__(self, num_blocks: int, order: int, device: torch.device) -> None:
        if order not in (0, 1, 2):
            raise ValueError(f"forecast order must be 0, 1 or 2, got {order!r}")
        self.num_blocks = num_blocks
        self.order = order
        self.slots = order + 1  # history values kept per block
        self.device_table = torch.zeros(num_blocks + 1, ROW_STRIDE, dtype=torch.float32,
                                        device=device)
        cuda = device.type == "cuda"
        self._host = (torch.zeros_like(self.device_table, device="cpu", pin_memory=True)
                      if cuda else self.device_table)
        self._view = self._host.numpy()
        self._copied = torch.cuda.Event() if cuda else None
        # Per block, the weights row the compiled segments read, and the policy scalars.
        self.weights = tuple(self.device_table[l, :self.slots] for l in range(num_blocks))
        self.scalars = self.device_table[num_blocks]
        self.steps = np.full((num_blocks, self.slots), math.nan)  # newest first
        self.valid = np.zeros(num_blocks, dtype=np.int64)  # values of this generation held
        # Physical history slot holding each block's newest value: a compute writes over
        # the oldest slot, which becomes the newest (slots rotate; values never move).
        self.newest = np.zeros(num_blocks, dtype=np.int64)
        self.run = 0  # steps since the last step that computed every block
        self.all_computed_at = -1

    def reset(self) -> None:
        self.steps[:] = math.nan
        self.valid[:] = 0
        self.run = 0
        self.all_computed_at = -1

    def held(self, block: int) -> bool:
        """Block ``block`` has a value of this generation to serve."""
        return self.valid[block] > 0

    def _push(self) -> None:
        if self._copied is not None:
            self._copied.synchronize()  # the previous copy, long done
            self.device_table.copy_(self._host, non_blocking=True)
            self._copied.record()

    def _lagrange(self, t: float) -> np.ndarray:
        """[L, slots] weights of the forecast at step ``t`` (zeros past each block's valid)."""
        s = self.steps
        w = np.zeros_like(s)
        for j in range(self.slots):
            term = np.ones(self.num_blocks)
            for i in range(self.slots):
                if i != j:
                    with np.errstate(invalid="ignore", divide="ignore"):
                        factor = (t - s[:, i]) / (s[:, j] - s[:, i])
                    # Points past a block's valid count do not take part (factor 1).
                    term = term * np.where(i < self.valid, factor, 1.0)
            w[:, j] = np.where(j < self.valid, term, 0.0)
        return w

    def prepare(self, step: int) -> None:
        """Weights of the forecast at ``step`` into the device table (before the step runs)."""
        if self.order:
            self._view[: self.num_blocks, : self.slots] = self._lagrange(float(step))
            self._push()

    def record(self, step: int, mask) -> None:
        """After ``step``: blocks that computed (mask False) push ``step`` into their history."""
        computed = ~np.asarray(mask, dtype=np.bool_)
        if computed.any():
            self.steps[computed, 1:] = self.steps[computed, :-1]
            self.steps[computed, 0] = step
            self.valid[computed] = np.minimum(self.valid[computed] + 1, self.slots)
            self.newest[computed] = (self.newest[computed] + 1) % self.slots
        if computed.all():
            self.all_computed_at = step
            self.run = 0
        else:
            self.run += 1

    def set_scalars(self, values) -> None:
        """Policy scalars for the device decision (the table's last row)."""
        self._view[self.num_blocks, : len(values)] = values
        self._push()
