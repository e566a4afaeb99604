"""ReuseController: requests, CFG branches, generations, the reuse mask, and what happened.

One controller serves one compiled graph. Each call of the graph is one model evaluation,
and every executor and engine runs it the same way (``Executor.evaluate``):
``begin(args)`` -> run or serve each block per ``state.mask`` -> ``end(state)``.

* **Request.** State is kept per request: the ``Request`` of the current context
  (``foresight_compile.generation()``, an ``optimize``d pipeline call), else the calling
  thread. Concurrent requests never share state; a closed request's state is released (a
  few released states are kept for reuse, so sequential generations keep their buffers).
* **Branch.** Within a request, calls under a branch name (``branch()``, diffusers'
  ``cache_context``) share that branch's state. Unnamed calls that repeat the previous
  call's timestep are further CFG branches of the same step (cond, uncond): the k-th call
  at one timestep is branch k. Batched CFG is a single call, so a single branch.
* **Generation.** A branch starts a new generation at its request's first call, when its
  inputs' shapes, dtypes or devices change, after ``reset()``, when it has run the
  request's ``num_steps`` steps, and, for calls outside a request, when its timestep stops
  decreasing. A new generation starts at step 0 with every block computed.
* **Mask.** Before a step, the policy says on the host whether the step computes every
  block (warmup, refresh). Otherwise the mask was decided on the device at the end of an
  earlier step (``lookahead`` 1: the previous one; 2: the one before) and its host copy
  queued then; ``begin`` reads it (see ``HostMask`` for when that waits).

* **Ranks.** Under sequence (context) parallelism each rank measures its blocks on its
  own shard of the tokens. ``reduce`` (built by the program from the group the blocks'
  own collectives use) sums the step's raw metric rows and the latent probe over that
  group, once per step, before anything is derived or decided: every rank derives the
  same global metrics, so every rank decides the same mask (a block computed on one rank
  and served on another would leave the first waiting in the block's collectives).

Host reads of device data per call: the mask read, and the timestep (one ``.item()``-like
read) only when the controller needs its value: for calls outside a request, or unnamed
calls (call order by timestep). Under ``optimize(pipe)`` on a pipeline that names its CFG
passes, or ``generation()`` with ``branch()`` names, the timestep is never read; stats get
it from a device copy.

``begin``/``end`` allocate no tensor once a branch exists: decisions are written into the
branch's preallocated tensors, and the history is a preallocated ring (``history.py``).
"""
from __future__ import annotations

import logging
import math
import threading
import warnings
import weakref
from typing import Callable, Sequence

import numpy as np
import torch

from foresight_compile.errors import ForesightValueError
from foresight_compile.runtime.cache_history import HistoryLayout
from foresight_compile.runtime.context import Request, current_context, next_request_id
from foresight_compile.runtime.frames import FrameGroup
from foresight_compile.runtime.history import HISTORY_ROWS, HistoryRows, StepHistory
from foresight_compile.runtime.policies.base import PolicyState, ReusePolicy
from foresight_compile.runtime.state import BranchState

log = logging.getLogger(__name__)
# Released branch states kept for the next requests (their buffers and captures are reused).
POOL_SIZE = 4


class RequestState:
    """The branches of one request (its call order is tracked by the ``FrameGroup``, which
    this controller shares with the other compiles of its frame)."""

    __slots__ = ("id", "branches", "by_key", "generation", "__weakref__")

    def __init__(self, request_id: int) -> None:
        self.id = request_id
        self.branches: list[BranchState] = []
        self.by_key: dict[tuple, BranchState] = {}
        self.generation: int | None = None


