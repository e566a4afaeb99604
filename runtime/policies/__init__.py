"""Reuse policies: a name -> class registry.

A policy answers two questions for one CFG branch of one generation:
  * on the host, before a step: must this step compute every block? (warmup, refresh steps)
  * on the device, after a step: which blocks may be reused on the next step? (a bool mask
    from the change metrics; no host sync)
and it may update its own device state from a step's metrics (``observe``).
"""
from __future__ import annotations

from foresight_compile.errors import ForesightValueError
from foresight_compile.runtime.policies.base import PolicyState, ReusePolicy

_REGISTRY: dict[str, type[ReusePolicy]] = {}


def register_policy(name: str):
    def wrap(cls: type[ReusePolicy]) -> type[ReusePolicy]:
        if name in _REGISTRY:
            raise ForesightValueError(f"a reuse policy named {name!r} is already registered")
        cls.name = name
        _REGISTRY[name] = cls
        return cls
    return wrap


def get_policy(name: str) -> type[ReusePolicy]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ForesightValueError(
            f"unknown policy {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def available_policies() -> list[str]:
    return sorted(_REGISTRY)


from foresight_compile.runtime.policies import basic, budget, foresight, profiling  # noqa: E402,F401  (registers)

__all__ = ["PolicyState", "ReusePolicy", "register_policy", "get_policy", "available_policies"]
