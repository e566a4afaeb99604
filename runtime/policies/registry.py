"""The policy registry: a name -> ``ReusePolicy`` class table.

The built-in policies are registered here (their modules import only ``base``, never this
module or the package, so nothing imports back what imports it); ``register_policy`` adds
more (a decorator).
"""
from __future__ import annotations

from foresight_compile.errors import ForesightValueError
from foresight_compile.runtime.policies.base import ReusePolicy
from foresight_compile.runtime.policies.basic import NoReuse, StaticReuse
from foresight_compile.runtime.policies.budget import BudgetReuse
from foresight_compile.runtime.policies.foresight import ForesightReuse
from foresight_compile.runtime.policies.profiling import ProfilingReuse

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


for _builtin in (NoReuse, StaticReuse, ForesightReuse, BudgetReuse, ProfilingReuse):
    register_policy(_builtin.name)(_builtin)
