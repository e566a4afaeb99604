"""The memory census: the bytes of tensors a method keeps alive between denoising steps.

One measurement for every method, ours and the peers alike, that reads nothing of a
method's internals:

1. ``Census()``, before the method exists: every storage a live tensor holds (after a full
   ``gc.collect()``; tensors are found through ``gc.get_objects()``, which reaches module
   attributes, hook states, closures and our controllers alike), keyed by device and data
   pointer so that views count their storage once. The census keeps these tensors
   referenced until it is closed, so no storage it saw can be freed and its address reused
   by a new one while it runs.
2. The method is prepared (its own copy of the model) and called once (the compile).
3. ``Census.generation()`` runs one generation of the benchmark's denoising loop and, between
   two steps (after the steps ``census_steps`` names), sums the bytes of the storages that
   were not alive at 1: the method's model copy, what it keeps between steps, the
   sampler's latent and the last output.
4. The same for the uncached model (eager, its own copy): its parameters, buffers and the
   sampler's tensors. ``cache_bytes(held, baseline)``: the largest difference over the
   census points. What is left is what the method holds beyond the uncached model.

What it counts: every tensor with a Python object (model parameters and buffers cancel:
both copies have them). For our policies that is ``stats().cache_bytes`` (the cache
buffers and the latent probe) plus fixed bookkeeping that does not scale with the
activations: the stats ring of each compiled graph (``HISTORY_ROWS`` rows of the timestep,
the per-block change and thresholds: ``HISTORY_ROWS * (8 + 8 * blocks)`` bytes) and per
branch the policy's per-block rows, the forecast-weights table and the decision masks
(< 256 bytes per block). For a peer it is its hooks' saved activations, residuals and
factors. What it misses: memory held only by C++ (CUDA-graph pools, engines' device
memory), not tensors of the process's Python objects.
"""
from __future__ import annotations

import gc
import warnings
from typing import Any, Callable

import torch

from foresight_compile import models


def live_storages() -> dict[tuple[str, int], torch.Tensor]:
    """Every storage a live tensor holds now: ``(device, data pointer) -> one tensor on it``
    (fake, meta and empty tensors hold none)."""
    from torch._subclasses.fake_tensor import FakeTensor

    gc.collect()
    found: dict[tuple[str, int], torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if not issubclass(type(obj), torch.Tensor):  # type(): no __class__ lookups
                continue
            try:
                if obj.device.type == "meta" or isinstance(obj, FakeTensor):
                    continue
                ptr = obj.untyped_storage().data_ptr()
            except Exception:  # a wrapper subclass without storage: its parts are listed
                continue
            if ptr:
                found.setdefault((str(obj.device), ptr), obj)
    return found


def storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def census_steps(steps: int) -> tuple[int, ...]:
    """The steps after which the census counts (0-based): early (the method's state is
    filled after a few steps), the middle, and between the last two steps."""
    if steps < 2:
        return (0,)
    return tuple(sorted({min(2, steps - 2), steps // 2, steps - 2}))


class Census:
    """What is alive now; then, between steps of a generation, the bytes alive beyond it."""

    def __init__(self) -> None:
        self._before = live_storages()

    def new_bytes(self) -> int:
        """Bytes of the storages alive now that were not alive when the census started."""
        now = live_storages()
        return storage_bytes(t for key, t in now.items() if key not in self._before)

    def generation(self, call: Callable[..., Any], dit, steps: int, seed: int = 0,
                   new_generation: Callable[[], None] | None = None) -> list[int]:
        """Runs one generation of ``steps`` steps with ``call``; returns ``new_bytes()``
        after each of ``census_steps(steps)``."""
        if new_generation is not None:
            new_generation()
        points, held, step = set(census_steps(steps)), [], [0]

        def on_step(_latent):
            if step[0] in points:
                held.append(self.new_bytes())
            step[0] += 1

        models.denoise(call, dit, steps, seed=seed, on_step=on_step)
        return held

    def close(self) -> None:
        self._before = {}

    def __enter__(self) -> "Census":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def baseline(dit, steps: int, seed: int = 0) -> list[int]:
    """The census of the uncached model: eager, on its own copy, as every method has."""
    import copy

    with Census() as census:
        model = copy.deepcopy(dit.model)
        return census.generation(model, dit, steps, seed)


def cache_bytes(held: list[int], uncached: list[int]) -> int:
    """What a method holds between steps beyond the uncached model, at the census point
    where that is largest."""
    if len(held) != len(uncached):
        raise ValueError(f"census points differ: {len(held)} vs {len(uncached)}")
    return max(h - b for h, b in zip(held, uncached))
