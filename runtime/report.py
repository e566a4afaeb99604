"""Stats: the one report of what the reuse controller did, for every executor and engine.

``Stats.collect(controllers, ...)`` merges the history rows of one or more controllers (a
model compiled into several graphs has one controller per graph) in call order, with their
block-compute counts and cache bytes. ``foresight_compile.stats(model)`` and the engines'
``stats()`` both build it here.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class Stats:
    """What the reuse controller did, one row per model evaluation (oldest first).

    ``mask[i][l]`` is True when evaluation ``i`` served block ``l`` from its cache.
    ``steps`` counts evaluations (a CFG pipeline that calls the model twice per denoising
    step records two rows per step, told apart by ``branch``). ``cache_bytes`` is the exact
    size of the cache buffers held now, over every branch. The rows are the last
    ``HISTORY_ROWS`` evaluations per graph (a bounded ring); ``block_computes`` counts all.
    ``accelerated`` is False when the model runs without block reuse, ``reason`` says why.
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
    request: list[int] = dataclasses.field(default_factory=list)
    pooled_bytes: int = 0
    accelerated: bool = True
    reason: str | None = None

    @classmethod
    def collect(cls, controllers: Sequence, blocks: list[str], compile_seconds: float,
                policy: str) -> "Stats":
        rows = []
        for c in controllers:
            h = c.rows()
            rows += zip(h.call, h.request, h.generation, h.branch, h.step, h.timestep, h.mask,
                        h.change, h.thresholds)
        rows.sort(key=lambda r: r[0])
        columns = list(zip(*rows)) if rows else [()] * 9
        _, request, generation, branch, step, timestep, mask, change, thresholds = map(list, columns)
        computes = [sum(c) for c in zip(*(c.block_computes for c in controllers))]
        return cls(blocks=blocks, mask=mask, branch=branch, generation=generation, step=step,
                   timestep=timestep, cache_bytes=sum(c.cache_bytes for c in controllers),
                   block_computes=computes, compile_seconds=compile_seconds, policy=policy,
                   change=change, thresholds=thresholds, request=request,
                   pooled_bytes=sum(c.pooled_bytes for c in controllers))

    @classmethod
    def not_accelerated(cls, reason: str, policy: str, compile_seconds: float = 0.0) -> "Stats":
        """The report of a model that runs without block reuse (it fell back)."""
        return cls(blocks=[], mask=[], branch=[], generation=[], step=[], timestep=[],
                   cache_bytes=0, block_computes=[], compile_seconds=compile_seconds,
                   policy=policy, accelerated=False, reason=reason)

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
        from foresight_compile.runtime.reuse_map import plot_reuse_map
        plot_reuse_map(self, path)
        return path

    def __str__(self) -> str:
        if not self.accelerated:
            return f"foresight stats: not accelerated ({self.reason})"
        return (f"foresight stats: policy={self.policy} evaluations={self.steps} "
                f"blocks={len(self.blocks)} reused={self.reused_fraction:.1%} "
                f"cache={self.cache_bytes / 2**20:.2f} MiB (pooled {self.pooled_bytes / 2**20:.2f}) "
                f"compile={self.compile_seconds:.1f}s")
