"""One call for a diffusers pipeline: ``optimize(pipe)`` / ``restore(pipe)``.

``optimize`` compiles ``pipe.transformer`` with the foresight backend and wires the
controller to the pipeline so that nothing is guessed:

* every ``pipe(...)`` call is one generation, of ``num_inference_steps`` steps (or
  ``len(timesteps)`` when explicit timesteps are passed), so a fractional warmup resolves
  at once and back-to-back generations never share caches; it is one request, so calls
  from several threads at once keep their own state;
* ``policy="profiling"`` without a ``profile`` calibrates on the first call: that generation
  runs uncached (its output is exact) while ``profile_blocks`` records the attention
  profile on this model and resolution; later calls run compiled with it
  (``calibrated_profile(pipe)``; save it with ``.save(path)`` for production);
* a transformer under diffusers' context parallelism (``enable_parallelism``, before or
  after ``optimize``) is prepared for tracing (``prepare_parallel``) before each call;
* where the pipeline names its CFG passes with diffusers' ``transformer.cache_context(name)``
  (Wan: "cond"/"uncond"), each name is its own branch; pipelines that batch CFG into one
  call (CogVideoX, Latte) need nothing: one call, one branch.

The pipeline object keeps its identity: its class is swapped for a subclass whose
``__call__`` opens the generation, and ``restore`` swaps everything back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any

import torch

from foresight_compile.api import branch, generation
from foresight_compile.errors import ForesightValueError
from foresight_compile.options import Options
from foresight_compile.parallel import prepare_parallel
from foresight_compile.passes.blocks import module_blocks
from foresight_compile.profiling import BlockProfile, profile_blocks

_STATE = "_foresight_optimized"


@dataclasses.dataclass
class _Optimized:
    original_class: type
    original_transformer: torch.nn.Module
    patched_cache_context: bool
    profile: Any = None  # policy "profiling": the BlockProfile calibrated on the first call


def optimize(pipe: Any, policy: str = "budget", **options: Any) -> Any:
    """Compile ``pipe.transformer`` with ``backend="foresight"`` and wire it to ``pipe``.

    ``options`` are the backend's (see ``Options``); they are validated here, so a typo
    raises ``ValueError`` before anything is compiled. Returns ``pipe``.
    """
    if getattr(pipe, _STATE, None) is not None:
        raise ForesightValueError("this pipeline is already optimized; call restore(pipe) first")
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, torch.nn.Module):
        raise ForesightValueError(
            f"optimize() needs a diffusers pipeline with a `transformer` module; "
            f"{type(pipe).__name__} has {type(transformer).__name__}")
    backend_options = {"policy": policy, **options}
    Options.from_dict(backend_options)
    if policy == "profiling" and options.get("profile") is None:
        if not module_blocks(transformer):
            raise ForesightValueError(f"{type(transformer).__name__} has no block stack to profile")
    prepare_parallel(transformer)
    patched = _wrap_cache_context(transformer)
    cls = type(pipe)
    default_steps = inspect.signature(cls.__call__).parameters.get("num_inference_steps")
    default_steps = None if default_steps is None else default_steps.default

    calibrate = policy == "profiling" and backend_options.get("profile") is None

    def __call__(self, *args, **kwargs):
        timesteps = kwargs.get("timesteps")
        steps = len(timesteps) if timesteps is not None else kwargs.get("num_inference_steps", default_steps)
        state: _Optimized = getattr(self, _STATE)
        prepare_parallel(transformer)  # a few attribute reads once prepared (per generation)
        with generation(num_steps=steps if isinstance(steps, int) else None):
            if calibrate and state.profile is None:
                # ProfilingDiT: the first generation runs uncached while the profile is taken
                # on this model at this resolution; later calls run compiled with it.
                result = []
                state.profile = profile_blocks(
                    transformer, lambda _: result.append(cls.__call__(self, *args, **kwargs)))
                self.transformer = torch.compile(transformer, backend="foresight",
                                                 options={**backend_options, "profile": state.profile})
                return result[0]
            return cls.__call__(self, *args, **kwargs)

    if not calibrate:
        pipe.transformer = torch.compile(transformer, backend="foresight", options=backend_options)
    pipe.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    setattr(pipe, _STATE, _Optimized(cls, transformer, patched))
    return pipe


def calibrated_profile(pipe: Any) -> BlockProfile | None:
    """The ``BlockProfile`` an ``optimize(pipe, policy="profiling")`` pipeline calibrated on
    its first call (None before that call, or when a profile was given)."""
    state: _Optimized | None = getattr(pipe, _STATE, None)
    if state is None:
        raise ForesightValueError("this pipeline was not optimized with foresight_compile.optimize")
    return state.profile


def restore(pipe: Any) -> Any:
    """Undo ``optimize``: the original transformer module, class and methods. Returns ``pipe``."""
    state: _Optimized | None = getattr(pipe, _STATE, None)
    if state is None:
        raise ForesightValueError("this pipeline was not optimized with foresight_compile.optimize")
    if state.patched_cache_context:
        del state.original_transformer.cache_context
    pipe.transformer = state.original_transformer
    pipe.__class__ = state.original_class
    delattr(pipe, _STATE)
    return pipe


def _wrap_cache_context(transformer: torch.nn.Module) -> bool:
    """Make ``transformer.cache_context(name)`` also name our branch. False if absent."""
    original = getattr(transformer, "cache_context", None)
    if original is None:
        return False

    @contextlib.contextmanager
    def cache_context(name: str, *args, **kwargs):
        with original(name, *args, **kwargs), branch(name):
            yield

    transformer.cache_context = cache_context  # instance attribute: restore() deletes it
    return True
