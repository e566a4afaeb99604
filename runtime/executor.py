"""Executors: run a partitioned graph with each block behind its conditional cache branch.

``SegmentExecutor`` is the host-branch form of DESIGN.md section 2: prologue, blocks, glue
and epilogue are separately lowered segments, and a precomputed plan calls them in order.
For block ``l`` the host mask decides:

* reuse: serve the cache buffers (cloned only where the value escapes or is mutated later);
* compute: run the block; with a cache, the block's metric variant also returns
  ``[mse, finite]`` against the cache, which lands in ``metrics[l]``; then the outputs are
  copied into the buffers in place.

The per-call path does no graph work, allocates no Python containers beyond the argument
lists of the calls, and reads no device value (the mask was copied to the host a step
ahead by the controller).
"""
from __future__ import annotations

import operator
from typing import Callable

import torch

from foresight_compile.lowering import SegmentCompiler
from foresight_compile.passes.partition import Segmented
from foresight_compile.runtime.controller import ReuseController
from foresight_compile.runtime.plan import build_plan
from foresight_compile.runtime.policies.base import FINITE


def _gather(slots: tuple[int, ...]) -> Callable[[list], tuple]:
    if len(slots) == 1:
        (only,) = slots
        return lambda env: (env[only],)
    return operator.itemgetter(*slots)  # one C call instead of a Python loop per segment


def _all_finite(outputs) -> torch.Tensor:
    return torch.stack([torch.isfinite(o).all() for o in outputs]).all().to(torch.float32)


class SegmentExecutor:
    def __init__(self, segmented: Segmented, controller: ReuseController,
                 compiler: SegmentCompiler) -> None:
        self.controller = controller
        self.compiler = compiler
        self.uses_cache = controller.policy.needs_cache
        policy = controller.policy
        residual = tuple(pairs if policy.caches_residual(l) else None
                         for l, pairs in enumerate(segmented.residual_inputs))
        plan = build_plan(segmented, compiler, self.uses_cache, residual)
        self.steps = plan.steps
        # Per step, a C-level gather of its argument slots (hot path).
        self.gathers = tuple(_gather(step.inputs) for step in plan.steps)
        self.output_spec = plan.output_spec
        self.num_args = plan.num_args
        self.num_slots = plan.num_slots
        self.block_computes = [0] * len(segmented.block_submods)
        self._signature: tuple | None = None

    def _rebind(self, signature: tuple) -> None:
        for step in self.steps:
            step.segment.unbind()
            if step.tracked is not None:
                step.tracked.unbind()
        self._signature = signature

    def __call__(self, *args):
        state = self.controller.begin(args)
        if state.signature != self._signature:
            self._rebind(state.signature)
        env: list = [None] * self.num_slots
        env[: self.num_args] = args
        mask = state.mask
        held = state.buffers.tensors
        rows = state.policy_state.rows
        for step, gather in zip(self.steps, self.gathers):
            ins = gather(env)
            l = step.block
            if l < 0:
                outs = step.segment(*ins)
            elif mask[l]:
                if step.residual is None:
                    outs = tuple(b.clone() if c else b for b, c in zip(held[l], step.clone))
                else:
                    outs = tuple(torch.add(ins[p], r) for p, r in zip(step.residual, held[l]))
            elif not self.uses_cache:
                outs = step.segment(*ins)
                self.block_computes[l] += 1
            elif held[l] is not None:
                result = step.tracked(*ins, *held[l])
                n = len(step.outputs)
                outs = result[:n]
                rows[l].copy_(result[-1])
                torch._foreach_copy_(list(held[l]), list(result[n:-1] if step.residual else outs))
                self.block_computes[l] += 1
            else:
                outs = step.segment(*ins)
                state.buffers.store(l, outs if step.residual is None else
                                    tuple(o - ins[p] for o, p in zip(outs, step.residual)))
                rows[l][FINITE].copy_(_all_finite(outs))
                self.block_computes[l] += 1
            for slot, value in zip(step.outputs, outs):
                if slot >= 0:
                    env[slot] = value
        self.controller.end(state)
        return tuple(env[v] if kind == "slot" else v for kind, v in self.output_spec)


class GraphFormExecutor:
    """Runs the graph form (one graph, a ``cond`` per block, cache as explicit state).

    Each call passes the host mask as a bool tensor and the branch's cache buffers as
    inputs, then writes the returned block outputs back into the buffers and the stats of
    computed blocks into the policy metrics. Needs static shapes: cache buffers are
    allocated from the traced output shapes at a generation's first call.
    """

    def __init__(self, graph_fn, controller: ReuseController,
                 cache_specs: tuple[tuple[tuple[int, ...], torch.dtype], ...],
                 outputs_per_block: tuple[int, ...], num_outputs: int) -> None:
        self.fn = graph_fn
        self.controller = controller
        self.cache_specs = cache_specs
        self.outputs_per_block = outputs_per_block
        self.num_outputs = num_outputs
        self.uses_cache = controller.policy.needs_cache
        self.block_computes = [0] * len(outputs_per_block)

    def _allocate(self, state, device: torch.device) -> None:
        specs = iter(self.cache_specs)
        for l, n in enumerate(self.outputs_per_block):
            state.buffers.tensors[l] = tuple(torch.zeros(shape, dtype=dtype, device=device)
                                             for shape, dtype in (next(specs) for _ in range(n)))

    def __call__(self, *args):
        state = self.controller.begin(args)
        held = state.buffers.tensors
        if held[0] is None:
            self._allocate(state, state.device)
        mask = torch.tensor(state.mask, dtype=torch.bool, device=state.device)
        caches = [t for ts in held for t in ts]
        result = self.fn(*args, mask, *caches)
        outputs = result[: self.num_outputs]
        stats, new_caches = result[self.num_outputs], result[self.num_outputs + 1:]
        if self.uses_cache:
            metrics = state.policy_state.metrics
            torch.where(mask[:, None], metrics, stats, out=metrics)
            torch._foreach_copy_(caches, list(new_caches))
        for l, reused in enumerate(state.mask):
            self.block_computes[l] += not reused
        self.controller.end(state)
        return tuple(outputs)
