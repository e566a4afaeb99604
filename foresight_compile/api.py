"""Public run-time API: ``stats(model)``, ``reset(model)`` and the call contexts
``generation()`` / ``branch()``.

``stats`` and ``reset`` never raise on a compiled model (``torch.compile(model, ...)`` or
``model.compile(...)``): before its first call ``stats`` reports nothing compiled yet and
``reset`` does nothing; on a model the backend could not cache (it fell back to plain
Inductor) ``stats`` says it is not accelerated and why (the warning's reason). Only a model
that was never compiled raises ``NotCompiledError``. On a pipeline ``optimize``d, ``stats``
reports per denoiser (``PipelineStats``) and ``reset`` resets them all."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from foresight_compile.errors import ForesightValueError, NotCompiledError
from foresight_compile.program import ForesightProgram, fallbacks_of, programs_of
from foresight_compile.runtime.context import call_context, request_context
from foresight_compile.runtime.report import Stats

__all__ = ["Stats", "PipelineStats", "stats", "reset", "generation", "branch"]

# The attribute ``optimize(pipe)`` keeps its state in (``denoisers``: name -> module).
PIPELINE_STATE = "_foresight_optimized"


NOT_YET = ("nothing compiled yet: the backend compiles at the model's first call (a model "
           "compiled with another backend never has a foresight program)")


def _is_compiled(model: torch.nn.Module) -> bool:
    """``torch.compile(model)`` (an OptimizedModule) or ``model.compile()``."""
    return (isinstance(model, torch._dynamo.eval_frame.OptimizedModule)
            or getattr(model, "_compiled_call_impl", None) is not None)


def _programs(model: torch.nn.Module) -> list[ForesightProgram]:
    found = programs_of(model)
    if not found and not _is_compiled(model) and not fallbacks_of(model):
        raise NotCompiledError(
            "this model was never compiled: compile it with torch.compile(model, "
            "backend='foresight') (stats() and reset() accept the compiled module or the "
            "original one once it has run)")
    return found


class PipelineStats(dict):
    """``stats(pipe)`` of an ``optimize``d pipeline: denoiser name -> its ``Stats``
    (``transformer``, ``transformer_2``, ...)."""

    @property
    def reused_fraction(self) -> float:
        """Over every denoiser: reused block evaluations / all block evaluations."""
        done = [(s.reused_fraction, s.steps * len(s.blocks)) for s in self.values() if s.accelerated]
        total = sum(n for _, n in done)
        return sum(f * n for f, n in done) / total if total else 0.0

    def __str__(self) -> str:
        return "\n".join(f"{name}: {s}" for name, s in self.items())


def _denoisers(obj) -> dict | None:
    """An ``optimize``d pipeline's denoisers, or None for anything else."""
    if isinstance(obj, torch.nn.Module):
        return None
    state = getattr(obj, PIPELINE_STATE, None)
    return None if state is None else state.denoisers


def stats(model) -> Stats | PipelineStats:
    """Reuse statistics of ``model`` (the compiled module or the original one), or of each
    denoiser of an ``optimize``d pipeline (``PipelineStats``).

    ``accelerated`` is False, with the ``reason``, when no graph of the model holds a
    cacheable block stack (the fallback's reason), or before the first call."""
    denoisers = _denoisers(model)
    if denoisers is not None:
        return PipelineStats({name: stats(m) if programs_of(m) or _is_compiled(m) or fallbacks_of(m)
                              else Stats.not_accelerated(NOT_YET, "unknown")
                              for name, m in denoisers.items()})
    programs = _programs(model)
    if not programs:
        fallbacks = fallbacks_of(model)
        if not fallbacks:
            return Stats.not_accelerated(NOT_YET, "unknown")
        # The most telling reason: a graph break (a split block) before "no stack found".
        reason = next((f.reason for f in fallbacks if "graph break" in f.reason),
                      fallbacks[0].reason)
        return Stats.not_accelerated(reason, fallbacks[0].policy)
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

    ``clear_stats=True`` also empties what ``stats()`` reports. Before the first call, or
    on a model that fell back, there is nothing to reset."""
    denoisers = _denoisers(model)
    if denoisers is not None:
        for m in denoisers.values():
            if programs_of(m):
                reset(m, clear_stats)
        return
    for p in _programs(model):
        p.controller.reset(clear_stats)
