"""The backend's options: one frozen, validated dataclass.

``torch.compile(model, backend="foresight", options={...})`` hands the dict to
``Options.from_dict``; unknown keys and bad values raise ``ForesightValueError`` (a
``ValueError``) naming the key and what is accepted.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from foresight_compile.errors import ForesightValueError

DECISIONS = ("per_layer", "prefix")
LOWERINGS = ("inductor", "eager", "cudagraphs")
FORMS = ("segments", "graph")
CACHE_DTYPES = ("bfloat16", "float16", "float8_e4m3fn")
REUSE = ("output", "residual")
ORDERS = (0, 1, 2)


@dataclasses.dataclass(frozen=True)
class Options:
    policy: str = "budget"
    """Reuse policy: "budget" (ours: every block computes or every block is served a
    forecast, while a measured error budget allows), "none" (never reuse), "static" (compute
    every `recompute_every` steps after warmup), "foresight" (adaptive, arXiv 2506.00329),
    "profiling" (ProfilingDiT, arXiv 2504.03140: background blocks reuse residuals; needs
    `profile`)."""
    warmup: int | float | None = None
    """Steps at the start of each generation that compute every block. An int counts steps;
    a float in (0, 1) is a fraction of the generation's step count (see `num_steps`). None:
    the policy's own (8, the Foresight paper's; "budget": `order` + 2)."""
    recompute_every: int = 2
    """After warmup, every block is computed on steps where (step - warmup) % N == 0."""
    threshold: float = 0.5
    """Foresight's lambda: a block is reused while MSE(out, cache) <= lambda * warmup MSE."""
    decision: str = "per_layer"
    """Foresight: "per_layer" (the paper) or "prefix" (the released code: skip blocks 0..k
    where k is the deepest block under its threshold)."""
    profile: Any = None
    """Policy "profiling": a profile JSON path or a ``BlockProfile`` (from
    ``foresight_compile.profile_blocks``)."""
    interval_max: int = 6
    """Policy "profiling": refresh interval right after warmup (ProfilingDiT's Tmax)."""
    interval_min: int = 2
    """Policy "profiling": refresh interval at the last step (Tmin)."""
    reuse: str = "output"
    """What a block's cache holds: "output" (Foresight: serve the cached output) or
    "residual" (cache ``out - in``, serve ``in + residual``; host-branch form only)."""
    order: int | None = None
    """Forecast order of a served value: 0 serves the newest cached value (a copy), k >= 1
    the Taylor extrapolation through the last k + 1 computed values at their real step
    distances (TaylorSeer, arXiv 2503.06923). None: the policy's own (1 for "budget", 0
    otherwise: the papers' settings; 0 with form="graph")."""
    tolerance: float = 0.4
    """Policy "budget": the accumulated estimated relative error a run of served steps may
    reach; the one quality knob (larger: more reuse, lower fidelity). It governs the steps
    after the first quarter of a generation of known length; the first quarter runs at the
    default's budget, except near exact (up to 0.05 at the tolerance itself, linear from
    there to the default's at 0.1; docs/DESIGN.md "What a served step costs")."""
    max_run: int | None = None
    """Policy "budget": at most this many steps in a row are served. None: an eighth of the
    generation's steps (6 of 50, 4 of 30; 8 when the step count is unknown); in the first
    quarter of a generation of known length always that, except for ``max_run=1``."""
    num_steps: int | None = None
    """Steps per generation, needed only to resolve a fractional `warmup`; when unset, the
    previous generation's length is used."""
    lowering: str = "inductor"
    """"inductor": each distinct segment compiled once by Inductor; "eager": run the
    rewritten graph as is (fast to build; for debugging and tests); "cudagraphs": Inductor
    segments replayed as CUDA graphs over static buffers (CUDA only, form="segments")."""
    form: str = "segments"
    """"segments": the host-branch form (segments compiled separately, the executor
    branches between them); "graph": one graph with a torch.cond per block."""
    strict: bool = False
    """Raise instead of falling back to plain Inductor when the model cannot be cached (no
    block stack), or when compiling or first running one of our segments fails (the cause,
    e.g. the ``InductorError``, is raised)."""
    max_cache_bytes: int | None = None
    """The most cache memory (bytes) one branch may hold: one CFG pass of one request (a
    pipeline that calls the model twice per step holds two branches). The program knows the
    bytes of its plan when it compiles: over the ceiling, compiling raises, naming the bytes
    needed and the option values that fit (never an out-of-memory mid-generation); input
    shapes that only appear later are checked before their buffers are allocated."""
    cache_dtype: str | None = None
    """Store caches and forecast histories as "bfloat16", "float16" or "float8_e4m3fn"
    (with a per-tensor scale) instead of the block outputs' dtype; None: the outputs' dtype."""
    lookahead: int = 1
    """Steps between the metrics a reuse decision reads and the step it decides. 1: step
    t+1 is decided from step t's metrics (on a GPU the host waits, at each step's start,
    for the previous step's last kernel to copy the mask). 2: from step t-1's metrics (the
    copy is a step old: no wait); a non-finite output then leaves its cache unchanged."""

    def __post_init__(self) -> None:
        from foresight_compile.runtime.policies.registry import available_policies

        _choice("policy", self.policy, tuple(available_policies()))
        _choice("decision", self.decision, DECISIONS)
        _choice("reuse", self.reuse, REUSE)
        _choice("lowering", self.lowering, LOWERINGS)
        _choice("form", self.form, FORMS)
        if self.order is not None:
            _choice("order", self.order, ORDERS)
        if (isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float))
                or not math.isfinite(self.tolerance) or self.tolerance <= 0):
            raise ForesightValueError(
                f"option 'tolerance' must be a finite number > 0, got {self.tolerance!r}")
        if self.max_run is not None:
            _positive_int("max_run", self.max_run)
        if self.warmup is not None and (
                isinstance(self.warmup, bool) or not isinstance(self.warmup, (int, float))):
            raise ForesightValueError(
                f"option 'warmup' must be an int >= 0 (steps) or a float in (0, 1) (a fraction "
                f"of the steps), got {self.warmup!r}")
        if isinstance(self.warmup, int) and self.warmup < 0:
            raise ForesightValueError(f"option 'warmup' must be >= 0, got {self.warmup}")
        if isinstance(self.warmup, float) and not 0.0 < self.warmup < 1.0:
            raise ForesightValueError(
                f"option 'warmup' as a float is a fraction of the steps and must lie in (0, 1), "
                f"got {self.warmup}; pass an int to count steps")
        _positive_int("recompute_every", self.recompute_every)
        _positive_int("interval_max", self.interval_max)
        _positive_int("interval_min", self.interval_min)
        if self.interval_min > self.interval_max:
            raise ForesightValueError(
                f"option 'interval_min' ({self.interval_min}) must not exceed 'interval_max' "
                f"({self.interval_max})")
        if self.profile is not None and not isinstance(self.profile, str) and not hasattr(
                self.profile, "foreground"):
            raise ForesightValueError(
                f"option 'profile' must be a path or a BlockProfile, got {type(self.profile).__name__}")
        if self.num_steps is not None:
            _positive_int("num_steps", self.num_steps)
        if (isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
                or not math.isfinite(self.threshold) or self.threshold <= 0):
            raise ForesightValueError(
                f"option 'threshold' must be a finite number > 0, got {self.threshold!r}")
        if isinstance(self.lookahead, bool) or self.lookahead not in (1, 2):
            raise ForesightValueError(f"option 'lookahead' must be 1 or 2, got {self.lookahead!r}")
        if self.lookahead == 2 and self.form == "graph":
            raise ForesightValueError("option 'lookahead'=2 works with form='segments', got "
                                      "form='graph'")
        if self.max_cache_bytes is not None:
            _positive_int("max_cache_bytes", self.max_cache_bytes)
        if self.cache_dtype is not None:
            _choice("cache_dtype", self.cache_dtype, CACHE_DTYPES)
            if self.form == "graph":
                raise ForesightValueError(
                    f"option 'cache_dtype'={self.cache_dtype!r} works with form='segments', got "
                    "form='graph'")
        if not isinstance(self.strict, bool):
            raise ForesightValueError(f"option 'strict' must be True or False, got {self.strict!r}")
        if self.reuse == "residual" and self.form == "graph":
            raise ForesightValueError(
                "option 'reuse'='residual' works with form='segments'; got form='graph'")
        if self.order and self.form == "graph":
            raise ForesightValueError(
                f"option 'order'={self.order} (forecast reuse) works with form='segments'; "
                "got form='graph' (use order=0)")
        if self.policy == "foresight" and isinstance(self.warmup, int) and self.warmup < 2:
            raise ForesightValueError(
                f"option 'warmup' must be >= 2 for policy 'foresight' (its thresholds come from "
                f"the last two warmup steps), got {self.warmup}")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> "Options":
        if options is None:
            return cls()
        if not isinstance(options, Mapping):
            raise ForesightValueError(f"options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in dataclasses.fields(cls)]
        for key in options:
            if key not in valid:
                raise ForesightValueError(
                    f"unknown option {key!r}; accepted options: {', '.join(valid)}")
        return cls(**options)

    @property
    def forecast_order(self) -> int:
        """The order in effect: the option, or the policy's default (the graph form serves
        copies)."""
        if self.order is not None:
            return self.order
        return 1 if self.policy == "budget" and self.form == "segments" else 0

    def warmup_steps(self, total_steps: int | None, default: int = 8) -> int | None:
        """Warmup in steps for a generation of ``total_steps`` steps (None: unknown, and
        then a fractional warmup cannot be resolved: None); ``default`` when unset."""
        if self.warmup is None:
            return default
        if isinstance(self.warmup, int):
            return self.warmup
        if total_steps is None:
            return None
        return max(2 if self.policy == "foresight" else 0, round(self.warmup * total_steps))


def _choice(key: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ForesightValueError(
            f"option {key!r} got {value!r}; accepted values: {', '.join(map(repr, accepted))}")


def _positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ForesightValueError(f"option {key!r} must be an int >= 1, got {value!r}")
