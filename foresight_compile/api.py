"""Public run-time API: ``stats(model)`` and ``reset(model)``."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
from typing import Iterator

import torch

from foresight_compile.errors import ForesightValueError, NotCompiledError
from foresight_compile.program import ForesightProgram, programs_of
from foresight_compile.runtime.controller import call_context


@dataclasses.dataclass(frozen=True)
class Stats:
    """What the reuse controller did, one row per model evaluation (oldest first).

    ``mask[i][l]`` is True when evaluation ``i`` served block ``l`` from its cache.
    ``steps`` counts evaluations (a CFG pipeline that calls the model twice per denoising
    step records two rows per step, told apart by ``branch``). ``cache_bytes`` is the exact
    size of the cache buffers held now, over every branch.
    """

    blocks: list[str]
    mask: list[list[bool]]
    branch: list[int]
    generation: list[int]
    step: list[int]
    timestep: list[float]
    cache_bytes: int
    block_computes: list[int]
    compile_seconds: float
    policy: str
    # Per evaluation, per block: the change metric (MSE against the cache) and threshold
    # after the evaluation; None for policies that compute no metric.
    change: list[list[float] | None] = dataclasses.field(default_factory=list)
    thresholds: list[list[float] | None] = dataclasses.field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.mask)

    @property
    def reused_fraction(self) -> float:
        cells = sum(len(row) for row in self.mask)
        return sum(map(sum, self.mask)) / cells if cells else 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(steps=self.steps, reused_fraction=self.reused_fraction)
        return d

    def to_json(self) -> str:
        """The same data as ``plot``: JSON (infinite or NaN metrics become null)."""
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None
            if isinstance(v, list):
                return [clean(x) for x in v]
            return v
        return json.dumps({k: clean(v) for k, v in self.to_dict().items()})

    def plot(self, path: str) -> str:
        """Write the reuse map (PNG): evaluations x blocks, computed vs reused, the change
        metric as colour with thresholds marked. Returns ``path``."""
        from foresight_compile.reuse_map import plot_reuse_map
        plot_reuse_map(self, path)
        return path

    def __str__(self) -> str:
        return (f"foresight stats: policy={self.policy} evaluations={self.steps} "
                f"blocks={len(self.blocks)} reused={self.reused_fraction:.1%} "
                f"cache={self.cache_bytes / 2**20:.2f} MiB compile={self.compile_seconds:.1f}s")


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
    rows = sorted((r for p in programs for r in p.controller.records), key=lambda r: r.call)
    return Stats(
        blocks=programs[-1].block_paths,
        mask=[list(r.reused) for r in rows],
        branch=[r.branch for r in rows],
        generation=[r.generation for r in rows],
        step=[r.step for r in rows],
        timestep=[r.timestep for r in rows],
        cache_bytes=sum(s.buffers.nbytes for p in programs for s in p.controller.branches),
        block_computes=[sum(c) for c in zip(*(p.executor.block_computes for p in programs))],
        compile_seconds=sum(p.compile_seconds for p in programs),
        policy=programs[-1].options.policy,
        change=[None if r.change is None else r.change.tolist() for r in rows],
        thresholds=[None if r.thresholds is None else r.thresholds.tolist() for r in rows],
    )


_GENERATIONS = itertools.count(1)


@contextlib.contextmanager
def generation(num_steps: int | None = None) -> Iterator[None]:
    """Calls inside the block form one generation of ``num_steps`` steps in every branch.

    Entering starts a new generation (each branch recomputes every block at its next call)
    and tells the controller the step count, so a fractional ``warmup`` resolves at once.
    """
    with call_context(generation=next(_GENERATIONS), num_steps=num_steps):
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
        p.controller.reset()
        if clear_stats:
            p.controller.clear_records()
            p.executor.block_computes[:] = [0] * len(p.executor.block_computes)
