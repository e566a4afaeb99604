"""Collectives of a block stack, and the per-step sum of the reuse metrics over their groups.

Under sequence (context) parallelism (diffusers' ``enable_parallelism``: Ulysses all-to-all,
ring attention), every rank runs the blocks on its own shard of the tokens and the blocks
exchange activations through ``torch.distributed`` functional collectives, which Dynamo
records in the graph as ``_c10d_functional`` ops naming their process group
(``all_to_all_single(x, splits, splits, "<group name>")``).

``group_names(nodes)`` reads those names from the blocks' own nodes: the groups the model
was parallelized over, and only those (data-parallel replicas, which exchange nothing inside
a block, are never coupled).

``group_sum_graph(groups, bad_column, probe)`` is the graph ``(raw, sums[, probe]) -> ()``
that sums a branch's metric rows over those groups in one collective per group: ``raw``
(float32 [L, 5], this rank's sums) is packed with ``probe`` (float32 [2], summed in place)
into one tensor, all-reduced (SUM) with ``_c10d_functional.all_reduce``, and written into
``sums``; the ``bad_column`` total is capped at 1 (a flag: "some rank saw a non-finite
value"). The rows are sums (squares, counts), so their totals are the metrics of the whole
sequence, whatever the shard sizes. Compiled like any segment, it is one small kernel
around the collective.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.fx as fx


def _group_argument(target) -> int | None:
    """Position of the ``group_name`` argument in an op's schema, or None."""
    overload = getattr(target, "default", target)  # an OpOverloadPacket names its overloads
    schema = getattr(overload, "_schema", None)
    if schema is None:
        return None
    for i, argument in enumerate(schema.arguments):
        if argument.name == "group_name":
            return i
    return None


def group_names(nodes: Iterable[fx.Node]) -> tuple[str, ...]:
    """Names of the process groups the collectives among ``nodes`` communicate over, in
    order of first use (empty: no collective, one device)."""
    found: dict[str, None] = {}
    for n in nodes:
        if n.op != "call_function":
            continue
        position = _group_argument(n.target)
        if position is None:
            continue
        name = n.kwargs.get("group_name", n.args[position] if position < len(n.args) else None)
        if isinstance(name, str):
            found.setdefault(name)
    return tuple(found)


def sum_over_groups(raw: torch.Tensor, sums: torch.Tensor, probe: torch.Tensor | None,
                    groups: tuple[str, ...], bad_column: int) -> None:
    """See the module docstring (the body of ``group_sum_graph``)."""
    n = raw.numel()
    packed = raw.reshape(n) if probe is None else torch.cat([raw.reshape(n), probe])
    for group in groups:  # ring x ulysses: the sum over each group in turn
        packed = torch.ops._c10d_functional.wait_tensor(
            torch.ops._c10d_functional.all_reduce(packed, "sum", group))
    sums.copy_(packed[:n].view(raw.shape))
    sums[:, bad_column].clamp_(max=1.0)
    if probe is not None:
        probe.copy_(packed[n:])


def group_sum_graph(groups: tuple[str, ...], bad_column: int, probe: bool) -> fx.GraphModule:
    """``(raw, sums[, probe]) -> ()`` (see the module docstring)."""
    graph = fx.Graph()
    raw, sums = graph.placeholder("raw"), graph.placeholder("sums")
    latent = graph.placeholder("probe") if probe else None
    graph.call_function(sum_over_groups, (raw, sums, latent, tuple(groups), bad_column))
    graph.output(())
    return fx.GraphModule(torch.nn.Module(), graph)
