"""Change metric: a block wrapper that also returns how far its outputs moved from the cache.

``with_change_metric(block_gm, n_outputs)`` returns a module taking ``(*block_args, *caches)``
and returning ``(*outputs, stats)`` with ``stats = [mse, finite]`` in float32: the mean
squared difference over all output elements (computed in float32, so fp16 never overflows
to inf) and 1.0 when every output element is finite. Inductor fuses the reduction with
the block's last kernels; the cache itself is not written here (the executor copies).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx


def change_stats(outputs: tuple[torch.Tensor, ...], caches: tuple[torch.Tensor, ...]) -> torch.Tensor:
    squared = torch.stack([(o.float() - c.float()).square().sum() for o, c in zip(outputs, caches)]).sum()
    count = sum(o.numel() for o in outputs)
    finite = torch.stack([torch.isfinite(o).all() for o in outputs]).all()
    return torch.stack([squared / count, finite.to(torch.float32)])


def with_change_metric(block: fx.GraphModule, n_outputs: int,
                       residual_inputs: tuple[int, ...] | None = None) -> fx.GraphModule:
    """With ``residual_inputs`` (per output, the argument it is a residual of), the cache
    holds residuals ``out - in``: the result is ``(*outputs, *residuals, stats)`` and the
    metric compares residuals with the cache."""
    n_inputs = len(block.graph.find_nodes(op="placeholder"))
    graph = fx.Graph()
    inputs = [graph.placeholder(f"arg{i}") for i in range(n_inputs)]
    caches = [graph.placeholder(f"cache{i}") for i in range(n_outputs)]
    root = torch.nn.Module()
    root.block = block
    result = graph.call_module("block", tuple(inputs))
    outputs = [graph.call_function(operator.getitem, (result, i)) for i in range(n_outputs)]
    if residual_inputs is None:
        stats = graph.call_function(change_stats, (tuple(outputs), tuple(caches)))
        graph.output((*outputs, stats))
    else:
        residuals = [graph.call_function(operator.sub, (o, inputs[i]))
                     for o, i in zip(outputs, residual_inputs)]
        stats = graph.call_function(change_stats, (tuple(residuals), tuple(caches)))
        graph.output((*outputs, *residuals, stats))
    return fx.GraphModule(root, graph)
