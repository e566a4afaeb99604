"""The segment plan: the partitioned graph flattened into a list of calls over slots.

Both host-branch executors (``SegmentExecutor``, the CUDA-graph executor) run this plan:
slot ``i < num_args`` holds graph input ``i``; each step reads its argument slots, calls its
segment, and writes its outputs to their slots; ``output_spec`` says which slots (or
constants) the graph returns.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch.fx as fx

from foresight_compile.lowering import Segment, SegmentCompiler
from foresight_compile.passes.change_metric import with_change_metric
from foresight_compile.passes.partition import Segmented


@dataclasses.dataclass(frozen=True)
class PlanStep:
    block: int  # -1: not a block
    segment: Segment
    tracked: Segment | None  # block variant that also returns [mse, finite]
    inputs: tuple[int, ...]  # argument slots
    outputs: tuple[int, ...]  # env slot per output, -1 when unused
    clone: tuple[bool, ...]  # per output: a served cache must be copied
    # Residual mode: per output, the argument position it is a residual of (the cache
    # holds ``out - in``, reuse serves ``in + residual``); None: the cache holds outputs.
    residual: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class SegmentPlan:
    steps: tuple[PlanStep, ...]
    num_args: int
    num_slots: int
    output_spec: tuple[tuple[str, Any], ...]  # ("slot", i) or ("const", value)
    num_blocks: int


def build_plan(segmented: Segmented, compiler: SegmentCompiler, uses_cache: bool,
               residual: tuple[tuple[int, ...] | None, ...] | None = None) -> SegmentPlan:
    """``residual[l]``: block l's residual pairing (see ``PlanStep.residual``), or None."""
    gm = segmented.gm
    slots: dict[fx.Node, int] = {}
    for node in gm.graph.find_nodes(op="placeholder"):
        slots[node] = len(slots)
    num_args = len(slots)
    blocks = {name: l for l, name in enumerate(segmented.block_submods)}
    steps = []
    for node in gm.graph.find_nodes(op="call_module"):
        sub = gm.get_submodule(node.target)
        n_out = len(next(iter(sub.graph.find_nodes(op="output"))).args[0])
        outputs = [-1] * n_out
        for user in node.users:
            assert user.op == "call_function" and user.target is operator.getitem
            slots[user] = len(slots)
            outputs[user.args[1]] = slots[user]
        block = blocks.get(node.target, -1)
        pairs = residual[block] if residual is not None and block >= 0 else None
        tracked = None
        if block >= 0 and uses_cache:
            tracked = compiler.segment(with_change_metric(sub, n_out, pairs))
        clone = segmented.needs_clone[block] if block >= 0 else (False,) * n_out
        steps.append(PlanStep(block, compiler.segment(sub), tracked,
                              tuple(slots[a] for a in node.args), tuple(outputs), clone, pairs))
    out = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    output_spec = tuple(("slot", slots[o]) if isinstance(o, fx.Node) else ("const", o) for o in out)
    return SegmentPlan(tuple(steps), num_args, len(slots), output_spec,
                       len(segmented.block_submods))
