"""FrameGroup: the controllers of one model's graphs that stand in for one another.

Dynamo compiles a frame again when a guard fails (another dtype, a static size, a
specialised int): each compile is its own program with its own controller, and each call
runs one of them. A caller going f32, f64, f32 down one timestep sequence would otherwise
find, in the f32 controller, the state it left two calls ago (same signature, timestep
still decreasing) and continue that generation, serving its caches, although the inputs
changed in between. Controllers of one frame of one model share a ``FrameGroup``, which
tells a controller when another member ran *its* branch for the same caller since its own
last call: then the caller's state in it is out of date and starts a new generation.

"Its branch": a named call (``branch()``, ``cache_context``) is told by name; an unnamed one
by timestep: another member's call at a timestep other than this member's previous and
current one took a step of this sequence. So CFG passes that are compiled apart (cond and
uncond prompts of different lengths: two graphs, called in turn at each timestep) keep
their generations. Graphs of *different* frames (a graph break between blocks) run one
after the other in every call; they are not alternatives and never share a group.
"""
from __future__ import annotations

import threading
import weakref

_FOREIGN_KEPT = 4  # foreign calls remembered per member and caller before "out of date"


class FrameGroup:
    """Per caller (request, or thread without one) and member: the member's last call tag
    and the tags of other members' calls since. Weak on callers and members alike."""

    __slots__ = ("members", "_seen", "_lock", "__weakref__")

    def __init__(self) -> None:
        self.members = 0
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def join(self) -> "FrameGroup":
        self.members += 1
        return self

    def switched(self, caller: object, member: object, tag: object) -> bool:
        """Record ``member``'s call for ``caller`` (``tag``: the timestep as a float, or
        ``("name", name)``); True when another member ran this branch since ``member``'s
        last call for ``caller``."""
        if self.members < 2:
            return False
        with self._lock:
            table = self._seen.get(caller)
            if table is None:
                table = self._seen[caller] = weakref.WeakKeyDictionary()
            mine = table.get(member)
            # No record: the member ran before the group grew (or never): if others ran
            # since, its state for the caller (if any) cannot be trusted.
            stale = bool(table) if mine is None else _took_my_step(mine[0], mine[1], tag)
            for other, record in table.items():
                if other is not member and record[1] is not None:
                    record[1] = record[1] + [tag] if len(record[1]) < _FOREIGN_KEPT else None
            table[member] = [tag, []]
        return stale


def _took_my_step(last: object, foreign: list | None, tag: object) -> bool:
    if foreign is None:
        return True  # too many to tell
    if isinstance(tag, tuple):  # named: another member ran this very branch
        return tag in foreign
    return any(f != last and f != tag for f in foreign if not isinstance(f, tuple))
