"""TensorRT builder of the exported graph form: ``export_tensorrt`` (the engine that runs it is
``runtime/engines/tensorrt.py``).

    exported = foresight_compile.export_onnx(model, inputs, "wan.onnx")
    foresight_compile.export_tensorrt("wan.onnx", "wan.plan", precision="fp16")
    engine = foresight_compile.tensorrt.TrtEngine("wan.plan")     # reads wan.plan.manifest.json
    out = engine(**inputs)

TensorRT's ONNX parser turns each block's ``If`` into a conditional layer whose predicate is
``reuse_mask[l]``; shapes are static (those of the export). The engine's inputs and outputs
are the ONNX model's, and ``TrtEngine`` drives them exactly as ``OrtEngine`` does (same
``ReuseController``, cache banks preallocated on the device and never moved).

Precision: ``precision=None`` builds a strongly typed network, so every tensor keeps the
ONNX dtype (export a half-precision model for fp16 I/O and compute). ``"fp16"``/``"bf16"``
let TensorRT run layers in that type while the layers of the change metric (the ONNX nodes
``export_onnx`` tags ``foresight_metric/``) are kept in float32, so the MSE cannot overflow.

Needs a CUDA GPU and ``tensorrt>=10`` (``pip install tensorrt-cu12`` fetches the real wheel
from NVIDIA's package index). ``tensorrt`` is imported only inside the functions that use
it; the pure parts (settings, dtype names, which layers to pin, manifest checks) run anywhere.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Sequence

import torch

from foresight_compile.errors import ExportError, ForesightValueError
from foresight_compile.runtime.engines.manifest import (METRIC_NODE_PREFIX, Manifest,
                                                        check_against_manifest, manifest_path_for,
                                                        read_manifest, sha256_of,
                                                        verify_onnx_file, write_manifest)
from foresight_compile.runtime.engines.tensorrt import (TensorRTUnavailableError, engine_io,
                                                        import_tensorrt, trt_dtype_name)

PRECISIONS = (None, "fp16", "bf16")
_FLOATING = frozenset({"float32", "float16", "bfloat16"})


@dataclasses.dataclass(frozen=True)
class BuildSettings:
    """How ``export_tensorrt`` builds: every field validated, nothing device-dependent."""

    precision: str | None = None
    """None: strongly typed, dtypes as exported; "fp16"/"bf16": TensorRT may lower layers to
    that type, change-metric layers stay float32."""
    workspace_bytes: int | None = None
    """Cap on TensorRT's scratch memory; None leaves TensorRT's default (the device size)."""
    optimization_level: int | None = None
    """Builder optimization level 0..5 (TensorRT's default is 3); higher builds longer."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ForesightValueError(f"precision got {self.precision!r}; accepted: None (as "
                                      f"exported), 'fp16', 'bf16'")
        if self.workspace_bytes is not None and (
                isinstance(self.workspace_bytes, bool) or not isinstance(self.workspace_bytes, int)
                or self.workspace_bytes <= 0):
            raise ForesightValueError(f"workspace_bytes must be an int > 0 or None, got "
                                      f"{self.workspace_bytes!r}")
        if self.optimization_level is not None and (
                isinstance(self.optimization_level, bool)
                or self.optimization_level not in range(6)):
            raise ForesightValueError(f"optimization_level must be an int in 0..5 or None, got "
                                      f"{self.optimization_level!r}")

    @property
    def strongly_typed(self) -> bool:
        return self.precision is None


def metric_layers(layers: Sequence[tuple[str, Sequence[str]]],
                  prefix: str = METRIC_NODE_PREFIX) -> list[tuple[int, tuple[int, ...]]]:
    """Layers to keep in float32 under an fp16/bf16 build, and which of their outputs.

    ``layers[i] = (layer name, output dtype names)``. The ONNX parser names each layer after
    its ONNX node (with a suffix when a node becomes several layers), so the change-metric
    layers are those named with ``prefix``; only their floating-point outputs are pinned
    (boolean ``isfinite`` outputs keep their type)."""
    pinned = []
    for i, (name, dtypes) in enumerate(layers):
        if name.startswith(prefix):
            outputs = tuple(j for j, d in enumerate(dtypes) if d in _FLOATING)
            if outputs:
                pinned.append((i, outputs))
    return pinned


def engine_manifest(onnx_manifest: Manifest, engine_path: pathlib.Path, settings: BuildSettings,
                    tensorrt_version: str) -> Manifest:
    """The manifest written next to an engine: the ONNX one plus what the build used."""
    extra = dict(onnx_manifest.extra)
    extra["tensorrt"] = {"engine_file": engine_path.name, "engine_sha256": sha256_of(engine_path),
                         "tensorrt": tensorrt_version, "precision": settings.precision,
                         "workspace_bytes": settings.workspace_bytes,
                         "optimization_level": settings.optimization_level}
    return dataclasses.replace(onnx_manifest, extra=extra)


def export_tensorrt(onnx_path: str | pathlib.Path, engine_path: str | pathlib.Path, *,
                    manifest: str | pathlib.Path | None = None, precision: str | None = None,
                    workspace_bytes: int | None = None, optimization_level: int | None = None,
                    verbose: bool = False) -> pathlib.Path:
    """Build a TensorRT engine from an ``export_onnx`` model; return the engine's path.

    Assumes the ONNX model and its manifest match (checked first, before TensorRT is even
    imported). Guarantees: the network has one conditional per block, the engine's inputs
    and outputs match the manifest, and ``<engine>.manifest.json`` is written next to it.
    Raises ``TensorRTUnavailableError`` without TensorRT, ``ExportError`` when parsing or
    building fails (with TensorRT's own messages)."""
    settings = BuildSettings(precision, workspace_bytes, optimization_level)
    onnx_path, engine_path = pathlib.Path(onnx_path), pathlib.Path(engine_path)
    loaded = read_manifest(manifest if manifest is not None else manifest_path_for(onnx_path))
    verify_onnx_file(onnx_path, loaded)
    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise TensorRTUnavailableError("building a TensorRT engine needs a CUDA device; "
                                       "torch.cuda.is_available() is False")

    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if settings.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves the external weights file too
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    conditions = sum(layer.type == trt.LayerType.CONDITION for layer in layers)
    if conditions != len(loaded.blocks):
        raise ExportError(f"the parsed network has {conditions} conditional layers for "
                          f"{len(loaded.blocks)} blocks: TensorRT folded or split an If")

    config = builder.create_builder_config()
    if settings.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    if settings.optimization_level is not None:
        config.builder_optimization_level = settings.optimization_level
    if not settings.strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16 if settings.precision == "fp16" else trt.BuilderFlag.BF16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        described = [(layer.name, [trt_dtype_name(layer.get_output(j).dtype)
                                   for j in range(layer.num_outputs)]) for layer in layers]
        for i, outputs in metric_layers(described):
            layers[i].precision = trt.float32
            for j in outputs:
                layers[i].set_output_type(j, trt.float32)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build an engine from {onnx_path.name} (see the "
                          f"TensorRT log above; verbose=True shows more)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    engine_path.write_bytes(bytes(serialized))
    engine = trt.Runtime(logger).deserialize_cuda_engine(engine_path.read_bytes())
    inputs, outputs = engine_io(engine)
    check_against_manifest(loaded, inputs, outputs, what="TensorRT engine")
    write_manifest(engine_manifest(loaded, engine_path, settings, trt.__version__),
                   manifest_path_for(engine_path))
    return engine_path


