"""ExportedEngine: the runtime-independent driver of an exported graph-form model.

It holds everything that does not depend on the inference runtime: the ``ReuseController``
and policy (the very classes the torch backend uses), argument checks, and the preallocated
buffers of ``binding_plan(manifest)``. A call is one ``Executor.evaluate``:

1. the tensor arguments are copied into the static input buffers (checked against the
   manifest);
2. ``controller.begin`` finds the request, CFG branch and step and sets the host mask;
3. ``run`` writes the mask into its static buffer and runs the engine bound to the branch's
   cache bank of the current parity (bank ``p`` in, bank ``1 - p`` out: no cache is copied),
   feeds ``block_stats`` of the computed blocks into the policy metrics (reused blocks keep
   theirs) and flips the branch's ``CacheBuffers`` to the bank just written;
4. ``controller.end`` counts, records and decides the next mask.

Cache banks are allocated once per branch state, bound once per parity, and never move: the
addresses handed to the runtime at bind time are the ones it writes for every step.
Subclasses (``OrtEngine``, ``TrtEngine``) implement ``_bind`` and ``_run``.
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Any, Mapping

import torch

from foresight_compile.errors import ForesightValueError
from foresight_compile.runtime.cache_history import HistoryLayout
from foresight_compile.runtime.controller import ReuseController
from foresight_compile.runtime.engines.manifest import Manifest, binding_plan, torch_dtype
from foresight_compile.runtime.executor import Executor
from foresight_compile.runtime.staging import HostToDevice
from foresight_compile.runtime.policies.registry import get_policy
from foresight_compile.runtime.report import Stats
from foresight_compile.runtime.state import BranchState

_INPUT_ROLES = frozenset({"input", "mask", "weights", "cache_in"})


@dataclasses.dataclass
class _Banks:
    """One branch state's two cache banks and the engine bindings that read each of them."""

    tensors: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]
    bound: tuple[Any, Any]  # parity -> engine binding
    current: int = 0  # the bank holding the caches the next step reads


