"""FrameGroup: what the controllers of one model's alternative graphs share per caller.

Dynamo compiles a frame again when a guard fails (another dtype, a batch of 1 after a
batch of 2, a specialised int): each compile is its own program with its own controller,
and each call runs one of them. What the contract defines per caller (request, or thread
without one) must then be kept across them, here:

* **call order**: an unnamed call is CFG branch k when it is the k-th call in a row at one
  timestep, whichever compile ran the calls before it;
* **who ran a branch last**: a caller going f32, f64, f32 down one timestep sequence would
  otherwise find, in the f32 controller, the state it left two calls ago (same signature,
  timestep still decreasing) and continue that generation, serving its caches, although the
  branch ran other inputs in between. A controller whose branch another member ran since
  starts a new generation for it, as for any change of inputs. CFG passes compiled apart
  (cond and uncond prompts of different lengths: two graphs called in turn) are different
  branches and keep their generations.

Graphs of *different* frames (a graph break between blocks) run one after the other in
every call: they are not alternatives and never share a group.
"""
from __future__ import annotations

import threading
import weakref


class CallerTrack:
    """One caller's call order and, per branch key, the member that ran it last."""

    __slots__ = ("previous_timestep", "order", "epoch", "last")

    def __init__(self) -> None:
        self.previous_timestep: float | None = None
        self.order = 0
        self.epoch = -1
        self.last: dict[tuple, weakref.ref] = {}

    def key(self, timestep: float | None, name: str | None, epoch: int) -> tuple:
        """The branch key of a call: its name, else its position at its timestep."""
        if self.epoch != epoch:  # after reset(): the next call is a first call
            self.epoch = epoch
            self.previous_timestep = None
        if name is not None:
            self.previous_timestep = None  # named branches: call order means nothing
            return ("name", name)
        self.order = self.order + 1 if timestep == self.previous_timestep else 0
        self.previous_timestep = timestep
        return ("order", self.order)

    def ran_elsewhere(self, key: tuple, member: object) -> bool:
        """Record that ``member`` runs branch ``key`` now; True when another member ran it
        last (``member``'s state for it is out of date)."""
        last = self.last.get(key)
        if last is not None and last() is member:
            return False
        self.last[key] = weakref.ref(member)
        return last is not None and last() is not None


class FrameGroup:
    """Per caller, a ``CallerTrack`` (weakly keyed: a finished request or thread drops it)."""

    __slots__ = ("epoch", "_tracks", "_lock", "__weakref__")

    def __init__(self) -> None:
        self.epoch = 0  # reset() count, over every member
        self._tracks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def reset(self) -> None:
        self.epoch += 1

    def track(self, caller: object) -> CallerTrack:
        found = self._tracks.get(caller)
        if found is None:
            with self._lock:
                found = self._tracks.get(caller)
                if found is None:
                    found = self._tracks[caller] = CallerTrack()
        return found
