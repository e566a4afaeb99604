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

import logging
import math
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from foresight_compile.lowering.segments import SegmentCompiler, contiguous_fake, meta_value
from foresight_compile.passes.cache_update import (serve_graph, store_graph, stored_per_value,
                                                   with_cache_update)
from foresight_compile.passes.change_metric import STATS_COLUMNS, latent_change_graph
from foresight_compile.passes.partition import Segmented
from foresight_compile.passes.region import region_exit
from foresight_compile.runtime.cache_history import HistoryLayout
from foresight_compile.runtime.plan import PlanStep, SegmentPlan
from foresight_compile.runtime.policies.base import ROW_STRIDE


log = logging.getLogger(__name__)


def plan_layout(segmented: Segmented, step_level: bool, slots: int,
                max_bytes: int | None = None, storage: str | None = None) -> HistoryLayout:
    """What every branch of this graph caches: for a policy that decides per step
    (``step_level``), only the region exit when the region has one (``passes/region.py``);
    every block otherwise."""
    num_blocks = len(segmented.block_submods)
    exit_block = region_exit(segmented) if step_level else None
    if exit_block is None:
        if step_level:
            log.info("values other than the last block's outputs leave the block region: "
                     "every block keeps a cache")
        return HistoryLayout.every_block(num_blocks, slots, max_bytes, storage)
    return HistoryLayout.exit_only(num_blocks, exit_block, slots, max_bytes, storage)


def _hint(size: Any) -> int | None:
    """A size's value at the traced example (a symbolic size's hint; None if unknown)."""
    if isinstance(size, int):
        return size
    hint = getattr(getattr(size, "node", None), "hint", None)
    return None if hint is None else int(hint)


def cached_values(segmented: Segmented, layout: HistoryLayout
                  ) -> list[tuple[tuple[int | None, ...], torch.dtype]]:
    """``(shape, dtype)`` of each tensor one history slot of a branch holds, at the traced
    example's sizes (a None size: unknown until run)."""
    found = []
    for l, name in enumerate(segmented.block_submods):
        if not layout.cached[l]:
            continue
        out = next(iter(segmented.gm.get_submodule(name).graph.find_nodes(op="output"))).args[0]
        for node in out:
            value = meta_value(node)
            if isinstance(value, torch.Tensor):
                found.append((tuple(_hint(d) for d in value.shape), value.dtype))
    return found


def planned_bytes(values: Sequence[tuple[tuple[int | None, ...], torch.dtype]], slots: int,
                  probe: Any = None, dtype: torch.dtype | None = None) -> int | None:
    """Bytes of one branch's cache: ``slots`` copies of ``values`` (stored as ``dtype`` when
    given) and the latent probe (a copy of ``probe``, when the policy reads the latent's
    change). None when a size is unknown until run."""
    total = 0
    scale = 4 if dtype is not None and stored_per_value(str(dtype).removeprefix("torch.")) > 1 else 0
    for shape, value_dtype in values:
        if any(d is None for d in shape):
            return None
        total += (math.prod(shape) * (dtype or value_dtype).itemsize + scale) * slots
    if isinstance(probe, torch.Tensor):
        sizes = [_hint(d) for d in probe.shape]
        if any(d is None for d in sizes):
            return None
        total += math.prod(sizes) * probe.dtype.itemsize
    return total


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


def _stored_like(value: Any, storage: str | None) -> list:
    """Example values of what a history slot keeps for one cached ``value``."""
    if storage is None or not isinstance(value, torch.Tensor):
        return [_twin(value)]
    mode = getattr(value, "fake_mode", None)
    if mode is None:
        return [_twin(value)]
    with mode:
        stored = torch.empty_strided(value.shape, value.stride(), dtype=getattr(torch, storage),
                                     device=value.device)
    return [stored]


def _block_examples(sub: fx.GraphModule, slots: int, storage: str | None
                    ) -> tuple[list, list, Any, Any, list]:
    """Example values of a block's cache wrappers: its inputs, the history (slot-major:
    per slot one stored value per output, then their scales when scaled), the forecast
    weights, the metric row; and the outputs' dtypes."""
    ins = [meta_value(p) for p in sub.graph.find_nodes(op="placeholder")]
    outs = [meta_value(o) for o in next(iter(sub.graph.find_nodes(op="output"))).args[0]]
    like = next((v for v in outs if isinstance(v, torch.Tensor)), None)
    history = []
    for _ in range(slots):
        history += [t for v in outs for t in _stored_like(v, storage)]
        if stored_per_value(storage) > 1:
            history += [contiguous_fake(like, (), torch.float32) for _ in outs]
    return (ins, history, contiguous_fake(like, (slots,), torch.float32),
            contiguous_fake(like, (STATS_COLUMNS,), torch.float32),
            [getattr(v, "dtype", None) for v in outs])


def build_plan(segmented: Segmented, compiler: SegmentCompiler, layout: HistoryLayout | None,
               caches_residual: Callable[[int], bool] = lambda block: False,
               keep_finite: bool = False, probe_input: int | None = None) -> SegmentPlan:
    """``layout``: which blocks hold a cache and how many values (``cache_history.py``);
    None: no caching policy (every block is a plain segment).
    ``caches_residual(l)``: block l caches ``out - in`` (where its outputs pair with
    carried inputs of the same shape and dtype; other blocks cache outputs).
    ``keep_finite``: a non-finite output leaves the cache as it was (``lookahead=2``).
    ``probe_input``: the graph input whose step-to-step change the policy reads (None: none).

    Guarantees: block steps of cached blocks have ``update`` (and ``serve`` where serving
    runs code); every other step has neither."""
    slots = 1 if layout is None else layout.slots
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
        update = serve = pairs = store = None
        cached = block >= 0 and layout is not None and layout.cached[block]
        if cached:
            if caches_residual(block):
                pairs = segmented.residual_inputs[block]
            storage = layout.storage
            ins, history, weights, row, dtypes = _block_examples(sub, slots, storage)
            update = compiler.segment(_with_examples(
                with_cache_update(sub, n_out, pairs, keep_finite, slots, storage),
                [*ins, *history, *([weights] if slots > 1 else []), row]))
            served = _with_examples(
                serve_graph(len(node.args), n_out, pairs, segmented.needs_clone[block], slots,
                            storage, dtypes),
                [*ins, *history, *([weights] if slots > 1 else [])])
            serve = None if served is None else compiler.segment(served)
            # Run eagerly, once per branch and input shapes: not worth a compile.
            store = store_graph(n_out, slots, storage)
        steps.append(PlanStep(block, compiler.segment(sub), update, serve,
                              tuple(env[a] for a in node.args), tuple(outputs), pairs,
                              slots if cached else 1, store))
    out = next(iter(gm.graph.find_nodes(op="output"))).args[0]
    output_spec = tuple(("slot", env[o]) if isinstance(o, fx.Node) else ("const", o) for o in out)
    probe = None
    if probe_input is not None:
        latent = meta_value(list(gm.graph.find_nodes(op="placeholder"))[probe_input])
        probe = compiler.segment(_with_examples(latent_change_graph(), [
            latent,
            contiguous_fake(latent, getattr(latent, "shape", ()), getattr(latent, "dtype", None)),
            contiguous_fake(latent, (ROW_STRIDE,), torch.float32)]))
    return SegmentPlan(tuple(steps), num_args, len(env), output_spec,
                       len(segmented.block_submods), probe,
                       -1 if probe_input is None else probe_input)
