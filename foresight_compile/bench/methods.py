"""The methods a benchmark compares: the baselines, ours, and the peers a user would pick.

Each ``MethodSpec.prepare(model)`` returns a ``Prepared`` holding its own copy of the model
(same weights), the callable the denoising loop calls, and how to start a new generation.
Peers go through their public APIs: diffusers' ``enable_cache`` configs (calls run inside
``cache_context("cond")``, which they require) and cache-dit's ``enable_cache`` (DBCache,
its transformer-only flow) when it is installed.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import re
from typing import Any, Callable

import torch

from foresight_compile.errors import ForesightValueError
from foresight_compile.passes.blocks import module_block_stacks

OURS = ("none", "budget", "static", "foresight")
PEERS = ("fbc", "pab", "taylorseer", "magcache", "cache-dit")
BASELINES = ("inductor", "eager")


@dataclasses.dataclass
class Prepared:
    call: Callable[..., Any]
    new_generation: Callable[[], None]
    stats_target: Any = None  # for ours: what foresight_compile.stats() accepts


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    kind: str  # inductor | eager | none | static | foresight | fbc | pab | taylorseer | magcache | cache-dit
    options: tuple[tuple[str, Any], ...] = ()
    compiled: bool = False  # peers: also wrapped in torch.compile

    @property
    def family(self) -> str:
        return "baseline" if self.kind in BASELINES else "ours" if self.kind in _ours() else "peer"

    @property
    def name(self) -> str:
        base = self.kind + ("+compile" if self.compiled else "")
        if self.options:
            base += "(" + ",".join(f"{k}={v}" for k, v in self.options) + ")"
        return base

    def prepare(self, model: torch.nn.Module, steps: int, calibrate: Callable | None = None) -> Prepared:
        model = copy.deepcopy(model)
        if self.kind == "eager":
            return Prepared(model, lambda: None)
        if self.kind == "inductor":
            return Prepared(torch.compile(model, backend="inductor"), lambda: None)
        if self.family == "ours":
            import foresight_compile
            opts = {"policy": self.kind, **dict(self.options)}
            if self.kind == "profiling" and "profile" not in opts:
                if calibrate is None:
                    raise ForesightValueError("profiling needs a profile or a calibration run")
                # ProfilingDiT's calibration generation, on this model at this resolution
                opts["profile"] = foresight_compile.profile_blocks(model, calibrate)
            fn = torch.compile(model, backend="foresight", options=opts)
            return Prepared(fn, lambda: foresight_compile.reset(fn, clear_stats=True), fn)
        if self.kind == "cache-dit":
            return _cache_dit(model, dict(self.options), steps, self.compiled)
        return _diffusers_peer(self.kind, model, dict(self.options), steps, self.compiled, calibrate)


# Each peer's own knobs, swept by ``--sweep-peers``: the settings a user would try, from the
# conservative end to past the point where quality breaks (so the peer's front is measured,
# not guessed from one point).
PEER_SWEEPS: dict[str, tuple[dict[str, Any], ...]] = {
    "taylorseer": tuple({"cache_interval": n, "max_order": o} for o in (1, 2) for n in (2, 3, 4, 5, 6)),
    "magcache": tuple({"threshold": t} for t in (0.02, 0.06, 0.12, 0.24, 0.5)),
    "fbc": tuple({"threshold": t} for t in (0.03, 0.05, 0.1, 0.2, 0.3)),
    "cache-dit": tuple({"threshold": t, "taylorseer": True} for t in (0.05, 0.1, 0.2, 0.3)),
    "pab": ({},),
}


def sweep_peers(specs: list[MethodSpec]) -> list[MethodSpec]:
    """Every peer given without options becomes its ``PEER_SWEEPS`` settings; the rest stay."""
    out = []
    for s in specs:
        if s.family == "peer" and not s.options:
            out += [dataclasses.replace(s, options=tuple(o.items())) for o in PEER_SWEEPS[s.kind]]
        else:
            out.append(s)
    return out


def parse_methods(text: str, sweep: dict[str, list[Any]] | None = None) -> list[MethodSpec]:
    """``inductor,eager,none,static,foresight,fbc,fbc+compile,...``; ``kind(key=value,...)``
    sets options. ``sweep`` expands every method whose kind accepts the key."""
    specs = []
    for item in _split_top(text):
        m = re.fullmatch(r"([a-z-]+)(\+compile)?(?:\((.*)\))?", item.strip())
        if not m or m.group(1) not in BASELINES + _ours() + PEERS:
            raise ForesightValueError(
                f"unknown method {item!r}; accepted: {', '.join(BASELINES + _ours() + PEERS)} "
                "(peers also as NAME+compile; options as NAME(key=value,...))")
        options = tuple((k.strip(), parse_value(v.strip())) for k, v in
                        (kv.split("=", 1) for kv in m.group(3).split(",") if kv.strip())) if m.group(3) else ()
        specs.append(MethodSpec(m.group(1), options, bool(m.group(2))))
    for key, values in (sweep or {}).items():
        expanded = []
        for s in specs:
            if s.kind in _SWEEPABLE.get(key, ()):
                expanded += [dataclasses.replace(s, options=tuple(
                    (k, v) for k, v in s.options if k != key) + ((key, value),)) for value in values]
            else:
                expanded.append(s)
        if expanded == specs:
            raise ForesightValueError(f"--sweep {key}: no selected method takes {key!r}; "
                                      f"it applies to {', '.join(_SWEEPABLE.get(key, ())) or 'none'}")
        specs = expanded
    return specs


_SWEEPABLE = {"threshold": ("foresight", "fbc", "magcache", "cache-dit"),
              "tolerance": ("budget",), "order": ("budget", "static", "foresight", "profiling"),
              "recompute_every": ("static", "foresight"), "warmup": ("static", "foresight"),
              "cache_interval": ("taylorseer",), "max_order": ("taylorseer",)}


def _ours() -> tuple[str, ...]:
    """Our policies: the built-in ones and any registered since (tests add TESTING_ONLY ones)."""
    from foresight_compile.runtime.policies.registry import available_policies

    return OURS + tuple(p for p in available_policies() if p not in OURS)


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return [p for p in parts + [cur] if p.strip()]


def parse_value(text: str) -> Any:
    """A command-line option value: an int, else a float, else the text."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


