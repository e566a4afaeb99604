"""The executor contract, and the host-branch executor.

Every executor and engine runs one model evaluation the same way (``Executor.evaluate``):
the controller begins the step (request, branch, generation, host mask), the executor runs
or serves each block as the mask says, the controller ends the step (counts, history, the
next mask). The controller alone keeps counts, history and cache bytes, so ``Stats`` is
built the same way for every executor.

``SegmentExecutor`` is the host-branch form of DESIGN.md section 2: prologue, blocks, glue
and epilogue are separately lowered segments, and a precomputed plan calls them in order.
For block ``l`` the host mask decides:

* reuse: ``serve`` (residual add or a copy, compiled) or the cache tensors as they are;
* compute: the compiled ``update``, which computes the block and writes its change metric
  and its new cache in place, fused into the block's kernels.

Per step in steady state (a branch's buffers exist), the executor's own Python code issues
no tensor allocation (the tensors it returns come out of compiled segments) and no read of
device data; the controller adds only the mask read (and the timestep read outside a
request or for unnamed CFG calls). ``tests/test_hot_path.py`` counts it.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch

from foresight_compile.runtime.controller import ReuseController
from foresight_compile.runtime.plan import SegmentPlan
from foresight_compile.runtime.policies.base import FINITE
from foresight_compile.runtime.state import BranchState


class Executor:
    """Base of every executor and engine: ``evaluate(args)`` is the one contract."""

    controller: ReuseController

    def evaluate(self, args) -> tuple:
        state = self.controller.begin(args)
        outputs = self.run(state, args)
        self.controller.end(state)
        return outputs

    def run(self, state: BranchState, args) -> tuple:
        """Run or serve every block of one evaluation as ``state.mask`` says."""
        raise NotImplementedError

    def __call__(self, *args):
        return self.evaluate(args)


def _gather(slots: tuple[int, ...]) -> Callable[[list], tuple]:
    if len(slots) == 1:
        (only,) = slots
        return lambda env: (env[only],)
    return operator.itemgetter(*slots)  # one C call instead of a Python loop per segment


def all_finite(outputs) -> torch.Tensor:
    """1.0 when every element of every output is finite, else 0.0 (float32 scalar)."""
    return torch.stack([torch.isfinite(o).all() for o in outputs]).all().to(torch.float32)


class SegmentExecutor(Executor):
    def __init__(self, plan: SegmentPlan, controller: ReuseController) -> None:
        self.controller = controller
        self.uses_cache = controller.policy.needs_cache
        self.steps = plan.steps
        # Per step, a C-level gather of its argument slots (hot path).
        self.gathers = tuple(_gather(step.inputs) for step in plan.steps)
        self.output_spec = plan.output_spec
        self.num_args = plan.num_args
        self.num_slots = plan.num_slots
        self._signature: tuple | None = None

    def _rebind(self, signature: tuple) -> None:
        for step in self.steps:
            for segment in step.callables():
                segment.unbind()
        self._signature = signature

    def run(self, state: BranchState, args) -> tuple:
        if state.signature != self._signature:
            self._rebind(state.signature)
        env: list = [None] * self.num_slots
        env[: self.num_args] = args
        mask = state.mask
        buffers = state.buffers
        rows = state.policy_state.rows
        for step, gather in zip(self.steps, self.gathers):
            ins = gather(env)
            l = step.block
            if l < 0 or not self.uses_cache:
                outs = step.segment(*ins)
            elif mask[l]:
                held = buffers.held(l)
                outs = held if step.serve is None else step.serve(*ins, *held)
            else:
                held = buffers.held(l)
                if held is not None:
                    outs = step.update(*ins, *held, rows[l])
                else:
                    # The branch's first compute of this block for these input shapes (a
                    # generation's step 0): allocate its buffers from the outputs.
                    outs = step.segment(*ins)
                    values = outs if step.residual is None else tuple(
                        o - ins[p] for o, p in zip(outs, step.residual))
                    buffers.store(l, values, like=outs)
                    rows[l][FINITE].copy_(all_finite(values))
            for slot, value in zip(step.outputs, outs):
                if slot >= 0:
                    env[slot] = value
        return tuple(env[v] if kind == "slot" else v for kind, v in self.output_spec)
