"""``plan_cache(model, **inputs)``: the cache memory a model will need, before it runs.

Traces the model once with Dynamo (a capture backend: no Inductor compile, no run of our
program) and runs the planning code the backend itself runs (``find_blocks`` ->
``partition_blocks`` -> ``plan_layout`` -> ``cached_values`` -> ``planned_bytes``), so the
figures are the ones ``stats().cache_bytes`` reports after a generation. Works on
shape-only inputs: build the model under ``torch.device("meta")`` and pass meta tensors,
and a 14B model is planned at 720p without a byte of weights or activations::

    with torch.device("meta"):
        transformer = WanTransformer3DModel(**config).to(torch.bfloat16)
    latent = torch.empty(1, 16, 21, 90, 160, dtype=torch.bfloat16, device="meta")
    plans = foresight_compile.plan_cache(
        transformer, hidden_states=latent, timestep=torch.empty(1, device="meta"),
        encoder_hidden_states=torch.empty(1, 512, 4096, dtype=torch.bfloat16, device="meta"),
        return_dict=False, options=[{}, {"policy": "foresight"}])
    print(plans[0])        # bytes per branch of the default policy

The bytes are per branch: one CFG pass of one request (a pipeline that calls the model
twice per step, cond and uncond, holds two branches).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch

from foresight_compile.errors import BlockDiscoveryError
from foresight_compile.lowering.plan import cached_values, plan_layout, planned_bytes
from foresight_compile.options import Options
from foresight_compile.passes.blocks import find_blocks
from foresight_compile.passes.inputs import find_latent_input
from foresight_compile.passes.partition import partition_blocks
from foresight_compile.runtime.policies.registry import get_policy


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """One policy's cache plan for one model call (every graph of it that holds blocks)."""

    policy: str
    blocks: int  # blocks found
    cached_blocks: tuple[str, ...]  # paths of the blocks holding a cache
    slots: int  # values kept per cached tensor (forecast order + 1)
    cache_dtype: str | None
    tensors: tuple[tuple[tuple[int, ...], str], ...]  # one slot's cached tensors
    probe_bytes: int  # the latent probe (policies reading the latent's change)
    bytes_per_branch: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        where = (f"the region exit ({self.cached_blocks[0]})" if len(self.cached_blocks) == 1
                 and self.blocks > 1 else f"{len(self.cached_blocks)} of {self.blocks} blocks")
        return (f"{self.policy}: {self.bytes_per_branch / 2**20:.1f} MiB per branch = "
                f"{self.slots} slot(s) x {where}"
                + (f" as {self.cache_dtype}" if self.cache_dtype else "")
                + (f" + latent probe {self.probe_bytes / 2**20:.1f} MiB" if self.probe_bytes else ""))


def _trace(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[tuple[Any, list]]:
    graphs: list[tuple[Any, list]] = []

    def capture(gm, example_inputs, **_):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=False)(*args, **kwargs)
    return graphs


def plan_cache(model: torch.nn.Module, *args: Any,
               options: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
               **kwargs: Any) -> CachePlan | list[CachePlan]:
    """The ``CachePlan`` of ``model(*args, **kwargs)`` under ``options`` (the backend's
    options dict; a list of dicts gives a list of plans from one trace). Raises
    ``BlockDiscoveryError`` when no graph of the call holds a block stack."""
    many = isinstance(options, Sequence) and not isinstance(options, (str, Mapping))
    parsed = [Options.from_dict(o) for o in (options if many else [options])]
    graphs = []
    for gm, example_inputs in _trace(model, args, kwargs):
        try:
            stack = find_blocks(gm)
        except BlockDiscoveryError:
            continue
        graphs.append((stack, partition_blocks(gm, stack),
                       example_inputs[find_latent_input(gm, example_inputs)]))
    if not graphs:
        raise BlockDiscoveryError("no graph of this call holds a stack of repeated blocks: "
                                  "foresight_compile.explain(model, ...) says why")
    plans = []
    for opts in parsed:
        policy = get_policy(opts.policy)
        slots = opts.forecast_order + 1
        dtype = None if opts.cache_dtype is None else getattr(torch, opts.cache_dtype)
        cached, tensors, total, probe_total = [], [], 0, 0
        for stack, segmented, latent in graphs:
            if not policy.needs_cache:
                continue
            layout = plan_layout(segmented, policy.step_level, slots)
            values = cached_values(segmented, layout)
            probe = latent if policy.needs_latent_change else None
            total += planned_bytes(values, slots, probe, dtype)
            probe_total += planned_bytes([], 1, probe)
            cached += [stack.blocks[l].path for l in layout.cached_blocks]
            tensors += [(shape, str(dtype or d).removeprefix("torch.")) for shape, d in values]
        plans.append(CachePlan(opts.policy, sum(len(s) for s, _, _ in graphs), tuple(cached),
                               slots, opts.cache_dtype, tuple(tensors), probe_total, total))
    return plans if many else plans[0]
