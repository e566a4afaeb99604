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
"""
from __future__ import annotations

import inspect
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
