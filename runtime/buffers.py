"""CacheBuffers: the preallocated cache tensors of one CFG branch, per block.

A block's cache is a tuple of tensors (one per block output, holding the output or the
residual ``out - in``). Buffers are allocated at a block's first compute for a given input
signature, then only written in place: by the compiled update segment (segments, CUDA
graphs), by the graph form's branches, or by an engine's bound outputs. Their addresses
stay fixed for CUDA graphs and engine bindings. A different shape, dtype or device
reallocates (and logs).

Engines that cannot write in place (an ONNX ``If`` returns new tensors) keep two banks: a
step reads bank ``p`` and writes bank ``1 - p``; ``flip()`` makes the written bank the one
the next step reads. ``nbytes`` counts every bank.

Nothing outside this class assigns cache tensors: executors allocate through ``store``,
``allocate`` or ``install`` and write only into the tensors ``held`` returns.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

log = logging.getLogger(__name__)


class CacheBuffers:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._banks: list[list[tuple[torch.Tensor, ...] | None]] = [[None] * num_blocks]
        self._current = 0
        self.probe: torch.Tensor | None = None  # the previous step's latent (latent change)
        self._aged: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}

    def held(self, block: int) -> tuple[torch.Tensor, ...] | None:
        """The tensors block ``block``'s next step reads (None: nothing cached)."""
        return self._banks[self._current][block]

    @property
    def tensors(self) -> tuple[tuple[torch.Tensor, ...] | None, ...]:
        """Per block, the tensors the next step reads (read-only view)."""
        return tuple(self._banks[self._current])

    def aged(self, block: int, newest: int, slots: int) -> tuple[torch.Tensor, ...]:
        """A forecast history (``slots`` values per output, slot-major) in age order, newest
        first, when physical slot ``newest`` holds the newest value: slots rotate, values
        never move."""
        key = (block, newest)
        found = self._aged.get(key)
        if found is None:
            held = self._banks[self._current][block]
            n = len(held) // slots
            found = self._aged[key] = tuple(held[((newest - i) % slots) * n + k]
                                            for i in range(slots) for k in range(n))
        return found

    def has(self, block: int) -> bool:
        return self._banks[self._current][block] is not None

    def allocate(self, block: int, like: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Buffers for ``block`` with the shapes, dtypes and strides of ``like`` (kept if
        they already match).

        ``like`` are the block's computed outputs: a served value must have the layout the
        downstream segments were compiled for (their compiled code assumes their inputs'
        strides; Latte's blocks read permuted views and write contiguous outputs)."""
        current = self._banks[self._current][block]
        if current is None or len(current) != len(like) or any(
                c.shape != o.shape or c.dtype != o.dtype or c.device != o.device
                or c.stride() != o.stride() for c, o in zip(current, like)):
            if current is not None:
                log.info("reallocating cache buffers of block %d for shapes %s",
                         block, [tuple(o.shape) for o in like])
            current = tuple(torch.empty_like(o) for o in like)  # preserve_format: same strides
            self._banks[self._current][block] = current
            self._aged.clear()
        return current

    def allocate_empty(self, block: int, specs: Sequence[tuple[tuple[int, ...], torch.dtype]],
                       device: torch.device) -> tuple[torch.Tensor, ...]:
        """Zeroed buffers for ``block`` from ``(shape, dtype)`` specs (graph form: the shapes
        are the traced ones)."""
        current = tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in specs)
        self._banks[self._current][block] = current
        self._aged.clear()
        return current

    def store(self, block: int, values: Sequence[torch.Tensor],
              like: Sequence[torch.Tensor] | None = None) -> None:
        """Copy ``values`` into block's buffers, allocating them like ``like`` (default:
        like ``values``) if absent or mismatched."""
        torch._foreach_copy_(list(self.allocate(block, values if like is None else like)),
                             list(values))

    def install(self, banks: Sequence[Sequence[tuple[torch.Tensor, ...]]]) -> None:
        """Take preallocated tensors, ``banks[b][block]``: one bank (buffers written in
        place, e.g. CUDA graphs' static outputs) or two (engines; see ``flip``)."""
        if len(banks) not in (1, 2) or any(len(b) != self.num_blocks for b in banks):
            raise ValueError(f"install() takes 1 or 2 banks of {self.num_blocks} blocks")
        self._banks = [list(b) for b in banks]
        self._current = 0
        self._aged.clear()

    def flip(self) -> None:
        """Two banks: the bank just written becomes the one the next step reads."""
        self._current ^= len(self._banks) - 1
        self._aged.clear()

    def probe_like(self, latent: torch.Tensor) -> torch.Tensor:
        """The buffer holding the previous step's latent (allocated like ``latent``)."""
        probe = self.probe
        if probe is None or probe.shape != latent.shape or probe.dtype != latent.dtype \
                or probe.device != latent.device:
            probe = self.probe = torch.zeros_like(latent, memory_format=torch.contiguous_format)
        return probe

    def invalidate(self) -> None:
        """Forget every cached value (the memory is released)."""
        self._banks = [[None] * self.num_blocks]
        self._current = 0
        self.probe = None
        self._aged.clear()

    @property
    def nbytes(self) -> int:
        probe = 0 if self.probe is None else self.probe.nbytes
        return probe + sum(t.nbytes for bank in self._banks for ts in bank if ts is not None
                           for t in ts)

    def __repr__(self) -> str:
        held = sum(ts is not None for ts in self._banks[self._current])
        return (f"CacheBuffers({held}/{self.num_blocks} blocks, {len(self._banks)} bank(s), "
                f"{self.nbytes} bytes)")
