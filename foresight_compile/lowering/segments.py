"""Lowering of graph segments: eager, or Inductor with one compile per distinct segment.

Blocks of one stack have the same graph up to names (their parameters are inputs, not
constants), so a block's compiled code serves every block whose graph and input
metadata (shapes, strides, dtypes) match: a 24-block stack costs one block compile.
Compiles happen lazily at a segment's first call, with that call's real tensors.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
import torch.fx as fx

log = logging.getLogger(__name__)


_TRUSTED_INPUTS = {"size_asserts": False, "alignment_asserts": False}


def _freeze(value: Any, index: dict[fx.Node, int]) -> Any:
    """A hashable, name-free rendering of a node argument."""
    if isinstance(value, fx.Node):
        return ("node", index[value])
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_freeze(v, index) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _freeze(v, index)) for k, v in value.items()))
    if isinstance(value, slice):
        return ("slice", _freeze(value.start, index), _freeze(value.stop, index),
                _freeze(value.step, index))
    try:
        hash(value)
    except TypeError:
        return ("repr", repr(value))
    return (type(value).__name__, value)


def graph_key(gm: fx.GraphModule) -> tuple:
    """Structure of ``gm``'s graph with node names erased; equal keys compute alike."""
    index: dict[fx.Node, int] = {}
    parts = []
    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        if node.op == "call_module":
            target = ("module", graph_key(gm.get_submodule(node.target)))
        elif node.op in ("placeholder", "output"):
            target = node.op
        else:
            target = node.target if node.op == "call_function" else str(node.target)
        parts.append((node.op, target, _freeze(node.args, index), _freeze(node.kwargs, index)))
    return tuple(parts)


def _args_key(args: tuple) -> tuple:
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad)
                 if isinstance(a, torch.Tensor) else (type(a).__name__, a) for a in args)


class SegmentCompiler:
    """Hands out callables for segments; shares compiled code between equal segments."""

    def __init__(self, lowering: str) -> None:
        self.lowering = lowering
        self._compiled: dict[tuple, Callable] = {}
        self.compile_seconds = 0.0
        self.compiles = 0

    def segment(self, gm: fx.GraphModule) -> "Segment":
        return Segment(self, gm, graph_key(gm) if self.lowering == "inductor" else ())

    def compiled(self, key: tuple, gm: fx.GraphModule, args: tuple) -> Callable:
        fn = self._compiled.get(key)
        if fn is None:
            from torch._inductor.compile_fx import compile_fx
            start = time.perf_counter()
            # The segment is only ever called with inputs of the metadata in ``key``
            # (shapes, strides, dtypes), so Inductor's per-input asserts are redundant.
            compiled = compile_fx(gm, list(args), config_patches=_TRUSTED_INPUTS)
            self.compile_seconds += time.perf_counter() - start
            self.compiles += 1
            fn = self._compiled[key] = compiled
            log.debug("compiled a segment (%d distinct so far)", self.compiles)
        return fn


class Segment:
    """A callable segment; under Inductor it binds compiled code at its first call."""

    __slots__ = ("_compiler", "gm", "_graph_key", "fn")

    def __init__(self, compiler: SegmentCompiler, gm: fx.GraphModule, key: tuple) -> None:
        self._compiler = compiler
        self.gm = gm
        self._graph_key = key
        self.fn: Callable | None = gm.forward if compiler.lowering == "eager" else None

    def unbind(self) -> None:
        """Input shapes changed: look up (or compile) code for the new ones at the next call."""
        if self._compiler.lowering != "eager":
            self.fn = None

    def __call__(self, *args):
        if self.fn is None:
            self.fn = self._compiler.compiled((self._graph_key, _args_key(args)), self.gm, args)
        return self.fn(*args)
