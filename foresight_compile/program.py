"""ForesightProgram: what the backend returns to Dynamo for one graph, and the registry
that lets ``stats(model)`` / ``reset(model)`` find the programs of a model.

Reading top to bottom, a program is the pipeline of docs/DESIGN.md section 2: analyses
(``find_blocks``, ``find_timestep_input``), the policy and its controller (with the metric
reduction over the blocks' process group under sequence parallelism), the partition,
the lowering (segment plan, graph form or CUDA graphs) and the executor that runs it.

Never worse than Inductor: when a segment fails to compile or to run for the first time
after the backend returned (``SegmentCompileError``, at any call), or the program's first
call fails in any way, the program switches that graph to plain Inductor
(``plain_inductor``), returns its output for the call, warns once
(``ForesightFallbackWarning``) and ``stats()`` reports it not accelerated with the cause.
``strict=True`` raises the cause instead. After a first call that succeeded, an error that
is not a segment's compile or first run (the model's own code, its inputs) propagates, as
does a ``ForesightValueError`` at any call (an input we name as wrong).
"""
from __future__ import annotations

import collections
import threading
import time
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from foresight_compile.errors import (ForesightFallbackWarning, ForesightValueError,
                                      SegmentCompileError, describe, surfaced)
from foresight_compile.lowering.graph_form import lower_graph_form
from foresight_compile.lowering.plan import (build_plan, cached_values, plan_layout,
                                             planned_bytes)
from foresight_compile.lowering.segments import (SegmentCompiler, is_symbolic, meta_value,
                                                 plain_inductor)
from foresight_compile.options import CACHE_DTYPES, ORDERS, Options
from foresight_compile.parallel import metric_reduction
from foresight_compile.passes.blocks import BlockStack, find_blocks
from foresight_compile.passes.inputs import find_input, find_latent_input, find_timestep_input
from foresight_compile.passes.partition import Segmented, partition_blocks
from foresight_compile.runtime.cache_history import HistoryLayout
from foresight_compile.runtime.controller import ReuseController
from foresight_compile.runtime.executor import Executor, SegmentExecutor
from foresight_compile.runtime.frames import FrameGroup
from foresight_compile.runtime.graph_executor import GraphFormExecutor
from foresight_compile.runtime.policies.registry import get_policy

_PROGRAMS: list[weakref.ref] = []
# Graphs the backend could not cache (they run plain Inductor): the newest ones, whose.
_FALLBACKS: collections.deque = collections.deque(maxlen=1024)


class Fallback:
    """A graph of some model that runs without block reuse, and the reason (the warning's)."""

    def __init__(self, example_inputs: Sequence, reason: str, policy: str) -> None:
        self.reason = reason
        self.policy = policy
        self._param_refs = [weakref.ref(v) for v in example_inputs
                            if isinstance(v, torch.nn.Parameter)]

    def owns_any(self, param_ids: set[int]) -> bool:
        return any((p := r()) is not None and id(p) in param_ids for r in self._param_refs)


def record_fallback(example_inputs: Sequence, reason: str, policy: str) -> None:
    _FALLBACKS.append(Fallback(example_inputs, reason, policy))


def fall_back(example_inputs: Sequence, reason: str, options: Options) -> None:
    """Record that a graph runs without block reuse (``stats()`` reports the reason) and
    warn once, naming the reason."""
    record_fallback(example_inputs, reason, options.policy)
    warnings.warn(f"foresight: {reason.rstrip('.')}. The model runs without block reuse (plain "
                  f"{'Inductor' if options.lowering != 'eager' else 'eager'}).",
                  ForesightFallbackWarning, stacklevel=3)


def failure_reason(error: BaseException, stage: str) -> str:
    """The reason a failed block program gives (the warning's, ``stats()``'s): a segment's
    compile or first run and its cause, or ``stage`` (what failed) and the error."""
    if isinstance(error, SegmentCompileError) and error.__cause__ is not None:
        return f"{str(error).split(':', 1)[0]}: {describe(error.__cause__)}"
    return f"{stage} failed: {describe(error)}"


def fallbacks_of(model: torch.nn.Module) -> list[Fallback]:
    """The graphs of ``model`` that fell back, oldest first."""
    ids = {id(p) for p in getattr(model, "_orig_mod", model).parameters()}
    return [f for f in list(_FALLBACKS) if f.owns_any(ids)]


