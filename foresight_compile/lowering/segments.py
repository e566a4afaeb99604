"""Lowering of graph segments: eager, or Inductor with one compile per distinct segment.

Blocks of one stack have the same graph up to names (their parameters are inputs, not
constants), so a block's compiled code serves every block whose graph and input
metadata (shapes, strides, dtypes) match: a 24-block stack costs one block compile.

Static shapes: compiles happen lazily at a segment's first call, with that call's real
tensors, keyed by their concrete metadata (under a lock: concurrent requests may reach a
segment's first call together). Dynamic shapes (Dynamo passed symbolic inputs:
``dynamic=True``, ``mark_dynamic``, or an automatic-dynamic recompile): every segment is
compiled once, eagerly, inside the backend call, from its placeholders' fake example
values (symbolic sizes of Dynamo's ShapeEnv), keyed by graph structure and *symbolic*
metadata, and never unbound: the code serves every size Dynamo's guards admit, and the
guards Inductor adds while compiling land in Dynamo's ShapeEnv, so Dynamo installs them
(a size the code cannot serve recompiles the frame, visibly, instead of running wrong).

A failure to compile a segment, or of a segment's first run after it was bound to code,
raises ``SegmentCompileError`` (the cause chained): the program falls back to plain
Inductor for the graph (``plain_inductor``) instead of failing where Inductor works.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

import torch
import torch.fx as fx

from foresight_compile.errors import SegmentCompileError, describe, dynamo_control

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


def meta_value(node: fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def _backend_fake(value: Any) -> Any:
    """``value`` (a fake of Dynamo's tracing FakeTensorMode) as a fake of the backend's.

    Dynamo hands the backend a fresh FakeTensorMode over the same ShapeEnv
    (``TracingContext.fake_mode``); node metas belong to the tracing one. AOTAutograd would
    re-fake them with ``from_tensor``, which drops ``item_memo``: the ``.item()`` Dynamo
    emits for an unspecialized float (a norm's ``eps``, a 0-d float64 graph input under
    ``dynamic=True``) would then yield a fresh unbacked SymFloat and ``layer_norm(eps=...)``
    fails (GuardOnDataDependentSymNode). Converting here keeps the backed SymFloat."""
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(value, torch.SymInt):
        return _canonical_symint(value)
    if not isinstance(value, FakeTensor):
        return value
    context = torch._guards.TracingContext.try_get()
    mode = context.fake_mode if context is not None else None
    if mode is None or value.fake_mode is mode:
        return value
    fake = mode.from_tensor(value)
    if value.item_memo is not None and fake.item_memo is None:
        fake.item_memo = value.item_memo
    return fake


def _canonical_symint(value: torch.SymInt) -> torch.SymInt:
    """A size placeholder whose symbol the shape environment replaced by another (Krea2
    under ``dynamic=True``: ``s39 -> s1``) as a SymInt of that other symbol.

    The split hands a segment the first placeholder whose (replaced) expression is a
    symbol as that symbol's binding; Inductor binds a placeholder by its raw expression
    (``s39``) and aliases only symbols replaced *by* it, so ``s1`` stays unbound and a
    tensor of size ``s1 + s50`` fails codegen ("expected [s1] to have been codegen-ed").
    The two are equal (Dynamo guards the replacement): passing ``s1`` binds it."""
    node = value.node
    raw, expr = getattr(node, "_expr", None), node.expr
    if (raw is None or raw == expr or not getattr(expr, "is_Symbol", False)
            or node.shape_env is None):
        return value
    return node.shape_env.create_symintnode(expr, hint=node.hint)


def example_args(gm: fx.GraphModule) -> list:
    """A segment's fake example inputs: its placeholders' example values (the split copies
    them from Dynamo's graph, and adds a SymInt placeholder for every size symbol a
    cross-segment tensor needs; the cache wrappers set theirs)."""
    values = [meta_value(p) for p in gm.graph.find_nodes(op="placeholder")]
    missing = [p.name for p, v in zip(gm.graph.find_nodes(op="placeholder"), values) if v is None]
    if missing:
        raise RuntimeError(f"segment inputs {missing} have no example value to compile from")
    return [_backend_fake(v) for v in values]


def contiguous_fake(like: Any, shape, dtype: torch.dtype) -> Any:
    """A contiguous fake tensor in ``like``'s fake mode and device (None without one)."""
    mode = getattr(like, "fake_mode", None)
    if mode is None:
        return None
    with mode:
        return torch.empty(tuple(shape), dtype=dtype, device=like.device)


def _strided(args) -> tuple[int, ...]:
    """Indices of the tensor arguments that are not contiguous (views into larger tensors)."""
    return tuple(i for i, a in enumerate(args)
                 if isinstance(a, torch.Tensor) and not a.is_contiguous())


def _contiguous_args(args, indices: tuple[int, ...]) -> tuple:
    return tuple(a.contiguous() if i in indices else a for i, a in enumerate(args))


def _contiguous_at(fn: Callable, indices: tuple[int, ...]) -> Callable:
    """``fn`` with its inputs at ``indices`` made contiguous first (a no-op for an input
    that is: a served cache buffer; a copy of a computed view)."""
    def run(*args):
        args = list(args)
        for i in indices:
            if isinstance(args[i], torch.Tensor):
                args[i] = args[i].contiguous()
        return fn(*args)
    return run


def is_symbolic(values) -> bool:
    """True when some value is a SymInt/SymFloat or a tensor of symbolic size."""
    for v in values:
        if isinstance(v, (torch.SymInt, torch.SymFloat)):
            return True
        if isinstance(v, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in v.shape):
            return True
    return False


def _symbolic_args_key(args) -> tuple:
    """Like ``_args_key``, with sizes and strides as symbolic expressions."""
    key = []
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((tuple(map(str, a.shape)), tuple(map(str, a.stride())), a.dtype,
                        a.device, a.requires_grad))
        elif isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            key.append((type(a).__name__, str(a.node.expr)))
        else:
            key.append((type(a).__name__, a))
    return tuple(key)


def _args_key(args: tuple) -> tuple:
    return tuple((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad)
                 if isinstance(a, torch.Tensor) else (type(a).__name__, a) for a in args)


class SegmentCompiler:
    """Hands out callables for segments; shares compiled code between equal segments.

    ``symbolic``: compile each segment at once from its fake example values (call it within
    the backend call, where Dynamo's TracingContext is current); Inductor lowering only."""

    def __init__(self, lowering: str, symbolic: bool = False) -> None:
        self.lowering = lowering
        self.symbolic = symbolic and lowering == "inductor"
        self._compiled: dict[tuple, Callable] = {}
        self._lock = threading.Lock()
        self.compile_seconds = 0.0
        self.compiles = 0

    def segment(self, gm: fx.GraphModule, static: bool = False) -> "Segment":
        """``static``: the graph's inputs have one fixed size (e.g. metric rows) and no
        example values; it compiles at its first call, whatever the model's shapes."""
        if not self.symbolic or static:
            return Segment(self, gm, graph_key(gm) if self.lowering == "inductor" else ())
        args = example_args(gm)
        # A strided example (a view into a larger tensor: HunyuanVideo's single-stream
        # blocks read the video tokens out of the [video; text] sequence) is compiled as
        # contiguous, and made contiguous at each call: the same input also arrives as a
        # contiguous cache buffer when its producer was served, and code compiled for the
        # view's strides would index that buffer out of bounds (the symbolic code is bound
        # once, for every call, and trusts its inputs' layout).
        strided = _strided(args)
        args = [contiguous_fake(a, a.shape, a.dtype) if i in strided else a
                for i, a in enumerate(args)]
        segment = Segment(self, gm, graph_key(gm), symbolic=True)
        fn = self.compiled((segment.graph_key, _symbolic_args_key(args)), gm, args)
        segment.fn = fn if not strided else _contiguous_at(fn, strided)
        return segment

    def compiled(self, key: tuple, gm: fx.GraphModule, args) -> Callable:
        fn = self._compiled.get(key)
        if fn is not None:
            return fn
        with self._lock:
            fn = self._compiled.get(key)
            if fn is None:
                start = time.perf_counter()
                try:
                    compiled = self.compile(gm, args)
                except Exception as e:
                    if dynamo_control(e):
                        raise
                    raise SegmentCompileError(
                        f"compiling a segment failed: {describe(e)}") from e
                self.compile_seconds += time.perf_counter() - start
                self.compiles += 1
                fn = self._compiled[key] = compiled
                log.debug("compiled a segment (%d distinct so far)", self.compiles)
        return fn

    def compile(self, gm: fx.GraphModule, args) -> Callable:
        """Inductor's code for ``gm`` at ``args`` (the one place a segment is compiled)."""
        from torch._inductor.compile_fx import compile_fx

        # The segment is only ever called with inputs of the metadata in its key (shapes,
        # strides, dtypes), so Inductor's per-input asserts are redundant.
        return compile_fx(gm, list(args), config_patches=_TRUSTED_INPUTS)


def plain_inductor(gm: fx.GraphModule, symbolic: bool = False) -> Callable:
    """``gm`` whole, compiled by plain Inductor at call time (the fallback of a program
    whose segments failed after the backend returned, when no shape environment is left):
    with real inputs, once per distinct input metadata, each exact; a ``symbolic`` graph
    (dynamic shapes: its ``.item()`` of unspecialised floats needs Dynamo) through
    ``torch.compile`` (Dynamo, then Inductor), which guards and recompiles as it does for
    any model."""
    if symbolic:
        return torch.compile(gm, backend="inductor")
    from torch._inductor.compile_fx import compile_fx

    compiled: dict[tuple, Callable] = {}
    lock = threading.Lock()

    def run(*args):
        key = _args_key(args)
        fn = compiled.get(key)
        if fn is None:
            with lock:
                fn = compiled.get(key)
                if fn is None:
                    fn = compiled[key] = compile_fx(gm, list(args))
        return fn(*args)
    return run


class Segment:
    """A callable segment; under Inductor it binds compiled code at its first call (static
    shapes) or at construction (symbolic shapes: bound for good). Either way an input that
    was a strided view when the code was bound is made contiguous at every call."""

    __slots__ = ("_compiler", "gm", "graph_key", "fn", "symbolic")

    def __init__(self, compiler: SegmentCompiler, gm: fx.GraphModule, key: tuple,
                 symbolic: bool = False) -> None:
        self._compiler = compiler
        self.gm = gm
        self.graph_key = key
        self.symbolic = symbolic
        self.fn: Callable | None = gm.forward if compiler.lowering == "eager" else None

    def unbind(self) -> None:
        """Input shapes changed: look up (or compile) code for the new ones at the next call.
        Symbolic code serves every size Dynamo's guards admit: it stays."""
        if self._compiler.lowering != "eager" and not self.symbolic:
            self.fn = None

    def __call__(self, *args):
        fn = self.fn
        if fn is not None:
            return fn(*args)
        # As for symbolic code (SegmentCompiler.segment): an input that arrives as a strided
        # view when computed and as a contiguous cache buffer when served binds contiguous code.
        strided = _strided(args)
        bound = _contiguous_args(args, strided)
        fn = self._compiler.compiled((self.graph_key, _args_key(bound)), self.gm, bound)
        fn = self.fn = fn if not strided else _contiguous_at(fn, strided)
        try:
            return fn(*args)
        except Exception as e:  # the first run of freshly bound code: ours, not the model's
            self.fn = None
            raise SegmentCompileError(f"the first run of a compiled segment failed: "
                                      f"{describe(e)}") from e
