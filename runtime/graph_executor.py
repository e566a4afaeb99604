"""GraphFormExecutor: runs the graph form (one graph, a ``cond`` per block) in torch.

The graph is ``insert_cache_branches(..., in_place=True)`` lowered whole: ``fn(*args,
reuse_mask, *caches, *rows) -> outputs``. Each call writes the host mask into the branch's
preallocated mask tensor (through a numpy view on the CPU; a pinned host tensor and a
non-blocking copy on CUDA) and passes the branch's cache buffers and metric rows; the
computed blocks' branches write their caches and rows in place. Nothing is copied back and
nothing is allocated per call but what the graph returns.

Needs static shapes: cache buffers are allocated from the traced output shapes at a
branch's first call.
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch

from foresight_compile.runtime.controller import ReuseController
from foresight_compile.runtime.executor import Executor
from foresight_compile.runtime.state import BranchState


class _MaskInput:
    """One branch's device mask tensor and the host tensor the host mask is written into."""

    def __init__(self, num_blocks: int, device: torch.device) -> None:
        self.device_mask = torch.zeros(num_blocks, dtype=torch.bool, device=device)
        cuda = device.type == "cuda"
        self.host = (torch.zeros(num_blocks, dtype=torch.bool, pin_memory=True) if cuda
                     else self.device_mask)
        self.view = self.host.numpy()
        self.copied = torch.cuda.Event() if cuda else None

    def write(self, mask: list[bool]) -> torch.Tensor:
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's copy, long done
        self.view[:] = mask
        if self.copied is not None:
            self.device_mask.copy_(self.host, non_blocking=True)
            self.copied.record()
        return self.device_mask


class GraphFormExecutor(Executor):
    def __init__(self, graph_fn: Callable, controller: ReuseController,
                 cache_specs: tuple[tuple[tuple[tuple[int, ...], torch.dtype], ...], ...]) -> None:
        """``cache_specs[l]``: ``(shape, dtype)`` of each of block l's outputs."""
        self.fn = graph_fn
        self.controller = controller
        self.cache_specs = cache_specs
        self._masks: "weakref.WeakKeyDictionary[BranchState, _MaskInput]" = weakref.WeakKeyDictionary()

    def run(self, state: BranchState, args) -> tuple:
        buffers = state.buffers
        if not buffers.has(0):
            for l, specs in enumerate(self.cache_specs):
                buffers.allocate_empty(l, specs, state.device)
        mask_input = self._masks.get(state)
        if mask_input is None:
            mask_input = self._masks[state] = _MaskInput(len(self.cache_specs), state.device)
        caches = [t for l in range(len(self.cache_specs)) for t in buffers.held(l)]
        result = self.fn(*args, mask_input.write(state.mask), *caches,
                         *state.policy_state.rows)
        return tuple(result)
