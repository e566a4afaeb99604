"""Partition: cut a graph into prologue | block_0 | glue | block_1 | ... | epilogue.

Assumes ``stack`` came from ``find_blocks(gm)`` on this very graph, so that each block is
a contiguous run of nodes and partition ids rise monotonically in node order (which is
what ``split_module_simple`` needs).

Guarantees: the returned ``Segmented.gm`` computes the same outputs as ``gm`` from the same
placeholders; each block is one ``call_module`` of a submodule that returns a tuple of the
block's outputs in ``Block.outputs`` order; every other segment is a submodule too. ``gm``
itself is not modified (Dynamo reads its metadata after the backend returns).
"""
from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
from torch.fx.passes.split_module import split_module, split_module_simple

from foresight_compile.passes.blocks import BlockStack


@dataclasses.dataclass(frozen=True)
class Segmented:
    gm: fx.GraphModule
    block_submods: tuple[str, ...]  # submodule name of block l
    # Per block, per output: the served cache must be cloned (it escapes to the graph
    # output or is mutated in place downstream).
    needs_clone: tuple[tuple[bool, ...], ...]
    # Per block: for each output, the position (among the block segment's arguments) of
    # the carried input of the same shape and dtype, so a residual ``out - in`` can be
    # cached and served as ``in + residual``; None when some output has no such input.
    residual_inputs: tuple[tuple[int, ...] | None, ...] = ()


def _is_inplace(node: fx.Node) -> bool:
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        if node.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
            return True
        name = getattr(node.target, "__name__", "")
    else:
        return False
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def partition_blocks(gm: fx.GraphModule, stack: BlockStack) -> Segmented:
    block_of = stack.block_of()
    node_to_partition: dict[fx.Node, int] = {}
    current = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if node in block_of:
            current = 2 * block_of[node] + 1
        elif current % 2 == 1:
            current += 1  # first glue node after a block
        node_to_partition[node] = current
    # split_module_simple returns a bare value for one-output partitions: make every
    # segment return a tuple so the executor treats all segments alike.
    if any(n.op == "get_attr" for n in gm.graph.nodes):
        # split_module_simple takes no get_attr nodes; Dynamo emits them for the subgraphs
        # of higher-order ops (flex_attention's score_mod/mask_mod in AnyFlow-FAR, cond,
        # ...). split_module copies each into the partitions that read it.
        split = split_module(gm, gm, lambda n: node_to_partition[n], keep_original_order=True,
                             keep_original_node_name=True, partition_affix="fc")
    else:
        split = split_module_simple(gm, node_to_partition, partition_affix="fc")
    for node in list(split.graph.find_nodes(op="call_module")):
        _force_tuple_output(split, node.target)
    block_submods = tuple(f"submod_fc_{2 * b.index + 1}" for b in stack.blocks)
    output_node = next(iter(gm.graph.find_nodes(op="output")))
    returned = set(output_node.all_input_nodes)
    needs_clone, residual_inputs = [], []
    for b, name in zip(stack.blocks, block_submods):
        sub_out = next(iter(getattr(split, name).graph.find_nodes(op="output"))).args[0]
        flags = []
        for o in sub_out:
            original = _original_of(o, b.outputs)
            # An output we cannot trace back is cloned: serving a copy is always safe.
            flags.append(original is None or original in returned
                         or any(_is_inplace(u) for u in original.users))
        needs_clone.append(tuple(flags))
        residual_inputs.append(_residual_pairs(getattr(split, name), b, sub_out))
    split.graph.lint()
    split.recompile()
    return Segmented(gm=split, block_submods=block_submods, needs_clone=tuple(needs_clone),
                     residual_inputs=tuple(residual_inputs))


def _meta_value(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _residual_pairs(sub: fx.GraphModule, block, sub_out) -> tuple[int, ...] | None:
    """Pair each block output with an unused carried input of identical shape and dtype."""
    placeholders = list(sub.graph.find_nodes(op="placeholder"))
    position = {p.name: i for i, p in enumerate(placeholders)}
    free = [c for c in block.carried if c.name in position]
    pairs = []
    for o in sub_out:
        value = _meta_value(o)
        match = next((c for c in free if isinstance(value, torch.Tensor)
                      and isinstance(_meta_value(c), torch.Tensor)
                      and _meta_value(c).shape == value.shape
                      and _meta_value(c).dtype == value.dtype), None)
        if match is None:
            return None
        free.remove(match)
        pairs.append(position[match.name])
    return tuple(pairs)


def _original_of(copied: fx.Node, outputs: tuple[fx.Node, ...]) -> fx.Node | None:
    """The original block output a split-submodule output node was copied from.

    The copy may be renamed, but ``node_copy`` shares the meta values, so the traced
    example value identifies it."""
    value = copied.meta.get("example_value", copied.meta.get("val"))
    for o in outputs:
        if value is not None and o.meta.get("example_value", o.meta.get("val")) is value:
            return o
    for o in outputs:
        if o.name == copied.name:
            return o
    return None


def _force_tuple_output(split: fx.GraphModule, name: str) -> None:
    sub: fx.GraphModule = getattr(split, name)
    out = next(iter(sub.graph.find_nodes(op="output")))
    if isinstance(out.args[0], (tuple, list)):
        return
    out.args = ((out.args[0],),)
    sub.recompile()
    (call,) = split.graph.find_nodes(op="call_module", target=name)
    with split.graph.inserting_after(call):
        item = split.graph.call_function(operator.getitem, (call, 0))
    call.replace_all_uses_with(item, delete_user_cb=lambda u: u is not item)
