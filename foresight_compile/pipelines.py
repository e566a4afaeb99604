"""One call for a diffusers pipeline: ``optimize(pipe)`` / ``restore(pipe)``.

``optimize`` compiles every denoiser of the pipeline with the foresight backend (its
``transformer``, and each further diffusers transformer component named ``transformer_*``:
Wan 2.2's low-noise expert ``transformer_2``), each with its own controller and caches, and
wires them to the pipeline so that nothing is guessed:

* every ``pipe(...)`` call is one generation, of ``num_inference_steps`` steps (or
  ``len(timesteps)`` when explicit timesteps are passed), so a fractional warmup resolves
  at once and back-to-back generations never share caches; it is one request, so calls
  from several threads at once keep their own state;
* each denoiser's generation is the run of steps it serves: with two experts and the
  pipeline's ``boundary_ratio`` (Wan 2.2), the steps whose timestep lies at or above the
  boundary (``transformer``) or below it (``transformer_2``), read from the scheduler's
  timesteps at the first model call; without a boundary, the steps it was seen to run in
  the previous call with the same step count (else the pipeline's count). Warm-up, tail,
  ``max_run`` and the ``budget`` policy's first quarter apply per expert;
* ``policy="profiling"`` without a ``profile`` calibrates on the first call: that generation
  runs uncached (its output is exact) while ``profile_blocks`` records the attention
  profile of each denoiser on this model and resolution; later calls run compiled with it
  (``calibrated_profile(pipe)``; save it with ``.save(path)`` for production);
* a transformer under diffusers' context parallelism (``enable_parallelism``, before or
  after ``optimize``) is prepared for tracing (``prepare_parallel``) before each call;
* where the pipeline names its CFG passes with diffusers' ``transformer.cache_context(name)``
  (Wan: "cond"/"uncond"), each name is its own branch; pipelines that batch CFG into one
  call (CogVideoX, Latte) need nothing: one call, one branch.

The pipeline object keeps its identity: its class is swapped for a subclass whose
``__call__`` opens the generation, and ``restore`` swaps everything back.
``stats(pipe)`` reports per denoiser (``PipelineStats``: name -> ``Stats``).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import inspect
import re
import threading
from typing import Any, Callable

import torch

from foresight_compile.api import PIPELINE_STATE, branch, generation
from foresight_compile.errors import ForesightValueError
from foresight_compile.options import Options
from foresight_compile.parallel import prepare_parallel
from foresight_compile.passes.blocks import module_blocks
from foresight_compile.profiling import BlockProfile, profile_blocks
from foresight_compile.runtime.context import call_context, current_context

_STATE = PIPELINE_STATE
_DENOISER = re.compile(r"transformer(_\w+)?")
_LOCAL = threading.local()  # the pipeline call in flight in this thread (a _Run)


@dataclasses.dataclass
class _Optimized:
    original_class: type
    originals: dict[str, torch.nn.Module]  # denoiser name -> the module optimize() found
    patched_cache_context: list[str]
    compiled: dict[str, torch.nn.Module] = dataclasses.field(default_factory=dict)
    profiles: dict[str, BlockProfile] | None = None  # "profiling": calibrated on the first call
    # (denoiser, pipeline steps) -> steps per branch it ran in the last such call
    seen_steps: dict[tuple[str, int], int] = dataclasses.field(default_factory=dict)

    @property
    def denoisers(self) -> dict[str, torch.nn.Module]:
        """What ``stats(pipe)`` reports on: the compiled modules (the originals before)."""
        return {name: self.compiled.get(name, m) for name, m in self.originals.items()}


class _Run:
    """One pipeline call: the step count each denoiser's generation gets, and the calls
    each denoiser made per branch (learned for the next call without a boundary)."""

    def __init__(self, pipe: Any, state: _Optimized, steps: int | None) -> None:
        self.pipe, self.state, self.steps = pipe, state, steps
        self.split: dict[str, int] | None = None
        self.calls: collections.Counter = collections.Counter()

    def steps_of(self, name: str) -> int | None:
        if self.split is None:
            self.split = boundary_split(self.pipe, list(self.state.originals))
        if name in self.split:
            return self.split[name]
        if len(self.state.originals) > 1 and self.steps is not None:
            return self.state.seen_steps.get((name, self.steps), self.steps)
        return self.steps

    def learn(self) -> None:
        if self.steps is None or len(self.state.originals) < 2:
            return
        per_name: dict[str, int] = {}
        for (name, _), n in self.calls.items():
            per_name[name] = max(per_name.get(name, 0), n)
        for name, n in per_name.items():
            self.state.seen_steps[(name, self.steps)] = n


def boundary_split(pipe: Any, names: list[str]) -> dict[str, int]:
    """Wan 2.2's two experts: the steps at or above the boundary timestep
    (``boundary_ratio * num_train_timesteps``) go to ``transformer``, the rest to
    ``transformer_2``; read from the scheduler's timesteps (set before the first model
    call). Empty when the pipeline has no boundary."""
    config = getattr(pipe, "config", None) or {}
    ratio = config.get("boundary_ratio") if hasattr(config, "get") else None
    scheduler = getattr(pipe, "scheduler", None)
    timesteps = getattr(scheduler, "timesteps", None)
    if ratio is None or timesteps is None or not {"transformer", "transformer_2"} <= set(names):
        return {}
    boundary = ratio * scheduler.config.num_train_timesteps
    timesteps = torch.as_tensor(timesteps)[getattr(scheduler, "begin_index", None) or 0:]
    high = int((timesteps >= boundary).sum())
    return {"transformer": high, "transformer_2": len(timesteps) - high}


def find_denoisers(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's transformers called per denoising step: ``transformer`` and the
    diffusers models named ``transformer_*`` (``transformer_2``), in that order."""
    components = getattr(pipe, "components", None)
    if not isinstance(components, dict):
        components = {"transformer": getattr(pipe, "transformer", None)}
    try:
        from diffusers import ModelMixin
    except ImportError:  # pragma: no cover - the pipelines are diffusers'
        ModelMixin = torch.nn.Module
    found = {}
    for name in sorted(components, key=lambda n: (n != "transformer", n)):
        module = components[name]
        if not _DENOISER.fullmatch(name) or not isinstance(module, torch.nn.Module):
            continue
        if name == "transformer" or (isinstance(module, ModelMixin) and module_blocks(module)):
            found[name] = module
    return found


