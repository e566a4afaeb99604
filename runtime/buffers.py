"""CacheBuffers: one preallocated tensor per (block, block output) of one CFG branch.

Buffers are allocated at a block's first compute in a generation, for that shape and
dtype, and afterwards only written in place (``copy_``), so their addresses stay fixed
for CUDA graphs and engine bindings. A different shape or dtype reallocates (and logs).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class CacheBuffers:
    def __init__(self, num_blocks: int) -> None:
        self.tensors: list[tuple[torch.Tensor, ...] | None] = [None] * num_blocks

    def store(self, block: int, outputs: tuple[torch.Tensor, ...]) -> None:
        """Copy ``outputs`` into block's buffers, allocating them if absent or mismatched."""
        current = self.tensors[block]
        if current is None or any(c.shape != o.shape or c.dtype != o.dtype or c.device != o.device
                                  for c, o in zip(current, outputs)):
            if current is not None:
                log.info("reallocating cache buffers of block %d for shapes %s",
                         block, [tuple(o.shape) for o in outputs])
            self.tensors[block] = tuple(torch.empty_like(o, memory_format=torch.contiguous_format)
                                        for o in outputs)
        torch._foreach_copy_(list(self.tensors[block]), list(outputs))

    def invalidate(self) -> None:
        """Forget every cached value (the memory is released)."""
        self.tensors = [None] * len(self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for ts in self.tensors if ts is not None for t in ts)

    def __repr__(self) -> str:
        held = sum(ts is not None for ts in self.tensors)
        return f"CacheBuffers({held}/{len(self.tensors)} blocks, {self.nbytes} bytes)"
