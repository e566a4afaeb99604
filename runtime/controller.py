"""ReuseController: step and CFG-branch tracking, per-generation reset, the reuse mask.

One controller serves one compiled graph. Each call of the graph is one model evaluation:

* **Branch.** Calls that repeat the previous call's timestep are further CFG branches of
  the same step (cond, uncond): the k-th call at one timestep is branch k, with its own
  state and cache. Batched CFG is a single call, so a single branch.
* **Generation.** A branch starts a new generation when its timestep stops decreasing,
  when its inputs' shapes, dtypes or devices change, or after ``reset()``. A new
  generation starts at step 0 with every block computed and every cache forgotten.
* **Mask.** Before a step, the policy says on the host whether the step computes every
  block (warmup, refresh). Otherwise the reuse mask was computed on the device at the end
  of the branch's previous step and copied to the host without blocking (one step ahead),
  so deciding never waits on a ``.item()`` sync.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import threading
import dataclasses
import logging
import math
import warnings
from typing import Sequence

import torch

from foresight_compile.runtime.buffers import CacheBuffers
from foresight_compile.runtime.policies.base import FINITE, MSE, PolicyState, ReusePolicy

log = logging.getLogger(__name__)
MAX_RECORDS = 100_000


_CALLS = itertools.count()


@dataclasses.dataclass(frozen=True)
class CallContext:
    """What a pipeline integration knows about the calls it makes, so nothing is guessed.

    ``generation``: a token; a branch whose last call saw another token starts a new
    generation. ``num_steps``: the generation's step count (resolves a fractional warmup).
    ``branch``: a CFG branch name (diffusers' ``cache_context`` name); calls under a name
    share that branch's state whatever their order.
    """

    generation: int | None = None
    num_steps: int | None = None
    branch: str | None = None


_LOCAL = threading.local()


def current_context() -> CallContext | None:
    return getattr(_LOCAL, "context", None)


@contextlib.contextmanager
def call_context(**fields):
    """Within the block, model calls carry ``fields`` (merged over the enclosing context)."""
    previous = current_context()
    merged = dataclasses.replace(previous or CallContext(), **fields)
    _LOCAL.context = merged
    try:
        yield merged
    finally:
        _LOCAL.context = previous


@dataclasses.dataclass(frozen=True)
class StepRecord:
    call: int  # process-wide call order, so records of several graphs interleave correctly
    generation: int
    branch: int
    step: int
    timestep: float
    reused: tuple[bool, ...]
    # Device snapshots of the change metric (MSE per block) and the thresholds after the
    # step: read on the host only when stats are asked for, so recording never syncs.
    change: torch.Tensor | None = None
    thresholds: torch.Tensor | None = None


class HostMask:
    """A bool mask produced on the device, read on the host one step later without a stall."""

    def __init__(self, num_blocks: int, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._host = torch.zeros(num_blocks, dtype=torch.bool, pin_memory=self._cuda)
        self._event = torch.cuda.Event() if self._cuda else None
        self.pending = False

    def start(self, mask: torch.Tensor) -> None:
        self._host.copy_(mask, non_blocking=self._cuda)
        if self._event is not None:
            self._event.record()
        self.pending = True

    def read(self) -> list[bool]:
        if self._event is not None:
            self._event.synchronize()  # long done: the copy was queued a whole step ago
        self.pending = False
        return self._host.tolist()


class BranchState:
    """Everything one CFG branch keeps between steps. ``reset()`` starts a new generation."""

    def __init__(self, branch: int, num_blocks: int, device: torch.device) -> None:
        self.branch = branch
        self.num_blocks = num_blocks
        self.device = device
        self.policy_state = PolicyState.allocate(num_blocks, device)
        self.buffers = CacheBuffers(num_blocks)
        self.next_mask = HostMask(num_blocks, device)
        self.generation = -1
        self.generation_token: int | None = None
        self.signature: tuple | None = None
        self.last_timestep = math.inf
        self.previous_length: int | None = None
        self.step = 0
        self.warmup: int | None = None
        self.total_steps: int | None = None
        self.mask: list[bool] = [False] * num_blocks

    def reset(self, signature: tuple | None) -> None:
        if self.step:
            self.previous_length = self.step
        if signature != self.signature:
            self.buffers.invalidate()
        self.signature = signature
        self.policy_state.reset()
        self.next_mask.pending = False
        self.generation += 1
        self.step = 0
        self.last_timestep = math.inf
        self.mask = [False] * self.num_blocks

    def __repr__(self) -> str:
        return (f"BranchState(branch={self.branch}, generation={self.generation}, step={self.step}, "
                f"warmup={self.warmup}, {self.buffers!r})")


class ReuseController:
    def __init__(self, num_blocks: int, policy: ReusePolicy, timestep_index: int,
                 signature_indices: Sequence[int]) -> None:
        self.num_blocks = num_blocks
        self.policy = policy
        self.timestep_index = timestep_index
        self.signature_indices = tuple(signature_indices)
        self.branches: list[BranchState] = []  # in creation order; index = branch id
        self._by_key: dict[tuple, BranchState] = {}
        self.records: collections.deque[StepRecord] = collections.deque(maxlen=MAX_RECORDS)
        self._previous_timestep: float | None = None
        self._branch = 0
        self._force_new = False
        self._warned_warmup = False
        self.generations = 0

    def reset(self) -> None:
        """Make every branch start a new generation at its next call."""
        self._force_new = True
        self._previous_timestep = None

    def clear_records(self) -> None:
        self.records.clear()

    def _signature(self, args: Sequence) -> tuple:
        sig = []
        for i in self.signature_indices:
            a = args[i]
            sig.append((a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a)
        return tuple(sig)

    def begin(self, args: Sequence) -> BranchState:
        """Called before a model evaluation: find its branch, start a generation if due,
        and set ``state.mask`` (True = reuse block l's cache)."""
        ts = args[self.timestep_index]
        timestep = float(ts.reshape(-1)[0]) if isinstance(ts, torch.Tensor) else float(ts)
        if self._force_new:
            for s in self.branches:
                s.signature = None  # forces a reset at the branch's next call
            self._force_new = False
        context = current_context()
        if context is not None and context.branch is not None:
            key = ("name", context.branch)
            self._previous_timestep = None  # named branches: call order means nothing
        else:
            self._branch = self._branch + 1 if timestep == self._previous_timestep else 0
            self._previous_timestep = timestep
            key = ("order", self._branch)
        state = self._by_key.get(key)
        if state is None:
            device = ts.device if isinstance(ts, torch.Tensor) else torch.device("cpu")
            state = self._by_key[key] = BranchState(len(self.branches), self.num_blocks, device)
            self.branches.append(state)
        signature = self._signature(args)
        token = context.generation if context is not None else None
        if (signature != state.signature or not timestep < state.last_timestep
                or token != state.generation_token):
            self._start_generation(state, signature, context)
            state.generation_token = token
        state.last_timestep = timestep
        if self.policy.computes_all(state.step, state.warmup, state.total_steps):
            state.mask = [False] * self.num_blocks
        elif state.next_mask.pending:
            held = state.buffers.tensors
            state.mask = [m and held[i] is not None for i, m in enumerate(state.next_mask.read())]
        else:
            state.mask = [False] * self.num_blocks
        return state

    def _start_generation(self, state: BranchState, signature: tuple,
                          context: CallContext | None) -> None:
        state.reset(signature)
        # The pipeline knows best, then the user's option, then the last generation's length.
        options = self.policy.options
        total = (context.num_steps if context is not None else None) or options.num_steps \
            or state.previous_length
        state.warmup = options.warmup_steps(total)
        state.total_steps = total
        if state.warmup is None and self.policy.needs_cache and not self._warned_warmup:
            self._warned_warmup = True
            warnings.warn(
                "foresight: 'warmup' is a fraction but the number of steps is unknown for this "
                "first generation; it computes every block. Pass options={'num_steps': N} to "
                "reuse from the first generation.", stacklevel=3)
        self.generations += 1
        log.debug("branch %d: generation %d starts", state.branch, state.generation)

    def end(self, state: BranchState) -> None:
        """Called after a model evaluation whose computed blocks wrote their metrics."""
        self.policy.observe(state.step, state.warmup, state.policy_state)
        ps = state.policy_state
        change = ps.metrics[:, MSE].clone() if self.policy.needs_metric else None
        thresholds = ps.thresholds.clone() if self.policy.needs_metric else None
        self.records.append(StepRecord(next(_CALLS), state.generation, state.branch, state.step,
                                       state.last_timestep, tuple(state.mask), change, thresholds))
        state.step += 1
        if not self.policy.computes_all(state.step, state.warmup, state.total_steps):
            ps = state.policy_state
            state.next_mask.start(self.policy.reusable(ps) & (ps.metrics[:, FINITE] > 0))
