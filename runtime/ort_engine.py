"""Engines for an exported graph-form model, driven by the same reuse controller as torch.

``ExportedEngine`` holds everything that does not depend on the inference runtime: the
``ReuseController`` and policy (the very classes the torch backend uses), argument checks,
and the preallocated buffers of ``binding_plan(manifest)``. Each call:

1. copies the tensor arguments into the static input buffers (checked against the manifest);
2. ``controller.begin`` finds the CFG branch and step and sets the host mask;
3. writes the mask into its static buffer and runs the engine bound to the branch's cache
   bank of the current parity (bank ``p`` in, bank ``1 - p`` out: no cache is copied);
4. feeds ``block_stats`` of the computed blocks into ``policy_state.metrics`` (reused blocks
   keep their metrics; with no cache held yet only finiteness counts, as in
   ``SegmentExecutor``), flips the parity and points ``state.buffers`` at the fresh bank;
5. ``controller.end`` computes the next mask and starts its host copy.

Cache banks are allocated once per branch, bound once per parity, and never move: the
addresses handed to the runtime at bind time are the ones it writes for every step.

``OrtEngine`` runs the model with onnxruntime through ``IOBinding``; ``TrtEngine``
(``foresight_compile.tensorrt``) is the same driver over a TensorRT execution context.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Mapping

import numpy as np
import torch

from foresight_compile.errors import ForesightError, ForesightValueError
from foresight_compile.export import (Manifest, binding_plan, manifest_path_for, read_manifest,
                                      torch_dtype, verify_onnx_file)
from foresight_compile.options import Options
from foresight_compile.runtime.controller import ReuseController
from foresight_compile.runtime.policies import get_policy
from foresight_compile.runtime.policies.base import MSE

_INPUT_ROLES = frozenset({"input", "mask", "cache_in"})


@dataclasses.dataclass
class _Banks:
    """One CFG branch's two cache banks and the engine bindings that read each of them."""

    tensors: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]
    per_block: tuple[list, list]  # bank -> [per block: tuple of its cache tensors]
    bound: tuple[Any, Any]  # parity -> engine binding
    current: int = 0  # the bank holding the caches the next step reads


class ExportedEngine:
    """Runtime-independent driver; subclasses implement ``_bind`` and ``_run``.

    Assumes ``manifest`` describes the loaded engine (subclasses check it before calling
    ``__init__``). Guarantees: one call is one model evaluation with the controller's
    decisions, the returned tensors are fresh (never overwritten by a later call), and no
    cache tensor is allocated after a branch's first call."""

    def __init__(self, manifest: Manifest, options: Options, device: torch.device) -> None:
        self.manifest = manifest
        self.options = options
        self.plan = binding_plan(manifest)
        self.device = device
        policy = get_policy(options.policy)(options)
        names = [s.name for s in manifest.inputs]
        self.controller = ReuseController(len(manifest.blocks), policy,
                                          names.index(manifest.timestep_input), range(len(names)))
        self.uses_cache = policy.needs_cache
        self._inputs = tuple(self._allocate(s) for s in self.plan.inputs)
        self._mask = self._allocate(self.plan.mask)
        self._outputs = tuple(self._allocate(s) for s in self.plan.outputs)
        self._stats = self._allocate(self.plan.stats)
        # The host writes the mask into a (pinned, on CUDA) host tensor through a numpy
        # view: a list assignment, no tensor is created per step.
        self._mask_host = (self._mask if device.type == "cpu" else
                           torch.zeros_like(self._mask, device="cpu", pin_memory=True))
        self._mask_np = self._mask_host.numpy()
        # On CUDA the pinned mask is copied without blocking: the host waits for the previous
        # copy (long done) before overwriting it.
        self._mask_copied = torch.cuda.Event() if device.type == "cuda" else None
        self._expected = {s.name: (i, s.shape, torch_dtype(s.dtype))
                          for i, s in enumerate(self.plan.inputs)}
        self._branches: list[_Banks] = []
        self.block_computes = [0] * len(manifest.blocks)
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

    def _banks(self, branch: int) -> _Banks:
        while len(self._branches) <= branch:
            tensors = tuple(tuple(self._allocate(s) for s in self.plan.caches) for _ in range(2))
            per_block: tuple[list, list] = ([], [])
            for bank in (0, 1):
                groups: list[list[torch.Tensor]] = [[] for _ in self.manifest.blocks]
                for block, t in zip(self.plan.cache_blocks, tensors[bank]):
                    groups[block].append(t)
                per_block[bank].extend(tuple(g) for g in groups)
            bound = tuple(self._bind(self._resolve(parity, tensors)) for parity in (0, 1))
            self._branches.append(_Banks(tensors, per_block, bound))
        return self._branches[branch]

    def _resolve(self, parity: int, banks) -> dict[str, tuple[torch.Tensor, bool]]:
        static = {"input": self._inputs, "mask": (self._mask,), "output": self._outputs,
                  "stats": (self._stats,)}
        return {name: (banks[bank][index] if bank >= 0 else static[role][index],
                       role in _INPUT_ROLES)
                for name, role, index, bank in self.plan.bindings(parity)}

    def cache_addresses(self, branch: int = 0) -> tuple[int, ...]:
        """Addresses of both cache banks of ``branch`` (fixed from its first call on)."""
        return tuple(t.data_ptr() for bank in self._branches[branch].tensors for t in bank)

    @property
    def cache_bytes(self) -> int:
        return 2 * self.plan.bank_bytes * len(self._branches)

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
        args = self._load(kwargs)
        state = self.controller.begin(args)
        banks = self._banks(state.branch)
        mask = state.mask
        # No cache held (first call, or invalidated): the MSE is against nothing of this
        # generation, so, as SegmentExecutor does, only finiteness is recorded.
        fresh = state.buffers.tensors[0] is None
        if self._mask_copied is not None:
            self._mask_copied.synchronize()
        self._mask_np[:] = mask
        if self._mask_copied is not None:
            self._mask.copy_(self._mask_host, non_blocking=True)
            self._mask_copied.record()
        self._run(banks.bound[banks.current])
        if self.uses_cache:
            metrics = state.policy_state.metrics
            torch.where(self._mask[:, None], metrics, self._stats, out=metrics)
            if fresh:
                metrics[:, MSE].zero_()  # a generation start: reset() had zeroed it
            banks.current ^= 1
            state.buffers.tensors[:] = banks.per_block[banks.current]
        for l, reused in enumerate(mask):
            self.block_computes[l] += not reused
        self.controller.end(state)
        return tuple(o.clone() for o in self._outputs)

    # -- reporting -------------------------------------------------------------------------
    def reset(self, clear_stats: bool = False) -> None:
        """Start a new generation at the next call of every branch."""
        self.controller.reset()
        if clear_stats:
            self.controller.clear_records()
            self.block_computes[:] = [0] * len(self.block_computes)

    def stats(self):
        """``foresight_compile.Stats`` of this engine (as ``foresight_compile.stats(model)``)."""
        from foresight_compile.api import Stats

        rows = list(self.controller.records)
        return Stats(blocks=list(self.manifest.blocks), mask=[list(r.reused) for r in rows],
                     branch=[r.branch for r in rows], generation=[r.generation for r in rows],
                     step=[r.step for r in rows], timestep=[r.timestep for r in rows],
                     cache_bytes=self.cache_bytes, block_computes=list(self.block_computes),
                     compile_seconds=self.build_seconds, policy=self.options.policy,
                     change=[None if r.change is None else r.change.tolist() for r in rows],
                     thresholds=[None if r.thresholds is None else r.thresholds.tolist()
                                 for r in rows])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.manifest.model_file}, {len(self.manifest.blocks)} "
                f"blocks, policy={self.options.policy}, branches={len(self._branches)}, "
                f"cache={self.cache_bytes} bytes)")


