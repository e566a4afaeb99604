"""Sequence (context) parallelism: diffusers' ``enable_parallelism`` under the backend.

Two pieces, one per side of tracing:

* ``prepare_parallel(model)``, before the first call: makes diffusers' context-parallel
  hooks traceable in one Dynamo graph (``optimize(pipe)`` calls it; call it yourself before
  ``torch.compile(model, backend="foresight")``);
* ``metric_reduction(...)``, at build time: the per-step sum of the reuse metrics over the
  group the blocks communicate over, so every rank decides the same mask.

Why ``prepare_parallel``: in diffusers 0.42, a ``ContextParallelSplitHook`` finds where its
input sits in the arguments lazily, with ``inspect.signature`` at the first call, which
Dynamo cannot trace. On Wan the split hook sits on ``blocks.0``, inside the model's loop
over blocks, and a graph break in a loop makes Dynamo skip the whole ``forward`` frame and
trace each block as a graph of its own: no graph holds the block stack, so the backend
falls back to plain Inductor. ``prepare_parallel`` resolves those argument positions now,
exactly as the hook would (``cached_parameter_indices``), and adds the hooks' one-time
warning (``logger.warning_once`` when an input has fewer dimensions than the plan expects,
e.g. Wan 2.1's 1-D timestep) to ``torch._dynamo.config.ignore_logging_functions``: that
logger's ``warning_once`` only, nothing else is silenced. Both are idempotent and do
nothing to a model without context-parallel hooks. Models whose planned inputs are all
keyword arguments (Flux, LTX) trace in one graph without it.

Without the call (``enable_parallelism`` then ``torch.compile(model, backend="foresight")``),
the backend does it at the model's first call: the first graph that would fall back looks
for a module with unprepared split hooks among the callers on the Python stack (the model's
``forward``, running eagerly because Dynamo skipped it), prepares it and clears Dynamo's
cache of that class's ``forward`` code only (``prepare_on_stack``), so the next call traces
the model whole. That first call runs without block reuse.
"""
from __future__ import annotations

import inspect
import sys
import weakref
from typing import Callable

import torch

from foresight_compile.lowering.segments import SegmentCompiler
from foresight_compile.passes.blocks import BlockStack
from foresight_compile.passes.collectives import group_names, group_sum_graph
from foresight_compile.runtime.policies.base import BAD, PolicyState, ReusePolicy


def _split_hooks(model: torch.nn.Module) -> list:
    try:
        from diffusers.hooks.context_parallel import ContextParallelSplitHook
    except ImportError:  # no diffusers, or one without context parallelism
        return []
    found = []
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hooks = getattr(registry, "hooks", None) or {}
        found += [h for h in hooks.values() if isinstance(h, ContextParallelSplitHook)]
    return found


def prepare_parallel(model: torch.nn.Module) -> int:
    """Make ``model``'s context-parallel hooks (``model.enable_parallelism(...)``) traceable
    in one graph; call it after ``enable_parallelism`` and before the compiled model's first
    call. Returns the number of split hooks prepared (0: nothing to do)."""
    model = getattr(model, "_orig_mod", model)
    hooks = _split_hooks(model)
    for hook in hooks:
        metadata = hook.module_forward_metadata
        if metadata is not None and metadata.cached_parameter_indices is None:
            # What ModuleForwardMetadata does at the first call (minus `self`).
            names = list(inspect.signature(metadata._cls.forward).parameters)[1:]
            metadata.cached_parameter_indices = {name: i for i, name in enumerate(names)}
    if hooks:
        from diffusers.hooks import context_parallel
        torch._dynamo.config.ignore_logging_functions.add(context_parallel.logger.warning_once)
    return len(hooks)


# Models prepared by the backend at their first call (their first call's graphs fall back).
_PREPARED_LATE: weakref.WeakSet = weakref.WeakSet()


def _unprepared(module: torch.nn.Module) -> bool:
    return any(h.module_forward_metadata is not None
               and h.module_forward_metadata.cached_parameter_indices is None
               for h in _split_hooks(module))


def prepare_on_stack() -> bool:
    """Called by the backend before a graph falls back: the outermost module among the
    callers (a frame's ``self``) with context-parallel split hooks not yet prepared is
    prepared (``prepare_parallel``), and Dynamo's cache of its class's own ``forward``
    code (the frame Dynamo skipped at the split hook's graph break) is cleared, so its next
    call is traced in one graph. True when a caller was prepared so (now or before)."""
    if "diffusers.hooks.context_parallel" not in sys.modules:  # no model was parallelized
        return False
    frames, frame = [], sys._getframe(1)
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    selves = []
    for frame in reversed(frames):  # outermost first
        module = frame.f_locals.get("self") if frame.f_code.co_varnames[:1] == ("self",) else None
        module = getattr(module, "_orig_mod", module)  # torch.compile's wrapper: its model
        if isinstance(module, torch.nn.Module) and all(module is not m for m in selves):
            selves.append(module)
    if any(m in _PREPARED_LATE for m in selves):
        return True
    for module in selves:
        if not (hasattr(module, "_diffusers_hook") or _split_hooks(module)) or not _unprepared(module):
            continue
        prepare_parallel(module)
        from torch._dynamo.eval_frame import reset_code
        for cls in type(module).__mro__:
            forward = cls.__dict__.get("forward")
            if cls.__module__.startswith("torch.") or getattr(forward, "__code__", None) is None:
                continue
            reset_code(forward.__code__)
        _PREPARED_LATE.add(module)
        return True
    return False


def metric_reduction(stack: BlockStack, compiler: SegmentCompiler,
                     policy: ReusePolicy) -> Callable[[PolicyState], None] | None:
    """The controller's ``reduce`` when the blocks communicate (sequence parallelism), else
    None: one all-reduce per step of the metric rows (and the latent probe's two sums when
    the policy reads them) over the blocks' own process groups (``passes/collectives.py``)."""
    groups = group_names(n for block in stack.blocks for n in block.nodes)
    if not groups or not policy.needs_cache:
        return None
    segment = compiler.segment(group_sum_graph(groups, BAD, policy.needs_latent_change),
                               static=True)
    if policy.needs_latent_change:
        return lambda state: segment(state.raw, state.sums, state.probe)
    return lambda state: segment(state.raw, state.sums)
