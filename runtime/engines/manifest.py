"""The exported-model contract: the manifest and the engines' binding plan.

An ``export_onnx`` model (``foresight_compile/export/onnx.py``) comes with a manifest
(``<name>.onnx.manifest.json`` next to the model) recording every input and output with its
role, shape and dtype, the block list, the policy and its parameters, the opset, the
versions and the model file's SHA-256. Engines (``runtime/engines/``) refuse a model that
does not match it (``check_against_manifest``). ``binding_plan`` says which preallocated
buffer each engine tensor binds to; it is shared by the onnxruntime and TensorRT engines
and needs no device. Plain data and checks: the exporter and the engines both import it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
from typing import Any, Mapping, Sequence

import torch

from foresight_compile.errors import (ExportError, ForesightValueError,  # noqa: F401  (re-exported)
                                      ManifestMismatchError)
from foresight_compile.options import Options

FORMAT = "foresight-compile/graph-form-onnx"
FORMAT_VERSION = 3
MASK_NAME = "reuse_mask"
STATS_NAME = "block_stats"
WEIGHTS_NAME = "forecast_weights"
STATS_COLUMNS = ("sq", "count", "bad", "fsq", "nsq")  # passes/change_metric.py
METRIC_NODE_PREFIX = "foresight_metric/"
POLICY_KEYS = ("warmup", "recompute_every", "threshold", "decision", "num_steps", "order",
               "tolerance", "max_run")
# Tensor element types by name, with their ONNX TensorProto codes (a fixed part of the ONNX
# spec, so no onnx import is needed to compare a model with its manifest).
ONNX_DTYPES = {"float32": 1, "uint8": 2, "int8": 3, "int16": 5, "int32": 6, "int64": 7,
               "bool": 9, "float16": 10, "float64": 11, "bfloat16": 16}
RESERVED_NAMES = re.compile(
    rf"^({MASK_NAME}|{STATS_NAME}|{WEIGHTS_NAME}|(new_)?cache_\d+_\d+|output_\d+)$")


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in ONNX_DTYPES:
        raise ExportError(f"tensors of dtype {dtype} cannot be exported; supported: "
                          f"{', '.join(ONNX_DTYPES)}")
    return name


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # a key of ONNX_DTYPES

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * torch.empty((), dtype=torch_dtype(self.dtype)).element_size()

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: Mapping) -> "TensorSpec":
        return cls(str(d["name"]), tuple(int(x) for x in d["shape"]), str(d["dtype"]))

    @classmethod
    def of(cls, name: str, t: torch.Tensor) -> "TensorSpec":
        return cls(name, tuple(int(d) for d in t.shape), dtype_name(t.dtype))

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}{list(self.shape)}"


@dataclasses.dataclass(frozen=True)
class CacheSpec:
    block: int
    index: int  # which output of the block
    input: TensorSpec  # cache_{block}_{index}
    output: str  # new_cache_{block}_{index}, same shape and dtype


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What an exported graph-form model takes and returns, and how to drive it."""

    model_file: str
    model_sha256: str
    opset: int
    inputs: tuple[TensorSpec, ...]  # the model's tensor inputs, in engine argument order
    timestep_input: str
    constants: dict[str, str]  # non-tensor keyword arguments baked in: name -> repr(value)
    unused_inputs: tuple[str, ...]  # tensor keyword arguments the graph never reads
    reuse_mask: TensorSpec
    caches: tuple[CacheSpec, ...]
    outputs: tuple[TensorSpec, ...]
    block_stats: TensorSpec
    blocks: tuple[str, ...]
    policy: dict[str, Any]  # Options fields: policy, warmup, recompute_every, ...
    versions: dict[str, str]
    model_class: str = ""
    external_data: str | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # e.g. "tensorrt"
    forecast_weights: TensorSpec | None = None  # forecast order >= 1: float32 [L, slots]
    history_slots: int = 1  # values cached per block output (forecast order + 1)
    latent_input: str | None = None  # the input whose change a policy may read
    # The block each top-level If stands for, in order: every block (a policy deciding per
    # block), or the region exit alone (one If around the whole block region: a policy
    # serving whole steps). ``block_stats`` has one row per If. Empty: every block.
    units: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.units:
            object.__setattr__(self, "units", tuple(range(len(self.blocks))))
        lo = self.units[0] if self.units else 0
        if self.units != tuple(range(lo, lo + len(self.units))):
            raise ManifestMismatchError(f"manifest units {list(self.units)} are not consecutive "
                                        "blocks; export the model again")

    @property
    def engine_inputs(self) -> tuple[TensorSpec, ...]:
        weights = () if self.forecast_weights is None else (self.forecast_weights,)
        return (*self.inputs, self.reuse_mask, *weights, *(c.input for c in self.caches))

    @property
    def engine_outputs(self) -> tuple[TensorSpec, ...]:
        return (*self.outputs, self.block_stats,
                *(dataclasses.replace(c.input, name=c.output) for c in self.caches))

    def options(self, **overrides: Any) -> Options:
        """The policy options recorded at export, with ``overrides`` (policy keys only). The
        forecast order is the exported one unless overridden (the graph holds that many
        values per block)."""
        policy = overrides.pop("policy", self.policy["policy"])
        settings = {k: v for k, v in self.policy.items() if k != "policy"}
        settings["order"] = self.history_slots - 1
        settings.update(overrides)
        return policy_options(policy, settings)

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model_file": self.model_file, "model_sha256": self.model_sha256,
            "external_data": self.external_data, "opset": self.opset,
            "model_class": self.model_class, "versions": self.versions,
            "inputs": [s.to_json() for s in self.inputs], "timestep_input": self.timestep_input,
            "constants": self.constants, "unused_inputs": list(self.unused_inputs),
            "reuse_mask": self.reuse_mask.to_json(),
            "caches": [{"block": c.block, "index": c.index, "block_path": self.blocks[c.block],
                        "input": c.input.to_json(), "output": c.output} for c in self.caches],
            "outputs": [s.to_json() for s in self.outputs],
            "block_stats": {**self.block_stats.to_json(), "columns": list(STATS_COLUMNS)},
            "forecast_weights": (None if self.forecast_weights is None
                                 else self.forecast_weights.to_json()),
            "history_slots": self.history_slots, "latent_input": self.latent_input,
            "blocks": list(self.blocks), "units": list(self.units),
            "if_nodes": len(self.units),
            "metric_node_prefix": METRIC_NODE_PREFIX,
            "policy": self.policy, **({"extra": self.extra} if self.extra else {}),
        }

    @classmethod
    def from_json(cls, d: Mapping, source: str = "manifest") -> "Manifest":
        if d.get("format") != FORMAT or d.get("format_version") != FORMAT_VERSION:
            raise ManifestMismatchError(
                f"{source} is not a foresight-compile manifest of format {FORMAT!r} version "
                f"{FORMAT_VERSION} (found format {d.get('format')!r} version "
                f"{d.get('format_version')!r}); export the model again with this version")
        try:
            return cls(
                model_file=d["model_file"], model_sha256=d["model_sha256"], opset=int(d["opset"]),
                inputs=tuple(TensorSpec.from_json(s) for s in d["inputs"]),
                timestep_input=d["timestep_input"], constants=dict(d["constants"]),
                unused_inputs=tuple(d["unused_inputs"]),
                reuse_mask=TensorSpec.from_json(d["reuse_mask"]),
                caches=tuple(CacheSpec(int(c["block"]), int(c["index"]),
                                       TensorSpec.from_json(c["input"]), c["output"])
                             for c in d["caches"]),
                outputs=tuple(TensorSpec.from_json(s) for s in d["outputs"]),
                block_stats=TensorSpec.from_json(d["block_stats"]), blocks=tuple(d["blocks"]),
                policy=dict(d["policy"]), versions=dict(d["versions"]),
                model_class=d.get("model_class", ""), external_data=d.get("external_data"),
                extra=dict(d.get("extra", {})),
                forecast_weights=(None if d.get("forecast_weights") is None
                                  else TensorSpec.from_json(d["forecast_weights"])),
                history_slots=int(d.get("history_slots", 1)), latent_input=d.get("latent_input"),
                units=tuple(int(u) for u in d["units"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestMismatchError(f"{source} is malformed ({type(e).__name__}: {e}); "
                                        f"export the model again") from None


def manifest_path_for(model_path: str | pathlib.Path) -> pathlib.Path:
    """``wan.onnx`` -> ``wan.onnx.manifest.json``; ``wan.plan`` -> ``wan.plan.manifest.json``
    (the full name is kept so a model and the engine built from it never share a manifest)."""
    path = pathlib.Path(model_path)
    return path.with_name(path.name + ".manifest.json")


def write_manifest(manifest: Manifest, path: str | pathlib.Path) -> None:
    pathlib.Path(path).write_text(json.dumps(manifest.to_json(), indent=1) + "\n")


def read_manifest(path: str | pathlib.Path) -> Manifest:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ManifestMismatchError(
            f"no manifest at {path}: engines need the manifest export_onnx writes next to the "
            f"model (pass manifest=... if it was moved)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ManifestMismatchError(f"{path} is not valid JSON: {e}") from None
    return Manifest.from_json(data, source=str(path))


def sha256_of(path: str | pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_mismatches(manifest: Manifest, inputs: Sequence[TensorSpec],
                        outputs: Sequence[TensorSpec], if_nodes: int | None = None) -> list[str]:
    """Every difference between the manifest and a model's (or engine's) inputs and outputs.

    Names must match as sets (an engine may list them in another order); shapes and dtypes
    must match exactly. ``if_nodes`` (top-level ``If`` count) is checked when given."""
    problems = []
    for kind, expected, actual in (("input", manifest.engine_inputs, inputs),
                                   ("output", manifest.engine_outputs, outputs)):
        by_name = {s.name: s for s in actual}
        for spec in expected:
            found = by_name.pop(spec.name, None)
            if found is None:
                problems.append(f"{kind} {spec.name!r} is in the manifest but not in the model")
            elif found != spec:
                problems.append(f"{kind} {spec.name!r}: manifest says {spec.dtype}"
                                f"{list(spec.shape)}, model has {found.dtype}{list(found.shape)}")
        problems.extend(f"{kind} {name!r} is in the model but not in the manifest"
                        for name in by_name)
    if if_nodes is not None and if_nodes != len(manifest.units):
        problems.append(f"the model has {if_nodes} top-level If nodes, the manifest lists "
                        f"{len(manifest.units)} (one per cached unit)")
    return problems


def check_against_manifest(manifest: Manifest, inputs: Sequence[TensorSpec],
                           outputs: Sequence[TensorSpec], if_nodes: int | None = None,
                           what: str = "model") -> None:
    """Raise ``ManifestMismatchError`` listing every mismatch (see ``manifest_mismatches``)."""
    problems = manifest_mismatches(manifest, inputs, outputs, if_nodes)
    if problems:
        raise ManifestMismatchError(
            f"the {what} does not match its manifest ({manifest.model_file}): "
            + "; ".join(problems) + ". Use the manifest written with this model, or export again")


def onnx_io(model_proto) -> tuple[list[TensorSpec], list[TensorSpec], int]:
    """Inputs, outputs and top-level ``If`` count of an ``onnx.ModelProto``."""
    codes = {v: k for k, v in ONNX_DTYPES.items()}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        return TensorSpec(v.name, tuple(d.dim_value if d.HasField("dim_value") else -1
                                        for d in t.shape.dim), codes.get(t.elem_type, str(t.elem_type)))
    return ([spec(v) for v in model_proto.graph.input], [spec(v) for v in model_proto.graph.output],
            sum(n.op_type == "If" for n in model_proto.graph.node))


def verify_onnx_file(model_path: str | pathlib.Path, manifest: Manifest) -> None:
    """Refuse an ONNX file that is not the one the manifest describes.

    Checks inputs, outputs and ``If`` count first (the precise message), then the SHA-256."""
    import onnx

    model_path = pathlib.Path(model_path)
    if not model_path.is_file():
        raise ManifestMismatchError(f"no ONNX model at {model_path}")
    inputs, outputs, ifs = onnx_io(onnx.load(str(model_path), load_external_data=False))
    check_against_manifest(manifest, inputs, outputs, ifs)
    digest = sha256_of(model_path)
    if digest != manifest.model_sha256:
        raise ManifestMismatchError(
            f"{model_path} is not the model its manifest describes (SHA-256 {digest[:12]}..., "
            f"manifest says {manifest.model_sha256[:12]}...): export again or use its own manifest")


@dataclasses.dataclass(frozen=True)
class BindingPlan:
    """Which preallocated buffer each engine tensor binds to.

    Static buffers (user inputs, mask, forecast weights, outputs, stats) are shared by every
    CFG branch (a step writes its branch's mask and weights into them).
    Each branch owns two cache banks; a step with parity ``p`` reads bank ``p`` through the
    ``cache_*`` inputs and writes bank ``1 - p`` through the ``new_cache_*`` outputs, so no
    cache is copied and no buffer moves. ``role`` is one of input, mask, weights, output,
    stats, cache_in, cache_out; ``index`` is the position within its role."""

    inputs: tuple[TensorSpec, ...]
    mask: TensorSpec
    outputs: tuple[TensorSpec, ...]
    stats: TensorSpec
    caches: tuple[TensorSpec, ...]  # bank layout: the cache_* inputs
    cache_outputs: tuple[str, ...]
    cache_blocks: tuple[int, ...]  # block of each cache
    weights: TensorSpec | None = None

    def bindings(self, parity: int) -> tuple[tuple[str, str, int, int], ...]:
        """``(engine tensor name, role, index, bank)``; bank is -1 for static buffers."""
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        rows = [(s.name, "input", i, -1) for i, s in enumerate(self.inputs)]
        rows.append((self.mask.name, "mask", 0, -1))
        if self.weights is not None:
            rows.append((self.weights.name, "weights", 0, -1))
        rows += [(s.name, "output", i, -1) for i, s in enumerate(self.outputs)]
        rows.append((self.stats.name, "stats", 0, -1))
        rows += [(s.name, "cache_in", k, parity) for k, s in enumerate(self.caches)]
        rows += [(n, "cache_out", k, 1 - parity) for k, n in enumerate(self.cache_outputs)]
        return tuple(rows)


def binding_plan(manifest: Manifest) -> BindingPlan:
    return BindingPlan(inputs=manifest.inputs, mask=manifest.reuse_mask, outputs=manifest.outputs,
                       stats=manifest.block_stats, caches=tuple(c.input for c in manifest.caches),
                       cache_outputs=tuple(c.output for c in manifest.caches),
                       cache_blocks=tuple(c.block for c in manifest.caches),
                       weights=manifest.forecast_weights)


def policy_options(policy: str, settings: Mapping[str, Any]) -> Options:
    """Validated ``Options`` from a policy name and policy keys only (no lowering/form)."""
    for key in settings:
        if key not in POLICY_KEYS:
            raise ForesightValueError(
                f"unknown policy option {key!r}; accepted: {', '.join(POLICY_KEYS)}")
    return Options.from_dict({"policy": policy, **settings})


def policy_record(options: Options) -> dict[str, Any]:
    """The manifest's ``policy`` entry for ``options``."""
    return {"policy": options.policy, **{k: getattr(options, k) for k in POLICY_KEYS}}
