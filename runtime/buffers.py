"""CacheBuffers: the preallocated cache tensors of one CFG branch, per block.

A block's cache is a tuple of tensors (per history slot, one per cached block output,
holding the output or the residual ``out - in``; which blocks cache and how the slots are
ordered is ``cache_history.py``'s business). Buffers are allocated at a block's first compute for a given input
signature, then only written in place: by the compiled update segment (segments, CUDA
graphs), by the graph form's branches, or by an engine's bound outputs. Their addresses
stay fixed for CUDA graphs and engine bindings. A different shape, dtype or device
reallocates (and logs).

Engines that cannot write in place (an ONNX ``If`` returns new tensors) keep two banks: a
step reads bank ``p`` and writes bank ``1 - p``; ``flip()`` makes the written bank the one
the next step reads. ``nbytes`` counts every bank.

Nothing outside this class assigns cache tensors: executors allocate through ``store``,
``allocate`` or ``install`` and write only into the tensors ``held`` returns. ``version``
changes whenever a held tensor is replaced (views of them must be rebuilt).

``limit`` (bytes, or None): an allocation that would make the buffers exceed it raises
``ForesightValueError`` before allocating (the ``max_cache_bytes`` option; the program checks
the same bytes at compile time, this catches input shapes it could not foresee).
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch

from foresight_compile.errors import ForesightValueError

log = logging.getLogger(__name__)


class CacheBuffers:
    def __init__(self, num_blocks: int, limit: int | None = None) -> None:
        self.num_blocks = num_blocks
        self.limit = limit
        self._banks: list[list[tuple[torch.Tensor, ...] | None]] = [[None] * num_blocks]
        self._current = 0
        self.probe: torch.Tensor | None = None  # the previous step's latent (latent change)
        self.version = 0

    def held(self, block: int) -> tuple[torch.Tensor, ...] | None:
        """The tensors block ``block``'s next step reads (None: nothing cached)."""
        return self._banks[self._current][block]

    @property
    def tensors(self) -> tuple[tuple[torch.Tensor, ...] | None, ...]:
        """Per block, the tensors the next step reads (read-only view)."""
        return tuple(self._banks[self._current])

    def has(self, block: int) -> bool:
        return self._banks[self._current][block] is not None

    def allocate(self, block: int, like: Sequence[torch.Tensor],
                 dtypes: Sequence[torch.dtype | None] | None = None) -> tuple[torch.Tensor, ...]:
        """Buffers for ``block`` with the shapes, strides and dtypes of ``like`` (``dtypes[k]``,
        when given and not None, replaces the k-th dtype), kept if they already match.

        ``like`` are the block's computed outputs: a served value must have the layout the
        downstream segments were compiled for (their compiled code assumes their inputs'
        strides; Latte's blocks read permuted views and write contiguous outputs)."""
        dtypes = [None] * len(like) if dtypes is None else list(dtypes)
        wanted = [d or o.dtype for o, d in zip(like, dtypes)]
        current = self._banks[self._current][block]
        if current is None or len(current) != len(like) or any(
                c.shape != o.shape or c.dtype != d or c.device != o.device
                or c.stride() != o.stride() for c, o, d in zip(current, like, wanted)):
            if current is not None:
                log.info("reallocating cache buffers of block %d for shapes %s",
                         block, [tuple(o.shape) for o in like])
            self._check_limit(block, sum(o.numel() * d.itemsize for o, d in zip(like, wanted)))
            # preserve_format: the same strides
            current = tuple(torch.empty_like(o, dtype=d) for o, d in zip(like, wanted))
            self._banks[self._current][block] = current
            self.version += 1
        return current

    def allocate_empty(self, block: int, specs: Sequence[tuple[tuple[int, ...], torch.dtype]],
                       device: torch.device) -> tuple[torch.Tensor, ...]:
        """Zeroed buffers for ``block`` from ``(shape, dtype)`` specs (graph form: the shapes
        are the traced ones)."""
        self._check_limit(block, sum(math.prod(shape) * torch.empty((), dtype=dtype).element_size()
                                     for shape, dtype in specs))
        current = tuple(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype in specs)
        self._banks[self._current][block] = current
        self.version += 1
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
        self.version += 1

    def flip(self) -> None:
        """Two banks: the bank just written becomes the one the next step reads."""
        self._current ^= len(self._banks) - 1
        self.version += 1

    def probe_like(self, latent: torch.Tensor) -> torch.Tensor:
        """The buffer holding the previous step's latent (allocated like ``latent``)."""
        probe = self.probe
        if probe is None or probe.shape != latent.shape or probe.dtype != latent.dtype \
                or probe.device != latent.device:
            self._check_limit(None, latent.nbytes)
            probe = self.probe = torch.zeros_like(latent, memory_format=torch.contiguous_format)
        return probe

    def invalidate(self) -> None:
        """Forget every cached value (the memory is released)."""
        self._banks = [[None] * self.num_blocks]
        self._current = 0
        self.probe = None
        self.version += 1

    def _check_limit(self, block: int | None, new_bytes: int) -> None:
        """``block`` None: the probe."""
        if self.limit is None:
            return
        held = self.probe if block is None else self._banks[self._current][block]
        if isinstance(held, torch.Tensor):
            held = (held,)
        total = self.nbytes - (0 if held is None else sum(t.nbytes for t in held)) + new_bytes
        if total > self.limit:
            what = "the latent probe" if block is None else f"block {block}"
            raise ForesightValueError(
                f"option 'max_cache_bytes'={self.limit}: these inputs need {total} bytes of cache "
                f"in this branch ({what} alone {new_bytes}); raise the ceiling, or shrink the "
                f"cache (order=0, cache_dtype='bfloat16') or the inputs")

    @property
    def nbytes(self) -> int:
        probe = 0 if self.probe is None else self.probe.nbytes
        return probe + sum(t.nbytes for bank in self._banks for ts in bank if ts is not None
                           for t in ts)

    def __repr__(self) -> str:
        held = sum(ts is not None for ts in self._banks[self._current])
        return (f"CacheBuffers({held}/{self.num_blocks} blocks, {len(self._banks)} bank(s), "
                f"{self.nbytes} bytes)")
