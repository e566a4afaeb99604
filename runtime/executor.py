"""The executor contract, and the host-branch executor.

Every executor and engine runs one model evaluation the same way (``Executor.evaluate``):
the controller begins the step (request, branch, generation, host mask), the executor runs
or serves each block as the mask says, the controller ends the step (counts, history, the
next mask). The controller alone keeps counts, history and cache bytes, so ``Stats`` is
built the same way for every executor.

``SegmentExecutor`` is the host-branch form of docs/DESIGN.md section 2: prologue, blocks, glue
and epilogue are separately lowered segments, and a precomputed plan calls them in order.
For block ``l`` the host mask decides:

* reuse: ``serve`` (the forecast, a residual add, or a copy, compiled) or the newest cached
  tensors as they are;
* compute: the compiled ``update``, which computes the block and writes its change metric
  and its new history in place, fused into the block's kernels.

Only what the step needs runs: a served block (other than in residual mode) reads none of
its inputs, so a segment whose outputs only served blocks would read is skipped (when every
block is served, the blocks and the glue between them do not run at all; the last block's
forecast feeds the epilogue). The schedule of each distinct mask is worked out once.

Per step in steady state (a branch's buffers exist), the executor's own Python code issues
no tensor allocation (the tensors it returns come out of compiled segments) and no read of
device data; the controller adds only the mask read (and the timestep read outside a
request or for unnamed CFG calls). ``tests/test_hot_path.py`` counts it.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch

from foresight_compile.errors import ForesightError
from foresight_compile.runtime.controller import ReuseController
from foresight_compile.runtime.plan import SegmentPlan
from foresight_compile.runtime.policies.base import BAD
from foresight_compile.runtime.state import BranchState

MAX_SCHEDULES = 256  # distinct masks whose schedule is kept


class ScheduleCache:
    """What one evaluation runs under each reuse mask, derived once per distinct mask by
    ``derive(mask_tuple)`` (a generation sees a handful of masks); at most ``MAX_SCHEDULES``
    are kept (forgotten all at once past that, then derived again)."""

    def __init__(self, derive) -> None:
        self._derive = derive
        self._found: dict[tuple, tuple] = {}

    def __call__(self, mask) -> tuple:
        key = tuple(mask)
        found = self._found.get(key)
        if found is None:
            if len(self._found) >= MAX_SCHEDULES:
                self._found.clear()
            found = self._found[key] = self._derive(key)
        return found


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
    if not slots:  # a segment that reads no value (MotifVideo: a glue of constants)
        return lambda env: ()
    if len(slots) == 1:
        (only,) = slots
        return lambda env: (env[only],)
    return operator.itemgetter(*slots)  # one C call instead of a Python loop per segment


def all_finite(outputs) -> torch.Tensor:
    """1.0 when every element of every output is finite, else 0.0 (float32 scalar)."""
    return torch.stack([torch.isfinite(o).all() for o in outputs]).all().to(torch.float32)


def live_steps(plan: SegmentPlan, mask) -> tuple[int, ...]:
    """The plan steps one evaluation under ``mask`` must run, in order.

    Backwards from the graph outputs: a step runs when a running step (or the output) reads
    one of its outputs; a computed block always runs (it updates its history); a served
    block reads its inputs only in residual mode. A served block that holds no cache (inside
    a cached region) must not be needed: the controller serves a region whole."""
    needed = {v for kind, v in plan.output_spec if kind == "slot"}
    live = []
    for k in range(len(plan.steps) - 1, -1, -1):
        step = plan.steps[k]
        served = step.block >= 0 and mask[step.block]
        computed = step.block >= 0 and not served
        if not (computed or any(s in needed for s in step.outputs if s >= 0)):
            continue
        if served and step.update is None:
            raise ForesightError(
                f"internal: block {step.block} holds no cache but the mask {list(mask)} serves "
                f"it while a later step reads its outputs")
        live.append(k)
        if served and step.residual is None:
            continue
        needed.update(step.inputs)
    return tuple(reversed(live))


class SegmentExecutor(Executor):
    def __init__(self, plan: SegmentPlan, controller: ReuseController) -> None:
        self.controller = controller
        self.plan = plan
        self.steps = plan.steps
        # Per step, a C-level gather of its argument slots (hot path).
        self.gathers = tuple(_gather(step.inputs) for step in plan.steps)
        self.output_spec = plan.output_spec
        self.num_args = plan.num_args
        self.num_slots = plan.num_slots
        self._schedule = ScheduleCache(lambda mask: live_steps(self.plan, mask))
        self._signature: tuple | None = None

    def _rebind(self, signature: tuple) -> None:
        for step in self.steps:
            for segment in step.callables():
                segment.unbind()
        if self.plan.probe is not None:
            self.plan.probe.unbind()
        self._signature = signature

    def run(self, state: BranchState, args) -> tuple:
        if state.signature != self._signature:
            self._rebind(state.signature)
        env: list = [None] * self.num_slots
        env[: self.num_args] = args
        mask = state.mask
        history = state.history
        buffers = history.buffers
        rows = state.policy_state.rows
        weights = history.weights
        probe = self.plan.probe
        if probe is not None:
            latent = args[self.plan.probe_slot]
            probe(latent, buffers.probe_like(latent), state.policy_state.aux)
        steps, gathers = self.steps, self.gathers
        for k in self._schedule(mask):
            step = steps[k]
            ins = gathers[k](env)
            l = step.block
            if step.update is None:
                # Prologue, glue, epilogue, a block inside a cached region (it holds nothing:
                # it runs only on steps that compute every block), or no caching policy.
                outs = step.segment(*ins)
            elif mask[l]:
                if step.serve is None:
                    outs = buffers.held(l)
                elif step.slots > 1:
                    outs = step.serve(*ins, *history.aged(l), weights[l])
                else:
                    outs = step.serve(*ins, *buffers.held(l))
            elif not buffers.has(l):
                # The branch's first compute of this block for these input shapes (a
                # generation's step 0): allocate its buffers from the outputs.
                outs = step.segment(*ins)
                values = outs if step.residual is None else tuple(
                    o - ins[p] for o, p in zip(outs, step.residual))
                step.store(*values, *history.allocate(l, outs))
                rows[l][BAD].copy_(1.0 - all_finite(values))
            elif step.slots > 1:
                outs = step.update(*ins, *history.aged(l), weights[l], rows[l])
            else:
                outs = step.update(*ins, *buffers.held(l), rows[l])
            for slot, value in zip(step.outputs, outs):
                if slot >= 0:
                    env[slot] = value
        return tuple(env[v] if kind == "slot" else v for kind, v in self.output_spec)