class ReuseController:
    def __init__(self, layout: HistoryLayout, policy: ReusePolicy, timestep_index: int,
                 signature_indices: Sequence[int], lookahead: int = 1,
                 history_rows: int = HISTORY_ROWS, group: FrameGroup | None = None,
                 reduce: Callable[[PolicyState], None] | None = None) -> None:
        """``layout``: what every branch caches (``cache_history.py``).
        ``reduce(policy_state)``: under sequence parallelism, writes into
        ``policy_state.sums`` the group's totals of the raw rows (every block's: a served
        block's rows are its last computed step's, the same on every rank, so its total is
        the same again) and sums ``policy_state.probe`` in place (the probe rewrites it every
        step); None on one device."""
        self.reduce = reduce
        self.layout = layout
        num_blocks = self.num_blocks = layout.num_blocks
        self.policy = policy
        self.timestep_index = timestep_index
        self.signature_indices = tuple(signature_indices)
        self.lookahead = lookahead
        self.history = StepHistory(num_blocks, history_rows)
        self.generations = 0  # generations started, over every request and branch
        self._computes = np.zeros(num_blocks, dtype=np.int64)
        self._epoch = 0
        self._lock = threading.Lock()
        self._by_request: dict[Request, RequestState] = weakref.WeakKeyDictionary()
        self._by_thread: dict[threading.Thread, RequestState] = weakref.WeakKeyDictionary()
        self._pool: list[BranchState] = []
        self._generation_ids = iter(range(1 << 62))
        self._warned_warmup = False
        self._all_computed = [False] * num_blocks
        # Shared with the other compiles of this frame (Dynamo recompiles): frames.py.
        self.group = group if group is not None else FrameGroup()

    # -- reporting ----------------------------------------------------------------------
    @property
    def block_computes(self) -> list[int]:
        """Per block, the evaluations that computed it (since construction or the last
        ``reset(clear_stats=True)``)."""
        return self._computes.tolist()

    def live_states(self) -> list[BranchState]:
        with self._lock:
            requests = list(self._by_request.values()) + list(self._by_thread.values())
        return [s for r in requests for s in r.branches]

    @property
    def cache_bytes(self) -> int:
        """Exact size of the cache buffers held now: every live request's branches and the
        released states kept for reuse (``pooled_bytes``)."""
        return sum(s.history.nbytes for s in self.live_states()) + self.pooled_bytes

    @property
    def pooled_bytes(self) -> int:
        """The part of ``cache_bytes`` held by released states kept for reuse (at most
        ``POOL_SIZE`` states: bounded by the largest branch's bytes times the pool size)."""
        with self._lock:
            pooled = list(self._pool)
        return sum(s.history.nbytes for s in pooled)

    def rows(self) -> HistoryRows:
        return self.history.rows()

    def reset(self, clear_stats: bool = False) -> None:
        """Make every branch of every request start a new generation at its next call."""
        self._epoch += 1
        self.group.reset()
        if clear_stats:
            self.history.clear()
            self._computes[:] = 0

    # -- requests and branches ------------------------------------------------------------
    def _request_state(self, request: Request | None, owner: object) -> RequestState:
        table = self._by_request if request is not None else self._by_thread
        found = table.get(owner)
        if found is not None:
            return found
        with self._lock:
            found = table.get(owner)
            if found is None:
                found = table[owner] = RequestState(
                    request.id if request is not None else next_request_id())
                if request is not None:
                    request.on_close(self._release)
        return found

    def _release(self, request: Request) -> None:
        """A request closed: its branch states go to the pool (or are dropped)."""
        with self._lock:
            found = self._by_request.pop(request, None)
            if found is None:
                return
            for state in found.branches:
                if len(self._pool) < POOL_SIZE:
                    self._pool.append(state)

    def _new_branch(self, index: int, device: torch.device) -> BranchState:
        with self._lock:
            for i, state in enumerate(self._pool):
                if state.device == device:
                    del self._pool[i]
                    state.branch = index
                    state.epoch = -1  # forces a new generation at its first call
                    # Nothing of the request it served carries over (its length included).
                    state.previous_length = None
                    state.step = 0
                    return state
        return BranchState(index, self.layout, device, self.policy, self.lookahead)

    # -- one evaluation -------------------------------------------------------------------
    def begin(self, args: Sequence) -> BranchState:
        """Called before a model evaluation: find its request and branch, start a
        generation if due, and set ``state.mask`` (True = serve block l from its cache)."""
        context = current_context()
        request = context.request if context is not None else None
        name = context.branch if context is not None else None
        ts = args[self.timestep_index]
        # The timestep's value is needed only to tell steps apart without a request, or
        # CFG branches apart without a name: read it (a device sync on GPU) only then.
        timestep = None
        if request is None or name is None:
            if isinstance(ts, torch.Tensor) and ts.numel() == 0:
                raise ForesightValueError(
                    f"the timestep input is empty (shape {tuple(ts.shape)}): pass the step's "
                    "timestep as a (batch,) tensor, e.g. t.expand(latents.shape[0])")
            timestep = float(ts.reshape(-1)[0]) if isinstance(ts, torch.Tensor) else float(ts)
        owner = request if request is not None else threading.current_thread()
        req = self._request_state(request, owner)
        track = self.group.track(owner)
        key = track.key(timestep, name, self.group.epoch)
        state = req.by_key.get(key)
        if track.ran_elsewhere(key, self) and state is not None:
            # Another compile of this frame ran this branch since (other inputs): start
            # over, as for a signature change (frames.py).
            state.epoch = -1
        if state is None:
            device = ts.device if isinstance(ts, torch.Tensor) else torch.device("cpu")
            state = req.by_key[key] = self._new_branch(len(req.branches), device)
            state.request = req.id
            req.branches.append(state)
        signature = self._signature(args)
        if (signature != state.signature or state.epoch != self._epoch
                or (request is None and not timestep < state.last_timestep)
                or (state.total_steps is not None and request is not None
                    and state.length_source != "timesteps" and state.step >= state.total_steps)):
            self._start_generation(req, state, signature, context)
        if timestep is not None:
            if state.step > 0 and state.length_source != "given":
                self._infer_length(state, timestep)
            state.last_timestep = timestep
        history = state.history
        if self.policy.computes_all(state.step, state.warmup, state.total_steps, history.run):
            state.mask = self._all_computed
        elif state.next_mask.ready:
            # Served only with a value of this generation in the cache.
            state.mask = [m and h for m, h in zip(state.next_mask.read(), history.held_mask())]
        else:
            state.mask = self._all_computed
        history.prepare(state.step)
        state.timestep_record = ts if timestep is None else timestep
        return state

    def _signature(self, args: Sequence) -> tuple:
        return tuple((a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a
                     for a in (args[i] for i in self.signature_indices))

    def _start_generation(self, req: RequestState, state: BranchState, signature: tuple,
                          context) -> None:
        state.reset(signature)
        state.epoch = self._epoch
        # One generation id per request generation: the first branch to restart takes a
        # new id, the request's other branches join it.
        if req.generation is None or state.generation == req.generation:
            req.generation = next(self._generation_ids)
        state.generation = req.generation
        # The pipeline knows best, then the user's option, then the last generation's length.
        options = self.policy.options
        given = (context.num_steps if context is not None else None) or options.num_steps
        total = given or state.previous_length
        state.warmup = options.warmup_steps(total, self.policy.default_warmup)
        state.total_steps = total
        state.length_source = "given" if given else "previous" if total else None
        if state.warmup is None and self.policy.needs_cache and not self._warned_warmup:
            self._warned_warmup = True
            warnings.warn(
                "foresight: 'warmup' is a fraction but the number of steps is unknown for this "
                "first generation; it computes every block. Pass options={'num_steps': N} to "
                "reuse from the first generation.", stacklevel=4)
        with self._lock:
            self.generations += 1
        log.debug("request %d branch %d: generation %d starts", req.id, state.branch,
                  state.generation)

    @staticmethod
    def _infer_length(state: BranchState, timestep: float) -> None:
        """A generation's length read from its timesteps, when nobody said it: schedules
        run down to (about) zero, so ``t / (t_prev - t)`` more calls remain at this step's
        pace. Early in a shifted flow-matching schedule the pace is slow and the guess too
        long; it is exact over the last steps, where the tail needs it. The last
        generation's length stands unless the timesteps say this one is shorter."""
        gap = state.last_timestep - timestep
        if not (gap > 0 and math.isfinite(gap) and timestep >= 0):
            return
        # floor (a hair of slack for float spacing): a short guess computes a step more,
        # a long one would serve a step of the tail
        inferred = state.step + math.floor(timestep / gap + 1e-3)
        if state.length_source == "previous" and inferred >= state.total_steps - 1:
            return
        state.total_steps = max(inferred, state.step + 1)
        state.length_source = "timesteps"

    def end(self, state: BranchState) -> None:
        """Called after a model evaluation whose computed blocks wrote their metrics."""
        policy = self.policy
        ps = state.policy_state
        if self.reduce is not None and policy.needs_cache:
            self.reduce(ps)  # one collective: the group's totals, before anything reads them
            ps.derive(ps.sums)
        else:
            ps.derive()
        if state.step == 0:
            # A block's first compute of a generation measured against a cache of no use
            # to it: only finiteness counts (every block computes at step 0). The same for
            # the forecast error: a kept buffer holds another generation's values.
            ps.mse.zero_()
            ps.ferr.zero_()
        mask = state.mask
        state.history.record(state.step, mask)
        policy.observe(state.step, state.warmup, ps, state.history, state.total_steps)
        metric = policy.needs_metric
        with self._lock:  # shared by every request: concurrent calls must not lose rows
            self._computes += np.logical_not(mask)
            self.history.record(state.request, state.generation, state.branch, state.step,
                                mask, state.timestep_record, state.device,
                                ps.mse if metric else None, ps.thresholds if metric else None)
        state.step += 1
        if policy.needs_cache:
            policy.decide(ps, state.decision)
            torch.gt(ps.finite, 0.5, out=state.finite_ok)
            torch.logical_and(state.decision, state.finite_ok, out=state.decision)
            state.next_mask.start(state.decision)
