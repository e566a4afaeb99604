"""StepHistory: a bounded ring of what each model evaluation decided and measured.

One row per evaluation: process-wide call order, request, generation, branch, step, the
reuse mask (host data, written into preallocated numpy arrays), and the timestep, the
change metric and the thresholds after the step (device data, copied in place into
preallocated device tensors, so recording never waits on the device). Device rows are read
to the host only when ``rows()`` is asked for (``foresight_compile.stats``).

The ring holds the last ``capacity`` rows: memory stays constant however many generations
run (the previous design kept up to 100,000 rows of fresh device tensors).
"""
from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import torch

HISTORY_ROWS = 8192
# Process-wide call order, so rows of several graphs (and controllers) interleave correctly.
_CALLS = itertools.count()


@dataclasses.dataclass(frozen=True)
class HistoryRows:
    """Host copies of the ring's rows, oldest first."""

    call: list[int]
    request: list[int]
    generation: list[int]
    branch: list[int]
    step: list[int]
    timestep: list[float]
    mask: list[list[bool]]
    change: list[list[float] | None]
    thresholds: list[list[float] | None]


class _DeviceRing:
    """The device half of the ring, on one device."""

    def __init__(self, capacity: int, num_blocks: int, device: torch.device) -> None:
        self.timestep = torch.full((capacity,), math.nan, dtype=torch.float64, device=device)
        self.change = torch.zeros(capacity, num_blocks, dtype=torch.float32, device=device)
        self.thresholds = torch.zeros(capacity, num_blocks, dtype=torch.float32, device=device)


class StepHistory:
    def __init__(self, num_blocks: int, capacity: int = HISTORY_ROWS) -> None:
        if capacity < 1:
            raise ValueError(f"history capacity must be >= 1, got {capacity}")
        self.num_blocks = num_blocks
        self.capacity = capacity
        self.count = 0  # rows recorded since the last clear (may exceed capacity)
        self._call = np.zeros(capacity, dtype=np.int64)
        self._ints = np.zeros((capacity, 4), dtype=np.int64)  # request, generation, branch, step
        self._mask = np.zeros((capacity, num_blocks), dtype=np.bool_)
        self._device = np.full(capacity, -1, dtype=np.int64)  # index into _rings, -1: none
        self._has_metric = np.zeros(capacity, dtype=np.bool_)
        self._host_timestep = np.full(capacity, math.nan)
        self._rings: list[_DeviceRing] = []
        self._ring_of: dict[torch.device, int] = {}

    def _ring(self, device: torch.device) -> int:
        index = self._ring_of.get(device)
        if index is None:
            index = self._ring_of[device] = len(self._rings)
            self._rings.append(_DeviceRing(self.capacity, self.num_blocks, device))
        return index

    def record(self, request: int, generation: int, branch: int, step: int, mask,
               timestep, device: torch.device, change: torch.Tensor | None,
               thresholds: torch.Tensor | None) -> None:
        """Append one row. ``timestep`` is a float (already read on the host) or a tensor
        (copied on the device: no sync). ``change``/``thresholds`` are float32 [L] device
        tensors or None."""
        slot = self.count % self.capacity
        self.count += 1
        self._call[slot] = next(_CALLS)
        self._ints[slot] = (request, generation, branch, step)
        self._mask[slot] = mask
        ring_index = self._ring(device)
        ring = self._rings[ring_index]
        self._device[slot] = ring_index
        if isinstance(timestep, torch.Tensor):
            ring.timestep[slot].copy_(timestep.reshape(-1)[0], non_blocking=True)
            self._host_timestep[slot] = math.nan
        else:
            ring.timestep[slot].fill_(math.nan)
            self._host_timestep[slot] = timestep
        self._has_metric[slot] = change is not None
        if change is not None:
            ring.change[slot].copy_(change)
            ring.thresholds[slot].copy_(thresholds)

    def clear(self) -> None:
        self.count = 0

    def __len__(self) -> int:
        return min(self.count, self.capacity)

    def rows(self) -> HistoryRows:
        """The rows held, oldest first (reads the device rings: a sync, on request only)."""
        n = len(self)
        order = [(self.count - n + i) % self.capacity for i in range(n)]
        host = [(r.timestep.cpu().numpy(), r.change.cpu().numpy(), r.thresholds.cpu().numpy())
                for r in self._rings]
        timestep, change, thresholds = [], [], []
        for slot in order:
            device_ts, device_change, device_thr = host[self._device[slot]]
            value = self._host_timestep[slot]
            timestep.append(float(device_ts[slot] if math.isnan(value) else value))
            if self._has_metric[slot]:
                change.append(device_change[slot].tolist())
                thresholds.append(device_thr[slot].tolist())
            else:
                change.append(None)
                thresholds.append(None)
        ints = self._ints[order]
        return HistoryRows(call=self._call[order].tolist(), request=ints[:, 0].tolist(),
                           generation=ints[:, 1].tolist(), branch=ints[:, 2].tolist(),
                           step=ints[:, 3].tolist(), timestep=timestep,
                           mask=self._mask[order].tolist(), change=change, thresholds=thresholds)
