"""Lowering of the graph form for the torch executor: one graph, a ``cond`` per cached
unit (every block, or the whole block region when only its exit is cached).

``lower_graph_form(segmented, example_inputs, lowering, layout)`` builds the in-place graph
form (``insert_cache_branches(..., in_place=True)``; for an exit-only ``layout`` on the
region collapsed by ``passes/region.py``), lowers it whole (Inductor, with the ``cond``
stride workaround of ``inductor_fixes``; or eager), and returns it with each block's cache
specs from the traced output shapes (empty for blocks that hold no cache). The lowered
function takes ``(*args, reuse_mask [L], *caches of the cached blocks, *their metric
rows)``. Raises ``BlockDiscoveryError`` for dynamic shapes, which the graph form cannot
hold.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from foresight_compile.errors import BlockDiscoveryError
from foresight_compile.lowering.inductor_fixes import exact_cond_operand_strides
from foresight_compile.passes.cache_branch import insert_cache_branches
from foresight_compile.passes.change_metric import STATS_COLUMNS
from foresight_compile.passes.partition import Segmented
from foresight_compile.passes.region import collapse_region
from foresight_compile.runtime.cache_history import HistoryLayout

CacheSpecs = tuple[tuple[tuple[tuple[int, ...], torch.dtype], ...], ...]


def block_cache_specs(segmented: Segmented) -> CacheSpecs:
    """Per block, ``(shape, dtype)`` of each output, from the traced example values."""
    specs = []
    for name in segmented.block_submods:
        out = next(iter(segmented.gm.get_submodule(name).graph.find_nodes(op="output"))).args[0]
        block = []
        for node in out:
            value = node.meta.get("example_value", node.meta.get("val"))
            if not isinstance(value, torch.Tensor) or any(
                    not isinstance(d, int) for d in value.shape):
                raise BlockDiscoveryError(
                    f"form='graph' needs static shapes, but an output of {name} has shape "
                    f"{getattr(value, 'shape', None)}; use form='segments' for dynamic shapes")
            block.append((tuple(value.shape), value.dtype))
        specs.append(tuple(block))
    return tuple(specs)


def graph_form_units(segmented: Segmented, layout: HistoryLayout) -> tuple[Segmented, tuple[int, ...]]:
    """The segmented graph the ``cond``s are built on, and the block each ``cond`` stands
    for: every block, or (exit-only layout) the collapsed region standing for the exit."""
    if layout.exit_only_region:
        (exit_block,) = layout.cached_blocks
        return collapse_region(segmented, exit_block), (exit_block,)
    return segmented, tuple(range(len(segmented.block_submods)))


def lower_graph_form(segmented: Segmented, example_inputs: Sequence, lowering: str,
                     layout: HistoryLayout) -> tuple[Callable, CacheSpecs]:
    form, units = graph_form_units(segmented, layout)
    unit_specs = dict(zip(units, block_cache_specs(form)))
    specs = tuple(unit_specs.get(l, ()) for l in range(len(segmented.block_submods)))
    graph_gm = insert_cache_branches(form, in_place=True, units=units)
    if lowering != "inductor":
        return graph_gm.forward, specs
    from torch._inductor.compile_fx import compile_fx

    device = next(t.device for t in example_inputs if isinstance(t, torch.Tensor))
    caches = [torch.zeros(shape, dtype=dtype, device=device) for block in specs
              for shape, dtype in block]
    # metric rows, as PolicyState lays them out (16 floats a block, the first written)
    storage = torch.zeros(len(specs), 16, device=device)
    rows = [storage[l, :STATS_COLUMNS] for l in units]
    mask = torch.zeros(len(specs), dtype=torch.bool, device=device)
    with exact_cond_operand_strides():
        fn = compile_fx(graph_gm, [*example_inputs, mask, *caches, *rows])
    return fn, specs