class ExportedEngine(Executor):
    """Assumes ``manifest`` describes the loaded engine (subclasses check it before calling
    ``__init__``). Guarantees: one call is one model evaluation with the controller's
    decisions, the returned tensors are fresh (never overwritten by a later call), and no
    cache tensor is allocated after a branch's first call."""

    def __init__(self, manifest: Manifest, options, device: torch.device) -> None:
        self.manifest = manifest
        self.options = options
        self.plan = binding_plan(manifest)
        self.device = device
        policy = get_policy(options.policy)(options)
        names = [s.name for s in manifest.inputs]
        self.order = manifest.history_slots - 1
        if options.forecast_order != self.order:
            raise ForesightValueError(
                f"option 'order'={options.forecast_order}, but {manifest.model_file} was "
                f"exported with forecast order {self.order} (its history holds "
                f"{manifest.history_slots} value(s) per block output): export again")
        units = manifest.units
        if len(units) < len(manifest.blocks) and policy.needs_cache and not policy.step_level:
            raise ForesightValueError(
                f"{manifest.model_file} was exported for a policy that serves whole steps (one "
                f"If around the block region, caches at its exit only); policy "
                f"{options.policy!r} decides block by block: export again with it")
        layout = HistoryLayout(tuple(l in units for l in range(len(manifest.blocks))),
                               manifest.history_slots)
        self.controller = ReuseController(layout, policy, names.index(manifest.timestep_input),
                                          range(len(names)))
        self._units = slice(units[0], units[-1] + 1)
        self.uses_cache = policy.needs_cache
        self._latent = None
        if policy.needs_latent_change:
            if manifest.latent_input is None:
                raise ForesightValueError(
                    f"policy {options.policy!r} reads the latent's change, but the manifest of "
                    f"{manifest.model_file} names no latent input: export again")
            self._latent = names.index(manifest.latent_input)
        self._inputs = tuple(self._allocate(s) for s in self.plan.inputs)
        self._mask = self._allocate(self.plan.mask)
        self._weights = None if self.plan.weights is None else self._allocate(self.plan.weights)
        self._outputs = tuple(self._allocate(s) for s in self.plan.outputs)
        self._stats = self._allocate(self.plan.stats)
        # The host writes the mask through a (pinned, on CUDA) host copy: no tensor is
        # created per step, and a copy still in flight is never overwritten (staging.py).
        self._mask_staging = HostToDevice(self._mask)
        self._expected = {s.name: (i, s.shape, torch_dtype(s.dtype))
                          for i, s in enumerate(self.plan.inputs)}
        self._banks: "weakref.WeakKeyDictionary[BranchState, _Banks]" = weakref.WeakKeyDictionary()
        self._scratch: "weakref.WeakKeyDictionary[BranchState, torch.Tensor]" = \
            weakref.WeakKeyDictionary()
        self.build_seconds = 0.0

    # -- subclass hooks ------------------------------------------------------------------
    def _bind(self, tensors: Mapping[str, tuple[torch.Tensor, bool]]) -> Any:
        """Bind engine tensor name -> (buffer, is_input); return what ``_run`` takes."""
        raise NotImplementedError

    def _run(self, bound: Any) -> None:
        raise NotImplementedError

    # -- buffers -------------------------------------------------------------------------
    def _allocate(self, spec) -> torch.Tensor:
        return torch.zeros(spec.shape, dtype=torch_dtype(spec.dtype), device=self.device)

    def _banks_of(self, state: BranchState) -> _Banks:
        banks = self._banks.get(state)
        if banks is None:
            tensors = tuple(tuple(self._allocate(s) for s in self.plan.caches) for _ in range(2))
            per_block = []
            for bank in tensors:
                groups: list[list[torch.Tensor]] = [[] for _ in self.manifest.blocks]
                for block, t in zip(self.plan.cache_blocks, bank):
                    groups[block].append(t)
                per_block.append([tuple(g) for g in groups])
            state.buffers.install(per_block)
            bound = tuple(self._bind(self._resolve(parity, tensors)) for parity in (0, 1))
            banks = self._banks[state] = _Banks(tensors, bound)
        return banks

    def _resolve(self, parity: int, banks) -> dict[str, tuple[torch.Tensor, bool]]:
        static = {"input": self._inputs, "mask": (self._mask,), "weights": (self._weights,),
                  "output": self._outputs, "stats": (self._stats,)}
        return {name: (banks[bank][index] if bank >= 0 else static[role][index],
                       role in _INPUT_ROLES)
                for name, role, index, bank in self.plan.bindings(parity)}

    def cache_addresses(self, branch: int = 0) -> tuple[int, ...]:
        """Addresses of both cache banks of CFG branch ``branch`` of the calling thread's
        latest request (fixed from its first call on)."""
        state = next(s for s in reversed(self.controller.live_states()) if s.branch == branch)
        return tuple(t.data_ptr() for bank in self._banks[state].tensors for t in bank)

    # -- one evaluation --------------------------------------------------------------------
    def _load(self, kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
        seen = 0
        for name, value in kwargs.items():
            expected = self._expected.get(name)
            if expected is None:
                self._check_other(name, value)
                continue
            index, shape, dtype = expected
            if not isinstance(value, torch.Tensor) or value.shape != shape or value.dtype != dtype:
                got = (f"{value.dtype}{list(value.shape)}" if isinstance(value, torch.Tensor)
                       else type(value).__name__)
                raise ForesightValueError(
                    f"input {name!r} is {got}; the engine was exported for "
                    f"{dtype}{list(shape)} (export again for other shapes)")
            self._inputs[index].copy_(value)
            seen += 1
        if seen != len(self._expected):
            missing = [n for n in self._expected if n not in kwargs]
            raise ForesightValueError(f"missing input(s) {missing}; the engine takes "
                                      f"{list(self._expected)}")
        return self._inputs

    def _check_other(self, name: str, value: Any) -> None:
        manifest = self.manifest
        if name in manifest.constants:
            if repr(value) != manifest.constants[name]:
                raise ForesightValueError(
                    f"argument {name!r}={value!r} differs from the exported value "
                    f"{manifest.constants[name]}: it is baked into the model; export again")
        elif name not in manifest.unused_inputs:
            raise ForesightValueError(
                f"unknown argument {name!r}; the engine takes {list(self._expected)} "
                f"(and {sorted(manifest.constants) + list(manifest.unused_inputs)} as exported)")

    def __call__(self, **kwargs) -> tuple[torch.Tensor, ...]:
        return self.evaluate(self._load(kwargs))

    def _latent_change(self, state: BranchState) -> None:
        """The policy's latent-change sums into ``aux[:2]``, from the static input buffer:
        in place, as the torch executor's compiled probe does."""
        latent = self._inputs[self._latent]
        previous = state.buffers.probe_like(latent)
        aux = state.policy_state.aux
        scratch = self._scratch.get(state)
        if scratch is None:
            scratch = self._scratch[state] = torch.empty_like(latent, dtype=torch.float32)
        torch.sub(latent, previous, out=scratch)
        torch.linalg.vector_norm(scratch, out=aux[0])
        torch.linalg.vector_norm(previous, dtype=torch.float32, out=aux[1])
        aux[:2].square_()
        previous.copy_(latent)

    def run(self, state: BranchState, args) -> tuple:
        banks = self._banks_of(state)
        if self._latent is not None:
            self._latent_change(state)
        if self._weights is not None:
            self._weights.copy_(state.history.device_table[:, : self.manifest.history_slots])
        self._mask_staging.write(state.mask)
        self._run(banks.bound[banks.current])
        if self.uses_cache:
            # One stats row per If; reused units keep their last measurement.
            raw = state.policy_state.raw[self._units]
            torch.where(self._mask[self._units, None], raw, self._stats, out=raw)
            banks.current ^= 1
            state.buffers.flip()
        return tuple(o.clone() for o in self._outputs)

    # -- reporting -------------------------------------------------------------------------
    def reset(self, clear_stats: bool = False) -> None:
        """Start a new generation at the next call of every branch."""
        self.controller.reset(clear_stats)

    def stats(self) -> Stats:
        """``Stats`` of this engine (as ``foresight_compile.stats(model)`` for torch)."""
        return Stats.collect([self.controller], list(self.manifest.blocks), self.build_seconds,
                             self.options.policy)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.manifest.model_file}, {len(self.manifest.blocks)} "
                f"blocks, policy={self.options.policy}, cache={self.controller.cache_bytes} bytes)")