class ForesightProgram:
    """Callable Dynamo runs in place of the graph.

    ``capture`` (lowering "cudagraphs" only): the capture factory of the CUDA-graph
    executor; ``runtime.cudagraphs.EagerCapture`` runs its plan on any device (tests)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence, options: Options,
                 capture: Callable | None = None) -> None:
        start = time.perf_counter()
        self.options = options
        # Kept for the fallback: the whole graph, run by plain Inductor if our segments fail.
        self.gm = gm
        self.fallback: Callable | None = None
        self._fallback_lock = threading.Lock()
        self._called = False
        self.stack: BlockStack = find_blocks(gm)
        timestep_index = find_timestep_input(gm, example_inputs)
        signature_indices = [i for i, v in enumerate(example_inputs)
                             if not isinstance(v, torch.nn.Parameter)]
        # Weak references, not ids: a freed model's ids are reused by new objects, and a
        # program must never be taken for another model's.
        self._param_refs = [weakref.ref(v) for v in example_inputs
                            if isinstance(v, torch.nn.Parameter)]
        policy = get_policy(options.policy)(options)
        profile = getattr(policy, "profile", None)
        if profile is not None:
            hidden = find_input(gm, example_inputs, "hidden_states")
            profile.check([b.path for b in self.stack.blocks],
                          tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None)
        self.frame_id = _frame_id()
        # Symbolic sizes (dynamic shapes, an unspecialised float's .item(), a data-dependent
        # op such as nonzero under capture_dynamic_output_shape_ops): compile every segment
        # now, once, in Dynamo's shape environment, instead of per concrete size at its
        # first call (where the symbols would have no environment to live in).
        self.compiler = SegmentCompiler(
            "inductor" if options.lowering == "cudagraphs" else options.lowering,
            symbolic=options.lowering == "inductor"
            and is_symbolic(meta_value(n) for n in gm.graph.nodes))
        # Sequence parallelism: the blocks' collectives name the group every rank must agree
        # over; the metrics are summed over it each step (None on one device).
        reduce = metric_reduction(self.stack, self.compiler, policy)
        self._latent_index = find_latent_input(gm, example_inputs)
        segmented = partition_blocks(gm, self.stack)
        # What every branch caches: the region exit alone for a policy that serves whole
        # steps, every block otherwise; the bytes are known now, before any allocation.
        self.layout = plan_layout(segmented, policy.step_level, options.forecast_order + 1,
                                  options.max_cache_bytes, options.cache_dtype)
        probe = example_inputs[self._latent_index] if policy.needs_latent_change else None
        self.planned_bytes = planned_bytes(
            cached_values(segmented, self.layout), self.layout.slots, probe,
            None if options.cache_dtype is None else getattr(torch, options.cache_dtype))
        if policy.needs_cache:
            check_ceiling(options, segmented, self.layout, probe)
        self.controller = ReuseController(self.layout, policy, timestep_index,
                                          signature_indices, lookahead=options.lookahead,
                                          group=self._frame_group(), reduce=reduce)
        self.executor = self._executor(segmented, example_inputs, capture)
        self.build_seconds = time.perf_counter() - start
        _PROGRAMS.append(weakref.ref(self))

    def _executor(self, segmented: Segmented, example_inputs: Sequence,
                  capture: Callable | None) -> Executor:
        options, controller = self.options, self.controller
        if options.form == "graph":
            if options.lowering == "cudagraphs":
                raise surfaced(ForesightValueError(
                    "option 'lowering'='cudagraphs' needs form='segments' (it captures the "
                    "segments of the host-branch form), got form='graph'"))
            fn, specs = lower_graph_form(segmented, example_inputs, options.lowering, self.layout)
            return GraphFormExecutor(fn, controller, specs)
        policy = controller.policy
        plan = build_plan(segmented, self.compiler, self.layout if policy.needs_cache else None,
                          policy.caches_residual, keep_finite=options.lookahead == 2,
                          probe_input=self._latent_index if policy.needs_latent_change else None)
        if options.lowering != "cudagraphs":
            return SegmentExecutor(plan, controller)
        from foresight_compile.runtime.cudagraphs import (CudaCapture, CudaGraphExecutor,
                                                          cudagraphs_unavailable)
        if capture is None:
            reason = cudagraphs_unavailable(example_inputs)
            if reason is not None:
                # Surfaced: Dynamo would otherwise wrap it in BackendCompilerFailed, hiding
                # the ValueError from a caller's except clause.
                raise surfaced(ForesightValueError(
                    f"option 'lowering'='cudagraphs' needs CUDA: {reason} (or use lowering="
                    f"'inductor' or 'eager')"))
            capture = CudaCapture
        return CudaGraphExecutor(plan, controller, example_inputs, capture=capture)

    def _frame_group(self) -> FrameGroup:
        """The group of this model's other compiles of the same frame (or a new one)."""
        ids = {id(p) for r in self._param_refs if (p := r()) is not None}
        for other in live_programs():
            if (other is not self and self.frame_id is not None
                    and other.frame_id == self.frame_id and other.owns_any(ids)):
                return other.controller.group
        return FrameGroup()

    def owns_any(self, param_ids: set[int]) -> bool:
        """True when a parameter this program was compiled with is still alive and in
        ``param_ids``."""
        return any((p := r()) is not None and id(p) in param_ids for r in self._param_refs)

    @property
    def block_paths(self) -> list[str]:
        return [b.path for b in self.stack.blocks]

    @property
    def compile_seconds(self) -> float:
        return self.build_seconds + self.compiler.compile_seconds

    def __call__(self, *args: Any):
        if self.fallback is not None:
            return self.fallback(*args)
        try:
            outputs = self.executor.evaluate(args)
        except SegmentCompileError as e:  # at any call: our segment, never the model
            return self._fall_back(e, args)
        except ForesightValueError:  # the caller's input named (an empty timestep, a ceiling)
            raise
        except Exception as e:
            if self._called:  # the model's own code or inputs, after a first call that ran
                raise
            return self._fall_back(e, args)
        self._called = True
        return outputs

    def _fall_back(self, error: Exception, args: tuple):
        """Switch this graph to plain Inductor and return its output for ``args``; raise
        ``error``'s cause under ``strict``, or when plain Inductor fails too (then the
        failure is not ours: plain Inductor's error propagates)."""
        if self.options.strict:
            raise error.__cause__ if isinstance(error, SegmentCompileError) else error
        with self._fallback_lock:
            if self.fallback is None:
                eager = self.options.lowering == "eager"
                fn = self.gm.forward if eager else plain_inductor(self.gm, self.compiler.symbolic)
                outputs = fn(*args)
                self.fallback = fn
                fall_back([p for r in self._param_refs if (p := r()) is not None],
                          failure_reason(error, "the block program's first call"), self.options)
                return outputs
        return self.fallback(*args)


