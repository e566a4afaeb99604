"""Per-branch state of one request: ``BranchState`` and the host copy of its next mask.

A request (see ``context.py``) has one ``BranchState`` per CFG branch. The state holds
everything that carries from one step to the next: the policy's device tensors, the cache
buffers, the step count, the decided mask. ``reset()`` starts a new generation.
"""
from __future__ import annotations

import math

import torch

from foresight_compile.runtime.cache_history import CacheHistory, HistoryLayout
from foresight_compile.runtime.policies.base import ReusePolicy


class HostMask:
    """A bool mask decided on the device, read on the host at the next step.

    ``start(mask)`` queues a copy of the device mask into a (pinned, on CUDA) host slot;
    ``read()`` returns the mask queued ``lookahead`` steps ago. With ``lookahead=1`` the
    host waits at ``read()`` for the copy queued at the end of the previous step, i.e. for
    that step's last kernel: the decision for step t+1 needs step t's metrics, an inherent
    wait. With ``lookahead=2`` it reads the copy queued one step earlier (long done, no
    wait): step t+1 is decided from step t-1's metrics. On the CPU nothing waits.
    """

    def __init__(self, num_blocks: int, device: torch.device, lookahead: int = 1) -> None:
        if lookahead not in (1, 2):
            raise ValueError(f"lookahead must be 1 or 2, got {lookahead!r}")
        self._cuda = device.type == "cuda"
        self.lookahead = lookahead
        self._slots = [torch.zeros(num_blocks, dtype=torch.bool, pin_memory=self._cuda)
                       for _ in range(lookahead)]
        self._events = [torch.cuda.Event() if self._cuda else None for _ in range(lookahead)]
        self._queued = 0  # copies queued since the generation started
        self._next = 0

    def start(self, mask: torch.Tensor) -> None:
        slot = self._next
        self._slots[slot].copy_(mask, non_blocking=self._cuda)
        event = self._events[slot]
        if event is not None:
            event.record()
        self._queued += 1
        self._next = (slot + 1) % self.lookahead

    @property
    def ready(self) -> bool:
        """A mask old enough for this step has been queued."""
        return self._queued >= self.lookahead

    def read(self) -> list[bool]:
        # The oldest queued slot: the next to be overwritten.
        slot = self._next
        event = self._events[slot]
        if event is not None:
            event.synchronize()
        return self._slots[slot].tolist()

    def clear(self) -> None:
        self._queued = 0
        self._next = 0


class BranchState:
    """Everything one CFG branch of one request keeps between steps."""

    def __init__(self, branch: int, layout: HistoryLayout, device: torch.device,
                 policy: ReusePolicy, lookahead: int = 1) -> None:
        num_blocks = layout.num_blocks
        self.branch = branch
        self.num_blocks = num_blocks
        self.device = device
        self.request = 0  # id of the request the state serves
        # The policy's device state (and scratch) for this branch alone.
        self.policy_state = policy.new_state(num_blocks, device)
        # The cache: which blocks hold what, the slots, the forecast weights.
        self.history = CacheHistory(layout, device)
        self.next_mask = HostMask(num_blocks, device, lookahead)
        # The device decision the policy writes at the end of each step (no allocation).
        self.decision = torch.zeros(num_blocks, dtype=torch.bool, device=device)
        self.finite_ok = torch.zeros(num_blocks, dtype=torch.bool, device=device)
        self.generation = -1
        self.epoch = -1  # the controller's reset() count this generation started under
        self.signature: tuple | None = None
        self.last_timestep = math.inf
        self.previous_length: int | None = None
        self.step = 0
        self.warmup: int | None = None
        self.total_steps: int | None = None
        # where total_steps came from: "given" (request or option), "previous" (the last
        # generation's length), "timesteps" (inferred from this one's), None (unknown)
        self.length_source: str | None = None
        self.mask: list[bool] = [False] * num_blocks
        # This step's timestep for the history: a float when the controller read it, else
        # the input tensor (copied on the device, never read on the host per step).
        self.timestep_record: float | torch.Tensor = math.nan

    @property
    def buffers(self):
        """The cache tensors (``history.buffers``)."""
        return self.history.buffers

    def reset(self, signature: tuple | None) -> None:
        """Start a new generation: step 0, policy state cleared, the next step computes
        every block. Buffers are kept for the same signature (every cached block overwrites
        its cache at step 0 before any reuse) and released for another."""
        if self.step:
            self.previous_length = self.step
        self.history.start(same_inputs=signature == self.signature)
        self.signature = signature
        self.policy_state.reset()
        self.next_mask.clear()
        self.step = 0
        self.last_timestep = math.inf
        self.mask = [False] * self.num_blocks

    def __repr__(self) -> str:
        return (f"BranchState(request={self.request}, branch={self.branch}, "
                f"generation={self.generation}, step={self.step}, warmup={self.warmup}, "
                f"{self.history!r})")
