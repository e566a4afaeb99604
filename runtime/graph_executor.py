"""GraphFormExecutor: runs the graph form (one graph, a ``cond`` per block) in torch.

The graph is ``insert_cache_branches(..., in_place=True)`` lowered whole: ``fn(*args,
reuse_mask, *caches, *rows) -> outputs`` (the caches and metric rows of the blocks that
hold a cache: every block, or the region exit alone). Each call writes the host mask into the branch's
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
from foresight_compile.runtime.staging import HostToDevice
from foresight_compile.runtime.state import BranchState


class GraphFormExecutor(Executor):
    def __init__(self, graph_fn: Callable, controller: ReuseController,
                 cache_specs: tuple[tuple[tuple[tuple[int, ...], torch.dtype], ...], ...]) -> None:
        """``cache_specs[l]``: ``(shape, dtype)`` of each of block l's cached values (empty:
        the block holds no cache)."""
        self.fn = graph_fn
        self.controller = controller
        self.cache_specs = cache_specs
        self.cached = tuple(l for l, specs in enumerate(cache_specs) if specs)
        self._masks: "weakref.WeakKeyDictionary[BranchState, HostToDevice]" = weakref.WeakKeyDictionary()

    def run(self, state: BranchState, args) -> tuple:
        buffers = state.buffers
        if not buffers.has(self.cached[0]):
            for l in self.cached:
                buffers.allocate_empty(l, self.cache_specs[l], state.device)
        mask_input = self._masks.get(state)
        if mask_input is None:
            mask_input = self._masks[state] = HostToDevice(
                torch.zeros(len(self.cache_specs), dtype=torch.bool, device=state.device))
        rows = state.policy_state.rows
        caches = [t for l in self.cached for t in buffers.held(l)]
        result = self.fn(*args, mask_input.write(state.mask), *caches,
                         *(rows[l] for l in self.cached))
        return tuple(result)