class _Timestep:
    value = 1000


def _diffusers_peer(kind: str, model, options: dict, steps: int, compiled: bool,
                    calibrate: Callable | None) -> Prepared:
    from diffusers import (FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig,
                           TaylorSeerCacheConfig)
    from diffusers.hooks import HookRegistry

    current = _Timestep()
    stacks = module_block_stacks(model)
    if kind == "fbc":
        config = FirstBlockCacheConfig(**{"threshold": 0.05, **options})
    elif kind == "pab":
        config = PyramidAttentionBroadcastConfig(**{
            "spatial_attention_block_skip_range": 2,
            "spatial_attention_timestep_skip_range": (100, 800),
            "spatial_attention_block_identifiers": tuple(stacks),
            "current_timestep_callback": lambda: current.value, **options})
    elif kind == "taylorseer":
        config = TaylorSeerCacheConfig(**{
            "cache_interval": 5, "disable_cache_before_step": 3, "taylor_factors_dtype": torch.float32,
            "cache_identifiers": [rf"^{re.escape(s)}\.\d+$" for s in stacks], **options})
    elif kind == "magcache":
        ratios = options.pop("mag_ratios", None)
        if ratios is None:
            if calibrate is None:
                raise ForesightValueError("magcache needs mag_ratios or a calibration run")
            ratios = _magcache_ratios(model, steps, calibrate)
        config = MagCacheConfig(**{"num_inference_steps": steps, "mag_ratios": ratios, **options})
    else:
        raise ForesightValueError(f"unknown peer {kind!r}")
    model.enable_cache(config)
    fn = torch.compile(model) if compiled else model

    def call(**kwargs):
        current.value = int(kwargs["timestep"].reshape(-1)[0])
        with model.cache_context("cond"):
            return fn(**kwargs)

    def new_generation():
        HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()

    return Prepared(call, new_generation)


def _magcache_ratios(model, steps: int, calibrate: Callable) -> list[float]:
    """MagCache's own calibration run (it prints the ratios to copy into its config)."""
    from diffusers import MagCacheConfig

    probe = copy.deepcopy(model)
    probe.enable_cache(MagCacheConfig(num_inference_steps=steps, calibrate=True))
    out = io.StringIO()

    def call(**kwargs):
        with probe.cache_context("cond"):
            return probe(**kwargs)

    with contextlib.redirect_stdout(out):
        calibrate(call)
    found = re.findall(r"\[([0-9eE.,\s+-]+)\]", out.getvalue())
    if not found:
        raise ForesightValueError("magcache calibration printed no ratios")
    return [float(v) for v in found[-1].split(",")]


def _cache_dit_target(model):
    """What ``cache_dit.enable_cache`` accepts for ``model``: the model itself when cache-dit
    knows its class by name, else the block adapter cache-dit registers for the nearest base
    class it knows (a subclass of a diffusers transformer, such as the trained tiny video
    DiT, a ``WanTransformer3DModel``, is refused by name otherwise)."""
    from cache_dit.caching.block_adapters import BlockAdapterRegister, FakeDiffusionPipeline

    def registered(name: str):
        return next((n for n in BlockAdapterRegister._adapters if name.startswith(n)), None)

    if registered(type(model).__name__):
        return model
    for base in type(model).__mro__[1:]:
        name = registered(base.__name__)
        if name is not None:
            return BlockAdapterRegister._adapters[name](FakeDiffusionPipeline(model))
    return model  # cache-dit names what it cannot handle


def _cache_dit(model, options: dict, steps: int, compiled: bool) -> Prepared:
    """cache-dit's DBCache on the bare transformer (its transformer-only flow); option
    ``taylorseer=True`` adds its TaylorSeer calibrator (order 1, as cache-dit recommends)."""
    try:
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig
    except ImportError:
        raise ForesightValueError(
            "cache-dit is not installed (pip install 'foresight-compile[peers]')") from None
    settings = {"Fn_compute_blocks": 1, "Bn_compute_blocks": 0,
                # the benchmark loop makes one call per step (batched or no CFG)
                "enable_separate_cfg": False}
    calibrator = None
    for key, value in options.items():
        if key == "taylorseer":
            calibrator = TaylorSeerCalibratorConfig(taylorseer_order=1) if value else None
        else:
            settings["residual_diff_threshold" if key == "threshold" else key] = value
    cache_dit.enable_cache(_cache_dit_target(model),
                           cache_config=DBCacheConfig(num_inference_steps=steps, **settings),
                           calibrator_config=calibrator)
    fn = torch.compile(model) if compiled else model
    return Prepared(fn, lambda: cache_dit.refresh_context(model, num_inference_steps=steps))
