"""OrtEngine: an ``export_onnx`` model run by onnxruntime, the reuse controller deciding.

See ``exported.py`` for the contract every engine keeps; this module binds its buffers with
onnxruntime's ``IOBinding`` (once per parity) and runs it.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Mapping

import numpy as np
import torch

from foresight_compile.errors import ForesightError, ForesightValueError
from foresight_compile.runtime.engines.exported import ExportedEngine
from foresight_compile.runtime.engines.manifest import (manifest_path_for, read_manifest,
                                                        verify_onnx_file)

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
