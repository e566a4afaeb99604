"""CacheHistory: what one branch's cache holds, and the one owner of the slot contract.

**Layout** (``HistoryLayout``: decided once per compiled graph, the same for every branch):
which blocks hold a cache, and how many values (``slots``) of each cached tensor they keep.

* A policy that decides per block (``foresight``, ``static``, ``profiling``) caches every
  block: a served block's value is its own.
* A policy that decides per step for every block at once (``budget``) caches only the
  *region exit*: the last block, whose outputs are everything the rest of the model reads of
  the block region (``passes.partition.region_exit``). The blocks inside the region hold
  nothing: on a served step none of them runs (the exit's forecast feeds the epilogue), on a
  computed step they run plainly. A branch then holds ``slots`` exit activations, the latent
  probe and O(blocks) scalars, however deep the model.
* ``slots`` is the forecast order + 1 (1: the newest value is served as is).

**Slot contract.** A cached block keeps ``slots`` values of each cached tensor in physical
slots that never move (addresses stay fixed for CUDA graphs and engine bindings); ``newest``
names, per block, the physical slot holding its newest value. ``aged(l)`` lists the block's
tensors newest first, slot-major (``h[0][0..n-1], h[1][0..n-1], ...``): what the block's
compiled update and serve take (``passes/cache_update.py``). A compute writes its new values
over the oldest slot (the last ``n`` of ``aged(l)``) and ``record`` then makes that slot the
newest: the slots rotate, no value is copied.

**Forecast.** A served block at step ``t`` gets ``F(t) = sum_j w_j v_j`` over its values
``v_0`` (newest), ``v_1``, ... computed at steps ``s_0 > s_1 > ...``, with the Lagrange
weights ``w_j = prod_{i != j} (t - s_i) / (s_j - s_i)``: exact when the cached quantity is a
polynomial of degree <= order in the step, whatever the distances (Taylor / Newton finite
differences, TaylorSeer arXiv 2503.06923). With fewer values of this generation the order
drops to what is there (one value: a copy). The host knows every ``s_i`` (it decided the
masks), computes the weights before each step (``prepare``) and writes them into a device
table the compiled segments read (``runtime/staging.py``): a changing distance never
recompiles anything.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
import torch

from foresight_compile.runtime.buffers import CacheBuffers
from foresight_compile.runtime.staging import HostToDevice

# Each block's weights row starts on its own 64-byte boundary (compiled code may assume
# aligned inputs).
ROW_FLOATS = 16


@dataclasses.dataclass(frozen=True)
class HistoryLayout:
    """Per block, whether it holds a cache; values kept per cached tensor."""

    cached: tuple[bool, ...]
    slots: int = 1
    max_bytes: int | None = None  # the ``max_cache_bytes`` ceiling of one branch
    # The history's dtype name when not the cached values' own (``cache_dtype``); a float8
    # storage keeps a float32 scale beside each value.
    storage: str | None = None

    def __post_init__(self) -> None:
        if self.slots not in (1, 2, 3):
            raise ValueError(f"history slots must be 1, 2 or 3 (forecast order 0-2), got {self.slots!r}")

    @classmethod
    def every_block(cls, num_blocks: int, slots: int = 1, max_bytes: int | None = None,
                    storage: str | None = None) -> "HistoryLayout":
        return cls((True,) * num_blocks, slots, max_bytes, storage)

    @classmethod
    def exit_only(cls, num_blocks: int, exit_block: int, slots: int = 1,
                  max_bytes: int | None = None, storage: str | None = None) -> "HistoryLayout":
        return cls(tuple(l == exit_block for l in range(num_blocks)), slots, max_bytes, storage)

    @property
    def scaled(self) -> bool:
        """Each stored value has a float32 scale beside it (float8 storage)."""
        return self.storage is not None and self.storage.startswith("float8")

    @property
    def num_blocks(self) -> int:
        return len(self.cached)

    @property
    def order(self) -> int:
        return self.slots - 1

    @property
    def cached_blocks(self) -> tuple[int, ...]:
        return tuple(l for l, c in enumerate(self.cached) if c)

    @property
    def exit_only_region(self) -> bool:
        """Only the region exit holds a cache (a step-level policy on a multi-block model)."""
        return self.num_blocks > 1 and sum(self.cached) == 1


class CacheHistory:
    """One branch's cached values, when each was computed, and the forecast weights."""

    def __init__(self, layout: HistoryLayout, device: torch.device, copies=None) -> None:
        """``copies``: the host-to-device copy engine of the weights table (tests)."""
        self.layout = layout
        self.num_blocks = layout.num_blocks
        self.slots = layout.slots
        self.buffers = CacheBuffers(self.num_blocks, layout.max_bytes)
        self.table = HostToDevice(torch.zeros(self.num_blocks, ROW_FLOATS, dtype=torch.float32,
                                              device=device), copies)
        # Per block, the weights row the compiled segments read.
        self.weights = tuple(self.table.device_tensor[l, :self.slots]
                             for l in range(self.num_blocks))
        self.steps = np.full((self.num_blocks, self.slots), math.nan)  # newest first
        self.valid = np.zeros(self.num_blocks, dtype=np.int64)  # values of this generation
        self.newest = np.zeros(self.num_blocks, dtype=np.int64)  # physical slot of the newest
        self.run = 0  # steps since the last step that computed every block
        self.all_computed_at = -1
        self._aged: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self._aged_version = -1

    @property
    def device_table(self) -> torch.Tensor:
        """float32 [L, 16]: row ``l`` starts with block ``l``'s forecast weights."""
        return self.table.device_tensor

    # -- generations ---------------------------------------------------------------------
    def start(self, same_inputs: bool) -> None:
        """A new generation. Buffers are kept for inputs of the same signature (every
        cached block overwrites its cache at step 0 before any reuse) and released for
        others; the probe's previous latent is cleared (another generation's)."""
        if not same_inputs:
            self.buffers.invalidate()
        elif self.buffers.probe is not None:
            self.buffers.probe.zero_()
        self.steps[:] = math.nan
        self.valid[:] = 0
        self.run = 0
        self.all_computed_at = -1

    def held(self, block: int) -> bool:
        """Block ``block`` has a value of this generation (cached blocks: one to serve)."""
        return self.valid[block] > 0

    def held_mask(self) -> list[bool]:
        return (self.valid > 0).tolist()

    # -- the slot contract -----------------------------------------------------------------
    def aged(self, block: int, newest: int | None = None) -> tuple[torch.Tensor, ...]:
        """Block ``block``'s cached tensors, newest first (slot-major), when physical slot
        ``newest`` (default: the current one) holds the newest value."""
        if newest is None:
            newest = int(self.newest[block])
        buffers = self.buffers
        if buffers.version != self._aged_version:
            self._aged.clear()
            self._aged_version = buffers.version
        key = (block, newest)
        found = self._aged.get(key)
        if found is None:
            held = buffers.held(block)
            slots = self.slots
            n = len(held) // slots
            found = self._aged[key] = tuple(held[((newest - i) % slots) * n + k]
                                            for i in range(slots) for k in range(n))
        return found

    def allocate(self, block: int, like: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Buffers of every slot of ``block``, each like the block's computed ``like`` (in
        the storage dtype, with a float32 scale per value when scaled), in physical slot
        order."""
        layout = self.layout
        like = tuple(like)
        dtypes = [None if layout.storage is None else getattr(torch, layout.storage)] * len(like)
        if layout.scaled:
            like += tuple(o.new_empty((), dtype=torch.float32) for o in like)
            dtypes += [None] * (len(like) // 2)
        return self.buffers.allocate(block, like * self.slots, dtypes * self.slots)

    def record(self, step: int, mask: Sequence[bool]) -> None:
        """After ``step``: every block that computed (mask False) wrote its oldest slot,
        which becomes its newest."""
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

    # -- forecast weights ----------------------------------------------------------------
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
        """The forecast weights at ``step`` into the device table (before the step runs)."""
        if self.slots > 1:
            view = self.table.begin()
            view[:, : self.slots] = self._lagrange(float(step))
            self.table.commit()

    @property
    def nbytes(self) -> int:
        return self.buffers.nbytes

    def __repr__(self) -> str:
        return (f"CacheHistory({len(self.layout.cached_blocks)}/{self.num_blocks} blocks cached, "
                f"{self.slots} slot(s), {self.buffers!r})")
