"""The segment plan: the partitioned graph flattened into a list of calls over slots.

Built at compile time by ``foresight_compile.lowering.plan.build_plan``; run per step by
the host-branch executors (``SegmentExecutor``, ``CudaGraphExecutor``). Slot ``i <
num_args`` holds graph input ``i``; each step reads its argument slots, calls a segment,
and writes its outputs to their slots; ``output_spec`` says which slots (or constants) the
graph returns. Segments are callables with an ``unbind()`` method (forget the code bound
for the previous input shapes).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class PlanStep:
    block: int  # -1: not a block
    segment: Callable  # computes the step's outputs
    # Block steps of a caching policy: ``update(*ins, *history, [weights,] row)`` computes
    # the block, writes its change metric into ``row`` and shifts the new values into the
    # history, in place, and returns the outputs; ``serve(*ins, *history, [weights])``
    # returns the served outputs (None: the newest cached tensors are served, nothing runs).
    update: Callable | None
    serve: Callable | None
    inputs: tuple[int, ...]  # argument slots
    outputs: tuple[int, ...]  # env slot per output, -1 when unused
    # Residual mode: per output, the argument position it is a residual of (the cache
    # holds ``out - in``); None: the cache holds outputs.
    residual: tuple[int, ...] | None = None
    # Values of the cached quantity kept per output: 1 (a copy), k + 1 (forecast order k);
    # update and serve then also take the block's forecast weights.
    slots: int = 1
    # ``store(*values, *buffers)``: writes a block's first computed values (for new input
    # shapes) into every history slot, in the storage dtype.
    store: Callable | None = None

    def callables(self) -> tuple[Callable, ...]:
        return tuple(c for c in (self.segment, self.update, self.serve) if c is not None)


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    steps: tuple[PlanStep, ...]
    num_args: int
    num_slots: int
    output_spec: tuple[tuple[str, Any], ...]  # ("slot", i) or ("const", value)
    num_blocks: int
    # Policies that read the latent's change: ``probe(latent, previous, aux)`` writes
    # ``[sum (latent - previous)^2, sum previous^2]`` into ``aux[:2]`` and the latent into
    # ``previous``; ``probe_slot`` is the graph input it reads.
    probe: Callable | None = None
    probe_slot: int = -1
