"""Build the segment plan (``runtime.plan.SegmentPlan``) of a partitioned graph.

For every segment of ``partition_blocks``' graph, in order, one ``PlanStep``: the segment
lowered by the ``SegmentCompiler``; for block steps of a caching policy, also the lowered
cache update and serve graphs (``passes/cache_update.py``). Blocks of one stack share the
compiled code of all three (equal graph structure and input metadata).

Under dynamic shapes the compiler compiles each segment as it is handed over, from its
placeholders' fake example values; the wrapper graphs built here (update, serve, probe)
get theirs from the block's own inputs and outputs (``_with_examples``).
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from foresight_compile.lowering.segments import SegmentCompiler, meta_value
from foresight_compile.passes.cache_update import serve_graph, with_cache_update
from foresight_compile.passes.change_metric import STATS_COLUMNS, latent_change_graph
from foresight_compile.passes.partition import Segmented
from foresight_compile.runtime.plan import PlanStep, SegmentPlan
from foresight_compile.runtime.policies.base import ROW_STRIDE


def _fake(like: Any, shape: Sequence, dtype: torch.dtype) -> Any:
    """A contiguous fake tensor in ``like``'s fake mode and device (None without one)."""
    mode = getattr(like, "fake_mode", None)
    if mode is None:
        return None
    with mode:
        return torch.empty(tuple(shape), dtype=dtype, device=like.device)


def _twin(value: Any) -> Any:
    """A distinct fake tensor with ``value``'s metadata (each history slot is its own
    buffer: equal fakes would be compiled as one aliased input)."""
    mode = getattr(value, "fake_mode", None)
    if mode is None:
        return value
    with mode:
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                   device=value.device)


def _with_examples(wrapper: fx.GraphModule | None, values: Sequence) -> fx.GraphModule | None:
    """Give the wrapper's placeholders, in order, the example values ``values``."""
    if wrapper is not None:
        for node, value in zip(wrapper.graph.find_nodes(op="placeholder"), values):
            node.meta["example_value"] = value
    return wrapper


def _block_examples(sub: fx.GraphModule, slots: int) -> tuple[list, list, Any, Any]:
    """Example values of a block's cache wrappers: its inputs, the history (slot-major,
    one value per output, like the outputs), the forecast weights and the metric row."""
    ins = [meta_value(p) for p in sub.graph.find_nodes(op="placeholder")]
    outs = [meta_value(o) for o in next(iter(sub.graph.find_nodes(op="output"))).args[0]]
    like = next((v for v in outs if isinstance(v, torch.Tensor)), None)
    return ins, [_twin(v) for v in outs * slots], _fake(like, (slots,), torch.float32), \
        _fake(like, (STATS_COLUMNS,), torch.float32)


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
            ins, history, weights, row = _block_examples(sub, slots)
            update = compiler.segment(_with_examples(
                with_cache_update(sub, n_out, pairs, keep_finite, slots),
                [*ins, *history, *([weights] if slots > 1 else []), row]))
            served = _with_examples(
                serve_graph(len(node.args), n_out, pairs, segmented.needs_clone[block], slots),
                [*ins, *history, *([weights] if slots > 1 else [])])
            serve = None if served is None else compiler.segment(served)
        steps.append(PlanStep(block, compiler.segment(sub), update, serve,
                              tuple(env[a] for a in node.args), tuple(outputs), pairs,
                              slots if block >= 0 and uses_cache else 1))
    out = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    output_spec = tuple(("slot", env[o]) if isinstance(o, fx.Node) else ("const", o) for o in out)
    probe = None
    if probe_input is not None:
        latent = meta_value(list(gm.graph.find_nodes(op="placeholder"))[probe_input])
        probe = compiler.segment(_with_examples(latent_change_graph(), [
            latent, _fake(latent, getattr(latent, "shape", ()), getattr(latent, "dtype", None)),
            _fake(latent, (ROW_STRIDE,), torch.float32)]))
    return SegmentPlan(tuple(steps), num_args, len(env), output_spec,
                       len(segmented.block_submods), probe,
                       -1 if probe_input is None else probe_input)
