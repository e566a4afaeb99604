"""Cache update and serve graphs: the two sides of a block's conditional cache branch in
the host-branch form, as graphs that the lowering compiles like any segment.

A block's cache holds, per block output, ``slots`` values of the cached quantity (the
output, or the residual ``out - in``), newest first: 1 for a copy, ``k + 1`` for a forecast
of order ``k`` (the slot contract: ``runtime/cache_history.py``).

``with_cache_update(block, n, ...)`` returns a graph ``(*block_args, *history, [weights,]
row) -> outputs`` that computes the block and, in place: measures the new values against
the newest cached ones and against the forecast ``sum_j weights[j] * history[j]`` it
would have served (``change_stats`` into ``row``), then writes the new values over the
oldest slot, which becomes the newest (the host rotates the slots' order: no value moves).
Compiled, all of it fuses into the block's own kernels: no extra kernel, no allocation,
no host work per step. (Shifting the history in the graph, ``h1.copy_(h0); h0.copy_(v)``,
is miscompiled by Inductor in torch 2.13: ``h1`` receives the new value;
``tests/test_forecast.py`` reproduces it.)

``serve_graph(...)`` returns a graph ``(*block_args, *history, [weights]) -> outputs`` for a
reused block: the forecast (or the newest value), plus the input in residual mode, or a copy
where the served value escapes or is mutated downstream; None when the newest cached
tensors can be served as they are.

``history`` is slot-major and in age order, newest first: ``h[0][0..n-1], h[1][0..n-1], ...``. Assumes ``block`` is a block
segment of ``partition_blocks`` (returns a tuple). Guarantees that the update's outputs
equal the block's, and that with ``keep_finite`` a non-finite output leaves the history as
it was, which is what lets a decision made two steps ahead (``lookahead=2``) never serve a
non-finite value.
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


def _term(value: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # A slot past the generation's values has weight 0 and may hold anything an earlier
    # generation left in it (an inf: 0 * inf is nan): it must add exactly 0.
    return torch.where(weight != 0, value * weight, 0)


def forecast(history: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """``sum_j weights[j] * history[j]``, newest first (the newest value's layout); a slot
    of weight 0 adds 0 whatever it holds. Where a weighted older value is not finite (a
    non-finite compute earlier in the generation), the element is the newest value instead:
    the controller serves a block only when its newest value is finite, so a forecast is
    never made non-finite by an older one."""
    out = _term(history[0], weights[0])
    usable = None
    for j in range(1, len(history)):
        out = out + _term(history[j], weights[j])
        ok = torch.isfinite(history[j]) | (weights[j] == 0)
        usable = ok if usable is None else usable & ok
    return out if usable is None else torch.where(usable, out, history[0])


SCALED = ("float8_e4m3fn",)  # storage dtypes kept with a per-tensor scale
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def stored_per_value(storage: str | None) -> int:
    """Tensors a history slot keeps per cached value: the value, and its scale when the
    storage dtype is scaled."""
    return 2 if storage in SCALED else 1


def quantize_fp8(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q * scale ~ value``: a per-tensor scale that maps the largest
    magnitude to float8_e4m3fn's largest finite value (a zero tensor keeps scale 1)."""
    amax = value.detach().abs().amax().float()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (value.float() / scale).to(torch.float8_e4m3fn), scale


def dequantize(stored: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return stored.to(dtype)
    return (stored.float() * scale).to(dtype)


def _dtype_of(value: torch.Tensor) -> torch.dtype:
    return value.dtype


def _history(graph: fx.Graph, n_outputs: int, slots: int,
             storage: str | None = None) -> list[list[fx.Node]]:
    """Placeholders ``[slot][output]`` (then, for a scaled storage, ``[slot][n + output]``:
    the scales)."""
    per = n_outputs * stored_per_value(storage)
    return [_placeholders(graph, f"h{j}_", per) for j in range(slots)]


def _loaded(graph: fx.Graph, slot: list[fx.Node], n_outputs: int, storage: str | None,
            dtypes: Sequence) -> list[fx.Node]:
    """The values of one history slot in the cached values' dtypes (``dtypes[k]``: a dtype or
    a node whose dtype to take); the slot's tensors as they are without a storage dtype."""
    if storage is None:
        return list(slot[:n_outputs])
    scales = slot[n_outputs:] if storage in SCALED else [None] * n_outputs
    out = []
    for k in range(n_outputs):
        dtype = dtypes[k]
        if isinstance(dtype, fx.Node):
            dtype = graph.call_function(_dtype_of, (dtype,))
        out.append(graph.call_function(dequantize, (slot[k], scales[k], dtype)))
    return out


def _write(graph: fx.Graph, slot: list[fx.Node], values: Sequence[fx.Node],
           storage: str | None) -> None:
    """Write ``values`` into one history slot, in its storage dtype (``copy_`` casts)."""
    n = len(values)
    for k, value in enumerate(values):
        if storage in SCALED:
            q = graph.call_function(quantize_fp8, (value,))
            graph.call_method("copy_", (slot[k], graph.call_function(operator.getitem, (q, 0))))
            graph.call_method("copy_", (slot[n + k], graph.call_function(operator.getitem, (q, 1))))
        else:
            graph.call_method("copy_", (slot[k], value))


def store_graph(n_outputs: int, slots: int, storage: str | None = None) -> fx.GraphModule:
    """``(*values, *history) -> ()``: ``values`` written into every history slot (a block's
    first compute for new input shapes: every slot then holds a value of this generation's
    first step, the newest of which the weights select)."""
    graph = fx.Graph()
    values = _placeholders(graph, "value", n_outputs)
    for slot in _history(graph, n_outputs, slots, storage):
        _write(graph, slot, values, storage)
    graph.output(())
    return fx.GraphModule(torch.nn.Module(), graph)


def with_cache_update(block: fx.GraphModule, n_outputs: int,
                      residual_inputs: tuple[int, ...] | None = None,
                      keep_finite: bool = False, slots: int = 1,
                      storage: str | None = None) -> fx.GraphModule:
    """See the module docstring. With ``residual_inputs`` (per output, the argument it is a
    residual of) the cache holds residuals ``out - in`` and the metric compares those.
    ``storage``: the history's dtype name when it is not the values' (``Options.cache_dtype``;
    the metric and the forecast read it back in the values' dtype)."""
    n_inputs = len(block.graph.find_nodes(op="placeholder"))
    graph = fx.Graph()
    inputs = _placeholders(graph, "arg", n_inputs)
    stored = _history(graph, n_outputs, slots, storage)
    weights = graph.placeholder("weights") if slots > 1 else None
    row = graph.placeholder("row")
    root = torch.nn.Module()
    root.block = block
    result = graph.call_module("block", tuple(inputs))
    outputs = [graph.call_function(operator.getitem, (result, i)) for i in range(n_outputs)]
    values = outputs if residual_inputs is None else [
        graph.call_function(operator.sub, (o, inputs[i])) for o, i in zip(outputs, residual_inputs)]
    history = [_loaded(graph, slot, n_outputs, storage, values) for slot in stored]
    newest = history[0]
    forecasts = newest if weights is None else [
        graph.call_function(forecast, (tuple(h[k] for h in history), weights))
        for k in range(n_outputs)]
    stats = graph.call_function(change_stats, (tuple(values), tuple(newest), tuple(forecasts)))
    if keep_finite:
        # Not finite: the newest finite value is written again, so the history holds only
        # finite values (a forecast then extrapolates flat from it).
        ok = graph.call_function(operator.lt, (graph.call_function(operator.getitem, (stats, 2)), 0.5))
        values = [graph.call_function(_kept_if_finite, (v, old, ok)) for v, old in zip(values, newest)]
    _write(graph, stored[-1], values, storage)  # over the oldest slot
    graph.call_method("copy_", (row, stats))
    graph.output(tuple(outputs))
    return fx.GraphModule(root, graph)


def serve_graph(n_inputs: int, n_outputs: int, residual_inputs: tuple[int, ...] | None,
                copy: Sequence[bool], slots: int = 1, storage: str | None = None,
                dtypes: Sequence[torch.dtype] = ()) -> fx.GraphModule | None:
    """The reuse side (see the module docstring); ``copy[k]``: output k must be a fresh
    tensor (it escapes to the graph output or is mutated in place downstream).
    ``storage``, ``dtypes``: the history's dtype name (None: the values' own) and the
    cached values' dtypes, which the served values are read back in."""
    if residual_inputs is None and not any(copy) and slots == 1 and storage is None:
        return None
    graph = fx.Graph()
    inputs = _placeholders(graph, "arg", n_inputs)
    history = [_loaded(graph, slot, n_outputs, storage, dtypes)
               for slot in _history(graph, n_outputs, slots, storage)]
    if slots > 1:
        weights = graph.placeholder("weights")
        served = [graph.call_function(forecast, (tuple(h[k] for h in history), weights))
                  for k in range(n_outputs)]
    else:
        served = list(history[0])
    if residual_inputs is not None:
        # The served value first: the sum takes its layout (the block output's, as the
        # cache buffers have it); the input's may differ (a permuted view), and the next
        # segment was compiled for the output's.
        served = [graph.call_function(operator.add, (s, inputs[i]))
                  for i, s in zip(residual_inputs, served)]
    elif slots == 1 and storage is None:
        served = [graph.call_method("clone", (s,)) if fresh else s for s, fresh in zip(served, copy)]
    graph.output(tuple(served))
    return fx.GraphModule(torch.nn.Module(), graph)
