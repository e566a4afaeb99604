"""Build the segment plan (``runtime.plan.SegmentPlan``) of a partitioned graph.

For every segment of ``partition_blocks``' graph, in order, one ``PlanStep``: the segment
lowered by the ``SegmentCompiler``; for block steps of a caching policy, also the lowered
cache update and serve graphs (``passes/cache_update.py``). Blocks of one stack share the
compiled code of all three (equal graph structure and input metadata).
"""
from __future__ import annotations

import operator
from typing import Callable

import torch.fx as fx

from foresight_compile.lowering.segments import SegmentCompiler
from foresight_compile.passes.cache_update import serve_graph, with_cache_update
from foresight_compile.passes.change_metric import latent_change_graph
from foresight_compile.passes.partition import Segmented
from foresight_compile.runtime.plan import PlanStep, SegmentPlan


def build_plan(segmented: Segmented, compiler: SegmentCompiler, uses_cache: bool,
               caches_residual: Callable[[int], bool] = lambda block: False,
               keep_finite: bool = False, order: int = 0,
               probe_input: int | None = None) -> SegmentPlan:
    """``caches_residual(l)``: block l caches ``out - in`` (where its outputs pair with
    carried inputs of the same shape and dtype; other blocks cache outputs).
    ``keep_finite``: a non-finite output leaves the cache as it was (``lookahead=2``).
    ``order``: the forecast order of served values (0: the newest cached value).
    ``probe_input``: the graph input whose step-to-step change the policy reads (None: none)."""
    slots = order + 1
    gm = segmented.gm
    env: dict[fx.Node, int] = {}  # node -> its slot in the executor's value list
    for node in gm.graph.find_nodes(op="placeholder"):
        env[node] = len(env)
    num_args = len(env)
    blocks = {name: l for l, name in enumerate(segmented.block_submods)}
    steps = []
    for node in gm.graph.find_nodes(op="call_module"):
        sub = gm.get_submodule(node.target)
        n_out = len(next(iter(sub.graph.find_nodes(op="output"))).args[0])
        outputs = [-1] * n_out
        for user in node.users:
            assert user.op == "call_function" and user.target is operator.getitem
            env[user] = len(env)
            outputs[user.args[1]] = env[user]
        block = blocks.get(node.target, -1)
        update = serve = pairs = None
        if block >= 0 and uses_cache:
            if caches_residual(block):
                pairs = segmented.residual_inputs[block]
            update = compiler.segment(with_cache_update(sub, n_out, pairs, keep_finite, slots))
            served = serve_graph(len(node.args), n_out, pairs, segmented.needs_clone[block], slots)
            serve = None if served is None else compiler.segment(served)
        steps.append(PlanStep(block, compiler.segment(sub), update, serve,
                              tuple(env[a] for a in node.args), tuple(outputs), pairs,
                              slots if block >= 0 and uses_cache else 1))
    out = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    output_spec = tuple(("slot", env[o]) if isinstance(o, fx.Node) else ("const", o) for o in out)
    probe = None if probe_input is None else compiler.segment(latent_change_graph())
    return SegmentPlan(tuple(steps), num_args, len(env), output_spec,
                       len(segmented.block_submods), probe,
                       -1 if probe_input is None else probe_input)
