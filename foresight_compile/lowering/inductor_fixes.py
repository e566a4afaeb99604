"""Narrow workarounds for Inductor bugs that the graph form (torch.cond per block) hits.

torch 2.13: when a ``cond`` operand is a buffer Inductor may lay out freely (Wan's patch
embedding output, ``flatten(2).transpose(1, 2).contiguous()``), the branch subgraphs are
compiled for the operand's traced strides while the operand is materialised with other
strides, and the branch fails at run time: ``AssertionError: expected size 512==512,
stride 1==24 at dim=1``. The fix requires each tensor operand to have exactly its traced
strides before ``Conditional.create`` lowers the branches. It is applied only while the
graph form is being compiled, and only on the torch releases known to need it.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

AFFECTED_TORCH = ("2.13.",)


def needs_cond_stride_fix() -> bool:
    return torch.__version__.startswith(AFFECTED_TORCH)


@contextlib.contextmanager
def exact_cond_operand_strides(enabled: bool | None = None) -> Iterator[None]:
    """Within the block, Inductor lowers ``cond`` with operands at their traced strides."""
    if not (needs_cond_stride_fix() if enabled is None else enabled):
        yield
        return
    from torch._inductor import ir
    from torch._inductor.virtualized import V
    from torch.fx import Node

    original = ir.Conditional.__dict__["create"]

    def create(cls, predicate, true_fn, false_fn, operands):
        fx_operands = V.graph.current_node.args[-1]
        fixed = []
        for operand, fx_operand in zip(operands, fx_operands):
            fake = fx_operand.meta.get("val") if isinstance(fx_operand, Node) else None
            if isinstance(fake, torch.Tensor) and isinstance(operand, ir.TensorBox):
                operand = ir.ExternKernel.require_exact_strides(
                    operand, fake.stride(), allow_padding=False)
            fixed.append(operand)
        return original.__func__(cls, predicate, true_fn, false_fn, fixed)

    ir.Conditional.create = classmethod(create)
    try:
        yield
    finally:
        ir.Conditional.create = original