def check_ceiling(options: Options, segmented: Segmented, layout: HistoryLayout,
                  probe: Any) -> None:
    """Raise ``ForesightValueError`` when one branch's planned cache exceeds the
    ``max_cache_bytes`` ceiling: the bytes needed, the ceiling, and the option values that
    fit (at the traced input sizes; nothing is allocated yet)."""
    limit = options.max_cache_bytes
    values = cached_values(segmented, layout)

    def size(slots: int, dtype: str | None) -> int | None:
        return planned_bytes(values, slots, probe, None if dtype is None else getattr(torch, dtype))
    needed = size(layout.slots, options.cache_dtype)
    if limit is None or needed is None or needed <= limit:
        return
    fits = [f"order={order}, cache_dtype={dtype!r} ({b} bytes)" for order in ORDERS
            for dtype in (None, *CACHE_DTYPES)
            if (b := size(order + 1, dtype)) is not None and b <= limit]
    raise surfaced(ForesightValueError(
        f"option 'max_cache_bytes'={limit}: policy {options.policy!r} needs {needed} bytes of "
        f"cache per branch at these input sizes ({len(layout.cached_blocks)} cached block(s) x "
        f"{layout.slots} slot(s){' + the latent probe' if probe is not None else ''}); "
        + (f"settings that fit: {'; '.join(fits)}" if fits else
           "no order or cache_dtype fits: raise the ceiling, or use policy='none'")))


def _frame_id() -> int | None:
    """Dynamo's id of the frame being compiled (recompiles of a frame share it)."""
    compile_id = torch._guards.CompileContext.current_compile_id()
    return None if compile_id is None else compile_id.frame_id


def live_programs() -> list[ForesightProgram]:
    found = []
    for ref in list(_PROGRAMS):
        program = ref()
        if program is None:
            _PROGRAMS.remove(ref)
        elif program.fallback is None:  # a program that fell back runs plain Inductor
            found.append(program)
    return found


def programs_of(model: torch.nn.Module) -> list[ForesightProgram]:
    """Live programs compiled from ``model`` (or the OptimizedModule wrapping it)."""
    model = getattr(model, "_orig_mod", model)
    ids = {id(p) for p in model.parameters()}
    return [p for p in live_programs() if p.owns_any(ids)]
