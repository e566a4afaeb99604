"""Reuse policies (the package face; the registry is ``registry.py``).

A policy answers two questions for one CFG branch of one generation:
  * on the host, before a step: must this step compute every block? (warmup, refresh steps)
  * on the device, after a step: which blocks may be reused on the next step? (a bool mask
    from the change metrics; no host sync)
and it may update its own device state from a step's metrics (``observe``).
"""
from __future__ import annotations

from foresight_compile.runtime.policies.base import PolicyState, ReusePolicy
from foresight_compile.runtime.policies.registry import (available_policies, get_policy,
                                                         register_policy)

__all__ = ["PolicyState", "ReusePolicy", "register_policy", "get_policy", "available_policies"]
