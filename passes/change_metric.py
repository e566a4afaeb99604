"""Change metric: how far a block's new values moved from its cache, and from the forecast
the cache would have served.

``change_stats(values, caches, forecasts)`` returns float32 ``[5]`` sums over every element
of every value (computed in float32, so fp16 never overflows to inf): ``SQ`` (squared change
against the newest cached value), ``COUNT`` (elements), ``BAD`` (1.0 when an element is not
finite), ``FSQ`` (squared error of the forecast) and ``NSQ`` (squared norm of the values).
Sums, not means, so ranks holding shards of one sequence can add theirs up; the controller
derives the MSE, the finite flag and the relative forecast error from them
(``runtime/policies/base.py``).

``with_change_metric(block_gm, n_outputs)`` is the functional graph form's compute side: a
module taking ``(*block_args, *caches)`` and returning ``(*outputs, stats)``; the cache is
not written here (the graph returns the new values as explicit state).
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx


STATS_COLUMNS = 5  # SQ, COUNT, BAD, FSQ, NSQ (runtime/policies/base.py: RAW)


def total(x: torch.Tensor) -> torch.Tensor:
    """The sum of a float32 tensor's elements, as a float32 scalar: per row (the last,
    static dimension: a block's channels) in float32, then over the rows in float64.

    One float32 sum over every element would make Inductor's CPU code choose its chunked
    accumulator by the element count, ``numel > 4096``: under dynamic shapes that is a
    guard on the input size, and a size on the other side of it recompiles. The float64
    sum over rows needs no such choice (and loses less precision)."""
    if x.dim() == 0:
        return x
    return x.sum(dim=-1).sum(dtype=torch.float64).float()


def change_stats(values: tuple[torch.Tensor, ...], caches: tuple[torch.Tensor, ...],
                 forecasts: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    forecasts = caches if forecasts is None else forecasts
    sq = torch.stack([total((v.float() - c.float()).square()) for v, c in zip(values, caches)]).sum()
    fsq = torch.stack([total((v.float() - f.float()).square())
                       for v, f in zip(values, forecasts)]).sum()
    nsq = torch.stack([total(v.float().square()) for v in values]).sum()
    # A tensor plus the element count: stays symbolic under dynamic shapes.
    count = sq.new_zeros(()) + sum(v.numel() for v in values)
    bad = torch.stack([~torch.isfinite(v).all() for v in values]).any().to(torch.float32)
    return torch.stack([sq, count, bad, fsq, nsq])


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


def _latent_change(latent: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    x, p = latent.float(), previous.float()
    return torch.stack([total((x - p).square()), total(p.square())])


def latent_change_graph() -> fx.GraphModule:
    """``(latent, previous, aux) -> ()``: writes ``[sum (latent - previous)^2, sum
    previous^2]`` into ``aux[:2]`` and copies ``latent`` into ``previous``, in place (one
    fused kernel once compiled). The relative change of the model's input between two
    steps is a signal of how fast the sample still moves."""
    graph = fx.Graph()
    latent, previous, aux = (graph.placeholder(n) for n in ("latent", "previous", "aux"))
    change = graph.call_function(_latent_change, (latent, previous))
    target = graph.call_function(operator.getitem, (aux, slice(0, 2)))
    graph.call_method("copy_", (target, change))
    graph.call_method("copy_", (previous, latent))
    graph.output(())
    return fx.GraphModule(torch.nn.Module(), graph)