def optimize(pipe: Any, policy: str = "budget", **options: Any) -> Any:
    """Compile every denoiser of ``pipe`` (``transformer``, ``transformer_2``, ...) with
    ``backend="foresight"`` and wire them to ``pipe``.

    ``options`` are the backend's (see ``Options``); they are validated here, so a typo
    raises ``ValueError`` before anything is compiled. Returns ``pipe``.
    """
    if getattr(pipe, _STATE, None) is not None:
        raise ForesightValueError("this pipeline is already optimized; call restore(pipe) first")
    originals = find_denoisers(pipe)
    if not originals:
        raise ForesightValueError(
            f"optimize() needs a diffusers pipeline with a `transformer` module; "
            f"{type(pipe).__name__} has {type(getattr(pipe, 'transformer', None)).__name__}")
    backend_options = {"policy": policy, **options}
    Options.from_dict(backend_options)
    calibrate = policy == "profiling" and options.get("profile") is None
    if calibrate:
        for name, module in originals.items():
            if not module_blocks(module):
                raise ForesightValueError(f"{type(module).__name__} has no block stack to profile")
    for module in originals.values():
        prepare_parallel(module)
    patched = [name for name, module in originals.items() if _wrap_cache_context(module)]
    cls = type(pipe)
    default_steps = inspect.signature(cls.__call__).parameters.get("num_inference_steps")
    default_steps = None if default_steps is None else default_steps.default

    def compile_all(self, profiles: dict[str, BlockProfile] | None) -> None:
        for name, module in originals.items():
            extra = {} if profiles is None else {"profile": profiles[name]}
            compiled = torch.compile(module, backend="foresight", options={**backend_options, **extra})
            # Instance attribute: a frame of this denoiser's own, in its generation's steps.
            compiled.forward = _per_denoiser(name, compiled.dynamo_ctx(_own_frame(module)))
            state.compiled[name] = compiled
            setattr(self, name, compiled)

    def __call__(self, *args, **kwargs):
        timesteps = kwargs.get("timesteps")
        steps = len(timesteps) if timesteps is not None else kwargs.get("num_inference_steps", default_steps)
        steps = steps if isinstance(steps, int) else None
        for module in originals.values():
            prepare_parallel(module)  # a few attribute reads once prepared (per generation)
        run = _Run(self, state, steps)
        with generation(num_steps=steps), _running(run):
            if calibrate and state.profiles is None:
                # ProfilingDiT: the first generation runs uncached while the profile is taken
                # on each denoiser at this resolution; later calls run compiled with it.
                result = []
                call = lambda: result.append(cls.__call__(self, *args, **kwargs))  # noqa: E731
                profiles = {}
                for name, module in reversed(originals.items()):
                    call = _profiling(profiles, name, module, call)
                call()
                state.profiles = profiles
                compile_all(self, profiles)
                return result[0]
            result = cls.__call__(self, *args, **kwargs)
        run.learn()
        return result

    state = _Optimized(cls, originals, patched)
    if not calibrate:
        compile_all(pipe, None)
    pipe.__class__ = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})
    setattr(pipe, _STATE, state)
    return pipe


