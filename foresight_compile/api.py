"""Public run-time API: ``stats(model)``, ``reset(model)`` and the call contexts
``generation()`` / ``branch()``."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from foresight_compile.errors import ForesightValueError, NotCompiledError
from foresight_compile.program import ForesightProgram, programs_of
from foresight_compile.runtime.context import call_context, request_context
from foresight_compile.runtime.report import Stats

__all__ = ["Stats", "stats", "reset", "generation", "branch"]


def _programs(model: torch.nn.Module) -> list[ForesightProgram]:
    found = programs_of(model)
    if not found:
        raise NotCompiledError(
            "this model has no foresight program: compile it with torch.compile(model, "
            "backend='foresight') and call it once (a model that fell back to plain Inductor "
            "has none either; see the warning it printed)")
    return found


def stats(model: torch.nn.Module) -> Stats:
    """Reuse statistics of ``model`` (the compiled module or the original one)."""
    programs = _programs(model)
    return Stats.collect([p.controller for p in programs], programs[-1].block_paths,
                         sum(p.compile_seconds for p in programs), programs[-1].options.policy)


@contextlib.contextmanager
def generation(num_steps: int | None = None) -> Iterator[None]:
    """Calls inside the block, in this thread, form one generation (one request) of
    ``num_steps`` steps in every branch.

    Entering starts a new generation with its own state (each branch computes every block
    at its first call), tells the controller the step count, so a fractional ``warmup``
    resolves at once, and keeps it apart from generations other threads run at the same
    time. Exiting releases its state."""
    with request_context(num_steps=num_steps):
        yield


@contextlib.contextmanager
def branch(name: str) -> Iterator[None]:
    """Calls inside the block belong to the CFG branch ``name`` ("cond", "uncond"), whatever
    their order within a step; each name has its own state and cache."""
    if not isinstance(name, str) or not name:
        raise ForesightValueError(f"branch name must be a non-empty str, got {name!r}")
    with call_context(branch=name):
        yield


def reset(model: torch.nn.Module, clear_stats: bool = False) -> None:
    """Start a new generation at the next call of every branch (caches are forgotten).

    ``clear_stats=True`` also empties what ``stats()`` reports."""
    for p in _programs(model):
        p.controller.reset(clear_stats)
