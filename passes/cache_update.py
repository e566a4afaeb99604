"""Cache update and serve graphs: the two sides of a block's conditional cache branch in
the host-branch form, as graphs that the lowering compiles like any segment.

``with_cache_update(block, n)`` returns a graph ``(*block_args, *caches, row) -> outputs``
that computes the block, measures how far its outputs (or residuals) moved from the cache
(``change_stats``: ``[mse, finite]`` in float32), and writes that into ``row`` and the new
values into ``caches``, all in place. Compiled, the metric and the cache write are fused
into the block's own kernels: no extra kernel, no allocation, no host work per step.

``serve_graph(...)`` returns a graph ``(*block_args, *caches) -> outputs`` for a reused
block: ``in + residual`` in residual mode, a copy of the cache where the served value
escapes or is mutated downstream; None when the cache tensors can be served as they are.

Assumes ``block`` is a block segment of ``partition_blocks`` (returns a tuple). Guarantees
that the update's outputs equal the block's, and that with ``keep_finite`` a non-finite
output leaves the cache as it was (the previous, finite value), which is what lets a
decision made two steps ahead (``lookahead=2``) never serve a non-finite value.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch
import torch.fx as fx

from foresight_compile.passes.change_metric import change_stats


def _placeholders(graph: fx.Graph, prefix: str, n: int) -> list[fx.Node]:
    return [graph.placeholder(f"{prefix}{i}") for i in range(n)]


def _kept_if_finite(value: torch.Tensor, cache: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    return torch.where(finite, value, cache)


def with_cache_update(block: fx.GraphModule, n_outputs: int,
                      residual_inputs: tuple[int, ...] | None = None,
                      keep_finite: bool = False) -> fx.GraphModule:
    """See the module docstring. With ``residual_inputs`` (per output, the argument it is a
    residual of) the cache holds residuals ``out - in`` and the metric compares those."""
    n_inputs = len(block.graph.find_nodes(op="placeholder"))
    graph = fx.Graph()
    inputs = _placeholders(graph, "arg", n_inputs)
    caches = _placeholders(graph, "cache", n_outputs)
    row = graph.placeholder("row")
    root = torch.nn.Module()
    root.block = block
    result = graph.call_module("block", tuple(inputs))
    outputs = [graph.call_function(operator.getitem, (result, i)) for i in range(n_outputs)]
    values = outputs if residual_inputs is None else [
        graph.call_function(operator.sub, (o, inputs[i])) for o, i in zip(outputs, residual_inputs)]
    stats = graph.call_function(change_stats, (tuple(values), tuple(caches)))
    if keep_finite:
        finite = graph.call_function(operator.getitem, (stats, 1))
        ok = graph.call_function(operator.gt, (finite, 0.5))
        values = [graph.call_function(_kept_if_finite, (v, c, ok)) for v, c in zip(values, caches)]
    for value, cache in zip(values, caches):
        graph.call_method("copy_", (cache, value))
    graph.call_method("copy_", (row, stats))
    graph.output(tuple(outputs))
    return fx.GraphModule(root, graph)


def serve_graph(n_inputs: int, n_outputs: int, residual_inputs: tuple[int, ...] | None,
                copy: Sequence[bool]) -> fx.GraphModule | None:
    """The reuse side (see the module docstring); ``copy[k]``: output k must be a fresh
    tensor (it escapes to the graph output or is mutated in place downstream)."""
    if residual_inputs is None and not any(copy):
        return None
    graph = fx.Graph()
    inputs = _placeholders(graph, "arg", n_inputs)
    caches = _placeholders(graph, "cache", n_outputs)
    if residual_inputs is not None:
        # Cache first: the sum takes the cache's layout, which is the block output's (the
        # input's may differ: a permuted view), and that is what the next segment expects.
        served = [graph.call_function(operator.add, (c, inputs[i]))
                  for i, c in zip(residual_inputs, caches)]
    else:
        served = [graph.call_method("clone", (c,)) if fresh else c for c, fresh in zip(caches, copy)]
    graph.output(tuple(served))
    return fx.GraphModule(torch.nn.Module(), graph)