def _profiling(profiles: dict, name: str, module: torch.nn.Module, inner: Callable) -> Callable:
    def call():
        profiles[name] = profile_blocks(module, lambda _: inner())
    return call


@contextlib.contextmanager
def _running(run: _Run):
    previous = getattr(_LOCAL, "run", None)
    _LOCAL.run = run
    try:
        yield
    finally:
        _LOCAL.run = previous


def _own_frame(module: torch.nn.Module) -> Callable:
    """``module.__call__`` through a function whose code object is this module's alone.

    Dynamo keeps compiled graphs per code object and guards a module's parameters as
    inputs, not by identity: two experts of one class (Wan 2.2) compiled apart would share
    one graph, hence one program and one controller, through ``Module.__call__``'s code.
    A fresh code object gives each denoiser its own graph, program and caches."""
    def call(*args, **kwargs):
        return module(*args, **kwargs)
    call.__code__ = call.__code__.replace()  # a new code object (same bytecode)
    return call


def _per_denoiser(name: str, forward: Callable) -> Callable:
    """The compiled module's forward, called in the step count of this denoiser's
    generation within the pipeline call in flight (outside one: as is)."""
    def forward_in_its_generation(*args, **kwargs):
        run = getattr(_LOCAL, "run", None)
        if run is None:
            return forward(*args, **kwargs)
        context = current_context()
        run.calls[(name, context.branch if context is not None else None)] += 1
        with call_context(num_steps=run.steps_of(name)):
            return forward(*args, **kwargs)
    return forward_in_its_generation


def calibrated_profile(pipe: Any, denoiser: str = "transformer") -> BlockProfile | None:
    """The ``BlockProfile`` an ``optimize(pipe, policy="profiling")`` pipeline calibrated on
    its first call for ``denoiser`` (None before that call, or when a profile was given)."""
    state: _Optimized | None = getattr(pipe, _STATE, None)
    if state is None:
        raise ForesightValueError("this pipeline was not optimized with foresight_compile.optimize")
    return None if state.profiles is None else state.profiles.get(denoiser)


def restore(pipe: Any) -> Any:
    """Undo ``optimize``: every original denoiser module, the class and methods. Returns
    ``pipe``."""
    state: _Optimized | None = getattr(pipe, _STATE, None)
    if state is None:
        raise ForesightValueError("this pipeline was not optimized with foresight_compile.optimize")
    for name in state.patched_cache_context:
        del state.originals[name].cache_context
    for name, module in state.originals.items():
        setattr(pipe, name, module)
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
