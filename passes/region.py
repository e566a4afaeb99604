"""The block region: every block and the glue between them, as one unit.

A policy that serves every block of a step at once (or computes every block) needs a cache
only where the region hands its values to the rest of the model: the *exit*. Models with
several stacks (Flux, HunyuanVideo: a token refiner, dual-stream then single-stream blocks)
are one region, from the first block to the last.

``region_exit(segmented)``: the index of the block whose outputs are the only values of the
region read after it (the last block), or None when something else leaves the region (a
glue value or an inner block's output that the epilogue reads: caching the exit alone would
not be enough to skip the region).

``collapse_region(segmented, exit_block)``: the same graph with the region as one segment
returning the exit's outputs (in the exit block's output order); the graph form builds one
``cond`` (one ONNX ``If``) around it.

Assumes ``segmented`` came from ``partition_blocks`` (blocks and glue are ``call_module``
nodes whose outputs are read through ``getitem``). Neither function modifies it.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from foresight_compile.passes.partition import Segmented


def _region(segmented: Segmented, exit_block: int) -> tuple[list[fx.Node], fx.Node]:
    """The region's nodes in graph order, and the exit block's call."""
    graph = segmented.gm.graph
    calls = {n.target: n for n in graph.find_nodes(op="call_module")}
    first = calls[segmented.block_submods[0]]
    last = calls[segmented.block_submods[exit_block]]
    nodes, inside = [], False
    for node in graph.nodes:
        if node is first:
            inside = True
        if inside:
            nodes.append(node)
        if node is last:
            break
    nodes += sorted((u for u in last.users if u.target is operator.getitem),
                    key=lambda u: u.args[1])
    return nodes, last


def region_exit(segmented: Segmented) -> int | None:
    if not segmented.block_submods:
        return None
    exit_block = len(segmented.block_submods) - 1
    nodes, last = _region(segmented, exit_block)
    members = set(nodes)
    for node in nodes:
        leaves = any(user not in members for user in node.users)
        if leaves and not (node.target is operator.getitem and node.args[0] is last):
            return None
    return exit_block


def collapse_region(segmented: Segmented, exit_block: int) -> Segmented:
    gm = segmented.gm
    nodes, last = _region(segmented, exit_block)
    members = set(nodes)
    exits = [n for n in nodes if n.target is operator.getitem and n.args[0] is last]
    # The exit's values carry the exit block's traced example values (shape, dtype, layout).
    block_out = next(iter(gm.get_submodule(last.target).graph.find_nodes(op="output"))).args[0]
    example = {e: dict(block_out[e.args[1]].meta) for e in exits}
    # The region as a module: placeholders for what it reads from outside, in first-use order.
    sub_root, sub = torch.nn.Module(), fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    reads: list[fx.Node] = []
    for node in nodes:
        for value in node.all_input_nodes:
            if value not in members and value not in env:
                env[value] = sub.placeholder(value.name)
                env[value].meta = dict(value.meta)
                reads.append(value)
        if node.op == "call_module":
            setattr(sub_root, node.target, gm.get_submodule(node.target))
        elif node.op == "get_attr":
            setattr(sub_root, node.target, getattr(gm, node.target))
        env[node] = sub.node_copy(node, lambda a: env[a])
        if node in example:
            env[node].meta = dict(example[node])
    sub.output(tuple(env[e] for e in exits))
    region = fx.GraphModule(sub_root, sub)
    # The outer graph: the region's nodes replaced by one call at the exit's place.
    root, graph = torch.nn.Module(), fx.Graph()
    outer: dict[fx.Node, fx.Node] = {}
    root.region = region
    for node in gm.graph.nodes:
        if node in members:
            if node is last:
                call = graph.call_module("region", tuple(outer[r] for r in reads))
                for k, e in enumerate(exits):
                    outer[e] = graph.call_function(operator.getitem, (call, k))
                    outer[e].meta = dict(example[e])
            continue
        if node.op == "call_module":
            setattr(root, node.target, gm.get_submodule(node.target))
        elif node.op == "get_attr":
            setattr(root, node.target, getattr(gm, node.target))
        outer[node] = graph.node_copy(node, lambda a: outer[a])
    collapsed = fx.GraphModule(root, graph)
    collapsed.graph.lint()
    return Segmented(gm=collapsed, block_submods=("region",),
                     needs_clone=(tuple(segmented.needs_clone[exit_block][e.args[1]]
                                        for e in exits),),
                     residual_inputs=(None,))