_NUMPY = {"float32": np.float32, "float16": np.float16, "float64": np.float64, "int64": np.int64,
          "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


class OrtEngine(ExportedEngine):
    """Runs an ``export_onnx`` model with onnxruntime, the reuse controller deciding the mask.

    ``OrtEngine("wan.onnx")`` reads ``wan.onnx.manifest.json`` and refuses a model that does
    not match it. ``policy`` and policy options (``threshold=...``) override the exported
    ones. ``device="cuda"`` uses the CUDA execution provider with device buffers (needs
    onnxruntime-gpu). Call it like the model: ``engine(**inputs)`` returns the outputs."""

    def __init__(self, model_path: str | pathlib.Path, *, manifest: str | pathlib.Path | None = None,
                 device: str | torch.device = "cpu", session_options=None,
                 **policy_overrides: Any) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ForesightError("OrtEngine needs onnxruntime: pip install "
                                 "'foresight-compile[onnx]' (or onnxruntime)") from None
        start = time.perf_counter()
        model_path = pathlib.Path(model_path)
        loaded = read_manifest(manifest if manifest is not None else manifest_path_for(model_path))
        verify_onnx_file(model_path, loaded)
        for spec in (*loaded.engine_inputs, *loaded.engine_outputs):
            if spec.dtype not in _NUMPY:
                raise ForesightValueError(f"OrtEngine cannot bind {spec} (dtype {spec.dtype}); "
                                          f"supported: {', '.join(_NUMPY)}")
        device = torch.device(device)
        if device.type == "cpu":
            providers: list = ["CPUExecutionProvider"]
        elif device.type == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}),
                         "CPUExecutionProvider"]
        else:
            raise ForesightValueError(f"device must be 'cpu' or 'cuda', got {str(device)!r}")
        self.session = ort.InferenceSession(str(model_path), sess_options=session_options,
                                            providers=providers)
        super().__init__(loaded, loaded.options(**policy_overrides), device)
        self.build_seconds = time.perf_counter() - start

    def _bind(self, tensors: Mapping[str, tuple[torch.Tensor, bool]]) -> "_OrtBinding":
        binding = self.session.io_binding()
        kind = self.device.type
        index = self.device.index or 0
        for name, (t, is_input) in tensors.items():
            bind = binding.bind_input if is_input else binding.bind_output
            bind(name, kind, index, _NUMPY[str(t.dtype).removeprefix("torch.")], list(t.shape),
                 t.data_ptr())
        return _OrtBinding(binding, frozenset(t.data_ptr() for t, is_input in tensors.values()
                                              if not is_input))

    def _run(self, bound: "_OrtBinding") -> None:
        self.session.run_with_iobinding(bound.binding)
        if not bound.checked:
            # Once per binding: onnxruntime must have written our buffers, not its own.
            got = frozenset(v.data_ptr() for v in bound.binding.get_outputs())
            if got != bound.outputs:
                raise ForesightError("onnxruntime allocated its own output buffers instead of "
                                     "writing the bound ones; the cache would not persist")
            bound.checked = True


@dataclasses.dataclass
class _OrtBinding:
    binding: Any  # onnxruntime.IOBinding, bound once
    outputs: frozenset[int]  # the addresses its outputs must be written to
    checked: bool = False
