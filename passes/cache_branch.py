"""Conditional cache branch pass: the graph form of docs/DESIGN.md section 2.

``insert_cache_branches(segmented)`` returns one GraphModule in which every block call is
``torch.cond(reuse_mask[l], reuse_l, compute_l, (*caches_l, *block_inputs))`` (the
``higher_order.cond`` operator, so Inductor and export trace it without Dynamo):

* ``compute_l`` runs the block and returns ``(*outputs, stats)``, ``stats = [mse, finite]``
  of the outputs against the cache (see ``change_metric``);
* ``reuse_l`` returns ``(*[cache.clone()], zeros(2))`` (a clone: under Inductor a branch may
  not return an operand unchanged).

Signature of the result: ``(*original_inputs, reuse_mask, *caches) -> (*original_outputs,
stats, *new_caches)`` where ``reuse_mask`` is bool ``[L]``, ``caches`` lists every block's
outputs in block order, ``stats`` is float32 ``[U, 5]`` (one row per ``cond``: the raw
change sums of ``change_metric``, zeros for reused blocks) and
``new_caches`` are the block outputs of this call (what the cache holds afterwards). The
cache is explicit state: nothing is mutated, so the graph exports (ONNX ``If`` per block).

``insert_cache_branches(segmented, in_place=True)`` is the same graph form for the torch
executor, with the state written in place instead of returned: signature ``(*original_inputs,
reuse_mask, *caches, *rows) -> original_outputs``, where ``rows`` are the blocks' float32
``[2]`` metric rows; ``compute_l`` is the block's cache update (``cache_update``: it writes
the cache and the row in place) and ``reuse_l`` returns a copy of the cache. Nothing is
copied back after a call and no cache is cloned on the compute side.

``cond`` needs both branches to return each output with one dense layout (same stride
order, sizes-product strides, storage offset 0). The reuse branch returns copies of the
(contiguous) caches, so a block output that is not plainly contiguous is copied to a
contiguous tensor at the end of the compute branch: HunyuanVideo and SkyReels-V2 carry the
patch embedding's ``flatten(2).transpose(1, 2)`` layout through every block, Flux's single
blocks return ``[:, :text_len]`` / ``[:, text_len:]`` slices of their joint sequence.

``cond`` also refuses operands that alias each other or a branch output that aliases an
operand: operands sharing a storage (Allegro's inputs as ``AllegroPipeline`` builds them)
are passed as copies after the first, and a block output that is (a view of) one of its
inputs is copied at the end of the compute branch.

Assumes ``segmented`` came from ``partition_blocks``; it is not modified (the new graph
is built on copies of its submodules).
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.fx as fx

from foresight_compile.passes.cache_update import forecast, with_cache_update
from foresight_compile.passes.change_metric import STATS_COLUMNS, change_stats, with_change_metric
from foresight_compile.passes.partition import Segmented


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(tuple(shape)):
        strides.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(strides))


def needs_dense_copy(value) -> bool:
    """True when a block output's layout differs from a contiguous copy's: cond refuses
    branches whose outputs differ in stride order, in strides that are not size products
    (slices), or in storage offset."""
    if not isinstance(value, torch.Tensor):
        return False
    return (value.storage_offset() != 0
            or tuple(value.stride()) != _contiguous_strides(value.shape))


def _dense(graph: fx.Graph, value: fx.Node) -> fx.Node:
    return graph.call_method("clone", (value,), {"memory_format": torch.contiguous_format})


def _in_place_branch(n_outputs: int, n_inputs: int, update: fx.GraphModule | None,
                     dense: tuple[bool, ...] = ()) -> fx.GraphModule:
    """compute (``update`` given) or reuse branch over operands ``(*caches, row, *inputs)``.

    ``dense[k]``: the compute branch returns output ``k`` as a contiguous copy."""
    root = torch.nn.Module()
    graph = fx.Graph()
    caches = [graph.placeholder(f"cache{k}") for k in range(n_outputs)]
    row = graph.placeholder("row")
    inputs = [graph.placeholder(f"arg{i}") for i in range(n_inputs)]
    if update is None:
        graph.output(tuple(graph.call_method("clone", (c,)) for c in caches))
    else:
        root.update = update
        result = graph.call_module("update", (*inputs, *caches, row))
        outs = [graph.call_function(operator.getitem, (result, k)) for k in range(n_outputs)]
        graph.output(tuple(_dense(graph, o) if d else o
                           for o, d in zip(outs, dense or (False,) * n_outputs)))
    return fx.GraphModule(root, graph)


def _branch(n_outputs: int, n_inputs: int, tracked: fx.GraphModule | None,
            dense: tuple[bool, ...] = ()) -> fx.GraphModule:
    """compute (``tracked`` given) or reuse branch over operands ``(*caches, *inputs)``.

    ``dense[k]``: the compute branch returns output ``k`` as a contiguous copy."""
    root = torch.nn.Module()
    graph = fx.Graph()
    caches = [graph.placeholder(f"cache{k}") for k in range(n_outputs)]
    inputs = [graph.placeholder(f"arg{i}") for i in range(n_inputs)]
    if tracked is None:
        outs = [graph.call_method("clone", (c,)) for c in caches]
        stats = graph.call_method("new_zeros", (caches[0], (STATS_COLUMNS,)), {"dtype": torch.float32})
        graph.output((*outs, stats))
    else:
        root.tracked = tracked
        result = graph.call_module("tracked", (*inputs, *caches))
        outs = [graph.call_function(operator.getitem, (result, k)) for k in range(n_outputs + 1)]
        graph.output(tuple(_dense(graph, o) if k < len(dense) and dense[k] else o
                           for k, o in enumerate(outs)))
    return fx.GraphModule(root, graph)


def _forecast_branch(n_outputs: int, n_inputs: int, slots: int, block: fx.GraphModule | None,
                     dense: tuple[bool, ...] = ()) -> fx.GraphModule:
    """Functional compute (``block`` given) or reuse branch of a forecast history, over
    operands ``(*history, weights, *inputs)`` (history slot-major, newest first). Both return
    ``(*outputs, stats, *new_history)``: compute shifts its new outputs in, reuse serves the
    forecast and keeps the history (copies: a branch may not return an operand)."""
    root = torch.nn.Module()
    graph = fx.Graph()
    history = [[graph.placeholder(f"h{j}_{k}") for k in range(n_outputs)] for j in range(slots)]
    weights = graph.placeholder("weights")
    inputs = [graph.placeholder(f"arg{i}") for i in range(n_inputs)]
    forecasts = [graph.call_function(forecast, (tuple(h[k] for h in history), weights))
                 for k in range(n_outputs)]

    def copies(values):
        return [_dense(graph, v) for v in values]

    if block is None:
        stats = graph.call_method("new_zeros", (history[0][0], (STATS_COLUMNS,)),
                                  {"dtype": torch.float32})
        graph.output((*forecasts, stats, *[c for h in history for c in copies(h)]))
    else:
        root.block = block
        result = graph.call_module("block", tuple(inputs))
        outs = [graph.call_function(operator.getitem, (result, k)) for k in range(n_outputs)]
        stats = graph.call_function(change_stats, (tuple(outs), tuple(history[0]), tuple(forecasts)))
        shifted = copies(outs) + [c for h in history[:-1] for c in copies(h)]
        served = [_dense(graph, o) if k < len(dense) and dense[k] else o for k, o in enumerate(outs)]
        graph.output((*served, stats, *shifted))
    return fx.GraphModule(root, graph)


def _aliased_segment_outputs(src: fx.GraphModule, block_names: set[str]) -> set[fx.Node]:
    """Segment outputs that share storage with an earlier output of the same segment.

    ``cond`` refuses operands that alias each other (CogVideoX slices its text and video
    tokens out of one tensor), so these get a clone in the graph form.
    """
    from torch.multiprocessing.reductions import StorageWeakRef

    aliased: set[fx.Node] = set()
    for call in src.graph.find_nodes(op="call_module"):
        if call.target in block_names:
            continue
        sub_out = next(iter(src.get_submodule(call.target).graph.find_nodes(op="output"))).args[0]
        seen: set = set()
        for user in sorted(call.users, key=lambda u: u.args[1]):
            value = sub_out[user.args[1]].meta.get("example_value")
            if not isinstance(value, torch.Tensor):
                continue
            key = StorageWeakRef(value.untyped_storage())
            if key in seen:
                aliased.add(user)
            seen.add(key)
    return aliased


def _example(node) -> object:
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None


def _storage(value):
    from torch.multiprocessing.reductions import StorageWeakRef
    if not isinstance(value, torch.Tensor):
        return None
    try:
        return StorageWeakRef(value.untyped_storage())
    except (NotImplementedError, RuntimeError):  # a tensor without storage
        return None


def _distinct(graph: fx.Graph, operands: list, sources: list) -> list:
    """``cond`` refuses operands that alias each other: a tensor passed twice, or views of
    one tensor passed apart (Allegro's rotary positions: ``grid_t, grid_h, grid_w = pos``,
    as ``AllegroPipeline`` builds them). Every operand after the first of its storage is
    passed as a copy (``sources``: the original graph's nodes, for their example values)."""
    seen, out = set(), []
    for operand, source in zip(operands, sources):
        key = _storage(_example(source))
        if key is not None and key in seen:
            operand = graph.call_method("clone", (operand,))
        elif key is not None:
            seen.add(key)
        out.append(operand)
    return out


def _aliases_an_input(block: fx.GraphModule, output) -> bool:
    """True when a block output is one of the block's inputs, or shares its storage (an
    input passed through unchanged, or a view of one): a ``cond`` branch may not return
    its operand, so the compute branch returns a copy."""
    key = _storage(_example(output))
    if key is None:
        return isinstance(output, fx.Node) and output.op == "placeholder"
    return any((other := _storage(_example(p))) is not None and other == key
               for p in block.graph.find_nodes(op="placeholder"))


def insert_cache_branches(segmented: Segmented, in_place: bool = False, slots: int = 1,
                          units: Sequence[int] | None = None) -> fx.GraphModule:
    """``units[u]``: the block index (in the reuse mask, the caches' names and the rows) of
    ``segmented``'s block ``u``; default: the identity. A collapsed region
    (``passes/region.py``) is one unit standing for the exit block: its ``cond`` reads
    ``reuse_mask[exit]``, and ``stats`` has one row per unit."""
    src = segmented.gm
    blocks = {name: l for l, name in enumerate(segmented.block_submods)}
    units = tuple(range(len(blocks))) if units is None else tuple(units)
    root = torch.nn.Module()
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = list(src.graph.find_nodes(op="placeholder"))
    for p in placeholders:
        env[p] = graph.placeholder(p.name)
        env[p].meta = dict(p.meta)
    mask = graph.placeholder("reuse_mask")
    forecast_weights = graph.placeholder("forecast_weights") if slots > 1 else None
    n_outputs = {}
    for node in src.graph.find_nodes(op="call_module"):
        if node.target in blocks:
            sub = src.get_submodule(node.target)
            n_outputs[node.target] = len(next(iter(sub.graph.find_nodes(op="output"))).args[0])
    caches = {name: [graph.placeholder(f"cache_{units[blocks[name]]}_{k}") for k in range(n * slots)]
              for name, n in sorted(n_outputs.items(), key=lambda kv: blocks[kv[0]])}
    rows = [graph.placeholder(f"row_{units[u]}") for u in range(len(blocks))] if in_place else []
    stats: list[fx.Node] = [None] * len(blocks)  # type: ignore[list-item]
    new_caches: list[fx.Node] = []
    aliased = _aliased_segment_outputs(src, set(blocks))
    unaliased: dict[fx.Node, fx.Node] = {}
    for node in src.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node in aliased:
            env[node] = graph.node_copy(node, lambda a: env[a])
            unaliased[node] = graph.call_method("clone", (env[node],))
            continue
        if node.op == "call_module" and node.target in blocks:
            l, n = blocks[node.target], n_outputs[node.target]
            sub = src.get_submodule(node.target)
            sub_out = next(iter(sub.graph.find_nodes(op="output"))).args[0]
            dense = tuple(needs_dense_copy(o.meta.get("example_value", o.meta.get("val")))
                          or _aliases_an_input(sub, o) for o in sub_out)
            if in_place:
                setattr(root, f"compute_{l}", _in_place_branch(n, len(node.args),
                                                               with_cache_update(sub, n), dense))
                setattr(root, f"reuse_{l}", _in_place_branch(n, len(node.args), None))
            elif slots > 1:
                setattr(root, f"compute_{l}", _forecast_branch(n, len(node.args), slots, sub, dense))
                setattr(root, f"reuse_{l}", _forecast_branch(n, len(node.args), slots, None))
            else:
                setattr(root, f"compute_{l}", _branch(n, len(node.args), with_change_metric(sub, n),
                                                      dense))
                setattr(root, f"reuse_{l}", _branch(n, len(node.args), None))
            compute = graph.get_attr(f"compute_{l}")
            reuse = graph.get_attr(f"reuse_{l}")
            pred = graph.call_function(operator.getitem, (mask, units[l]))
            if in_place:
                state = (*caches[node.target], rows[l])
            elif slots > 1:
                weights = graph.call_function(operator.getitem, (forecast_weights, units[l]))
                state = (*caches[node.target], weights)
            else:
                state = tuple(caches[node.target])
            operands = (*state, *_distinct(graph, [unaliased.get(a, env[a]) for a in node.args],
                                           list(node.args)))
            result = graph.call_function(torch.ops.higher_order.cond, (pred, reuse, compute, operands))
            env[node] = result
            if in_place:
                continue
            stats[l] = graph.call_function(operator.getitem, (result, n))
            state_outputs = range(n + 1, n + 1 + n * slots) if slots > 1 else range(n)
            new_caches.extend(graph.call_function(operator.getitem, (result, k)) for k in state_outputs)
            continue
        if node.op == "call_module":
            setattr(root, node.target, src.get_submodule(node.target))
        env[node] = graph.node_copy(node, lambda a: env[a])
    out = next(iter(src.graph.find_nodes(op="output"))).args[0]
    outputs = [env[o] if isinstance(o, fx.Node) else o for o in out]
    if in_place:
        graph.output(tuple(outputs))
    else:
        stacked = graph.call_function(torch.stack, (tuple(stats),))
        graph.output((*outputs, stacked, *new_caches))
    gm = fx.GraphModule(root, graph)
    gm.graph.lint()
    return gm
