"""TensorRT engine of the exported graph form: ``TrtEngine`` and what building shares.

    engine = foresight_compile.runtime.TrtEngine("wan.plan")   # reads wan.plan.manifest.json
    out = engine(**inputs)

The engine's inputs and outputs are the ONNX model's (``export_tensorrt`` builds it from
``export_onnx``'s model, ``foresight_compile/export/tensorrt.py``), and ``TrtEngine`` drives
them exactly as ``OrtEngine`` does (the same ``ExportedEngine`` contract, cache banks
preallocated on the device and never moved). Needs a CUDA GPU and ``tensorrt>=10``;
``tensorrt`` is imported only inside the functions that use it, so the pure parts (dtype
names, manifest checks) run anywhere.
"""
from __future__ import annotations

import pathlib
import time
from typing import Any, Mapping

import torch

from foresight_compile.errors import ForesightError, ForesightValueError, ManifestMismatchError
from foresight_compile.runtime.engines.exported import ExportedEngine
from foresight_compile.runtime.engines.manifest import (Manifest, TensorSpec, check_against_manifest,
                                                        manifest_path_for, read_manifest,
                                                        sha256_of)

MIN_TENSORRT = (10, 0)
INSTALL_HINT = ("pip install 'foresight-compile[tensorrt]' (or tensorrt-cu12 / tensorrt-cu13 "
                "matching your CUDA), on a machine with an NVIDIA GPU and driver; the wheel is "
                "fetched from NVIDIA's package index")
# TensorRT DataType member names -> the dtype names of the manifest.
TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8",
              "INT32": "int32", "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}


class TensorRTUnavailableError(ForesightError, ImportError):
    """TensorRT (or a CUDA device) is missing."""


def import_tensorrt():
    """``tensorrt``, or ``TensorRTUnavailableError`` saying how to install it."""
    try:
        import tensorrt
    except ImportError as e:
        raise TensorRTUnavailableError(f"TensorRT is not installed ({e}): {INSTALL_HINT}") from None
    version = tuple(int(p) for p in tensorrt.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_TENSORRT:
        raise TensorRTUnavailableError(
            f"TensorRT {tensorrt.__version__} is too old: foresight-compile needs >= "
            f"{'.'.join(map(str, MIN_TENSORRT))} (execute_async_v3, strongly typed networks); "
            f"{INSTALL_HINT}")
    return tensorrt


def trt_dtype_name(dtype: Any) -> str:
    """``trt.DataType.HALF`` (or the string ``"DataType.HALF"``) -> ``"float16"``."""
    name = getattr(dtype, "name", None) or str(dtype).rpartition(".")[2]
    try:
        return TRT_DTYPES[name]
    except KeyError:
        raise ForesightValueError(f"TensorRT dtype {dtype} has no manifest equivalent; known: "
                                  f"{', '.join(TRT_DTYPES)}") from None


def verify_engine_file(engine_path: str | pathlib.Path, manifest: Manifest) -> None:
    """Refuse an engine file the manifest was not written for (missing or other SHA-256)."""
    engine_path = pathlib.Path(engine_path)
    info = manifest.extra.get("tensorrt")
    if info is None:
        raise ManifestMismatchError(
            f"the manifest of {manifest.model_file} describes an ONNX model, not a TensorRT "
            f"engine: use the manifest export_tensorrt wrote next to {engine_path.name}")
    if not engine_path.is_file():
        raise ManifestMismatchError(f"no TensorRT engine at {engine_path}")
    digest = sha256_of(engine_path)
    if digest != info["engine_sha256"]:
        raise ManifestMismatchError(
            f"{engine_path} is not the engine its manifest describes (SHA-256 {digest[:12]}..., "
            f"manifest says {info['engine_sha256'][:12]}...): build it again")


def engine_io(engine) -> tuple[list[TensorSpec], list[TensorSpec]]:
    import tensorrt as trt

    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        spec = TensorSpec(name, tuple(int(d) for d in engine.get_tensor_shape(name)),
                          trt_dtype_name(engine.get_tensor_dtype(name)))
        (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(spec)
    return inputs, outputs


class TrtEngine(ExportedEngine):
    """Runs an ``export_tensorrt`` engine, the reuse controller deciding the mask each step.

    Static buffers and both cache banks of each CFG branch live on the engine's device and
    are bound by address; a step sets the cache addresses of its parity and enqueues
    ``execute_async_v3`` on the current CUDA stream, so torch's copies before and after stay
    ordered with it. ``policy`` and policy options override the exported ones."""

    def __init__(self, engine_path: str | pathlib.Path, *,
                 manifest: str | pathlib.Path | None = None, device: str | torch.device = "cuda",
                 **policy_overrides: Any) -> None:
        start = time.perf_counter()
        engine_path = pathlib.Path(engine_path)
        loaded = read_manifest(manifest if manifest is not None else manifest_path_for(engine_path))
        verify_engine_file(engine_path, loaded)
        trt = import_tensorrt()
        device = torch.device(device)
        if device.type != "cuda" or not torch.cuda.is_available():
            raise TensorRTUnavailableError(f"TrtEngine needs a CUDA device, got {str(device)!r} "
                                           f"(torch.cuda.is_available() is "
                                           f"{torch.cuda.is_available()})")
        self._logger = trt.Logger(trt.Logger.WARNING)
        with torch.cuda.device(device):
            self.engine = trt.Runtime(self._logger).deserialize_cuda_engine(engine_path.read_bytes())
            if self.engine is None:
                raise ManifestMismatchError(f"TensorRT could not load {engine_path} (built by "
                                            f"another TensorRT version or for another GPU?)")
            inputs, outputs = engine_io(self.engine)
            check_against_manifest(loaded, inputs, outputs, what="TensorRT engine")
            self.context = self.engine.create_execution_context()
        super().__init__(loaded, loaded.options(**policy_overrides), device)
        self.build_seconds = time.perf_counter() - start

    def _bind(self, tensors: Mapping[str, tuple[torch.Tensor, bool]]) -> tuple:
        # Static buffers are shared by every binding: their addresses are set here, once.
        cache_names = set(self.plan.cache_outputs) | {s.name for s in self.plan.caches}
        per_step = []
        for name, (t, _) in tensors.items():
            if name in cache_names:
                per_step.append((name, t.data_ptr()))
            elif not self.context.set_tensor_address(name, t.data_ptr()):
                raise ForesightError(f"TensorRT refused the address of {name!r}")
        return tuple(per_step)

    def _run(self, bound: tuple) -> None:
        context = self.context
        for name, address in bound:
            context.set_tensor_address(name, address)
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise ForesightError("TensorRT execute_async_v3 failed (see the TensorRT log)")
