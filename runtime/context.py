"""What the code around a model call tells the controller: request, step count, CFG branch.

A ``Request`` is one generation in flight: ``foresight_compile.generation()`` and each
``pipe(...)`` call of an ``optimize``d pipeline open one, in the calling thread. The reuse
controller keys its per-branch state by the current request (by the calling thread when
there is none), so two requests served concurrently from one compiled model never share a
cache, a step count or a decision. When a request closes, every controller that kept state
for it releases that state.

Contexts live in a ``threading.local``: a context opened in one thread is invisible to
another, which is what keeps concurrent requests apart.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import threading
from typing import Callable, Iterator

_REQUEST_IDS = itertools.count(1)


def next_request_id() -> int:
    """A process-wide unique id (requests, and the per-thread states of calls outside one)."""
    return next(_REQUEST_IDS)


class Request:
    """One generation in flight. ``close()`` runs the release callbacks registered on it."""

    __slots__ = ("id", "num_steps", "closed", "_on_close", "__weakref__")

    def __init__(self, num_steps: int | None = None) -> None:
        self.id = next_request_id()
        self.num_steps = num_steps
        self.closed = False
        self._on_close: list[Callable[["Request"], None]] = []

    def on_close(self, callback: Callable[["Request"], None]) -> None:
        self._on_close.append(callback)

    def close(self) -> None:
        self.closed = True
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            callback(self)

    def __repr__(self) -> str:
        return f"Request(id={self.id}, num_steps={self.num_steps}, closed={self.closed})"


@dataclasses.dataclass(frozen=True)
class CallContext:
    """What a pipeline integration knows about the calls it makes, so nothing is guessed.

    ``request``: the generation in flight (its calls share one state per branch, released
    when it closes). ``num_steps``: the generation's step count (resolves a fractional
    warmup, and bounds the generation). ``branch``: a CFG branch name (diffusers'
    ``cache_context`` name); calls under a name share that branch's state whatever their
    order.
    """

    request: Request | None = None
    num_steps: int | None = None
    branch: str | None = None


_LOCAL = threading.local()


def current_context() -> CallContext | None:
    return getattr(_LOCAL, "context", None)


@contextlib.contextmanager
def call_context(**fields) -> Iterator[CallContext]:
    """Within the block, this thread's model calls carry ``fields`` (merged over the
    enclosing context)."""
    previous = current_context()
    merged = dataclasses.replace(previous or CallContext(), **fields)
    _LOCAL.context = merged
    try:
        yield merged
    finally:
        _LOCAL.context = previous


@contextlib.contextmanager
def request_context(num_steps: int | None = None) -> Iterator[Request]:
    """Open a ``Request`` for the calls inside the block; it closes when the block exits."""
    request = Request(num_steps)
    try:
        with call_context(request=request, num_steps=num_steps):
            yield request
    finally:
        request.close()
