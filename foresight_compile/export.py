"""ONNX export of the graph form, and the manifest every exported engine is checked against.

    exported = foresight_compile.export_onnx(model, example_inputs, "wan.onnx",
                                             policy="foresight", warmup=8, threshold=0.5)
    engine = foresight_compile.runtime.OrtEngine("wan.onnx")   # reads wan.onnx.manifest.json

``export_onnx`` traces the model with Dynamo (one graph, static shapes), runs the same
passes as the backend (``find_blocks`` -> ``partition_blocks`` -> ``insert_cache_branches``)
and exports the graph form with ``torch.onnx.export(..., dynamo=True)``: every block is one
ONNX ``If`` (then: serve the cache; else: compute the block, its change metric and its new
cache). The ONNX model's inputs are the model's tensor inputs, ``reuse_mask`` (bool [L])
and one ``cache_{l}_{k}`` per block output; its outputs are the model's outputs,
``block_stats`` (float32 [L, 2]: MSE against the cache, 1.0 when finite) and one
``new_cache_{l}_{k}`` per cache. The weights are initializers; those of at least
``external_data_threshold`` bytes go to ``<name>.onnx.data``.

The manifest (``<name>.onnx.manifest.json`` next to the model) records every input and output
with its role, shape and dtype, the block list, the policy and its parameters, the opset,
the versions and the model file's SHA-256. Engines refuse a model that does not match it
(``check_against_manifest``). ``binding_plan`` says which preallocated buffer each engine
tensor binds to; it is shared by the onnxruntime and TensorRT engines and needs no device.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from foresight_compile.errors import BlockDiscoveryError, ForesightError, ForesightValueError
from foresight_compile.options import Options

FORMAT = "foresight-compile/graph-form-onnx"
FORMAT_VERSION = 1
MASK_NAME = "reuse_mask"
STATS_NAME = "block_stats"
METRIC_NODE_PREFIX = "foresight_metric/"
POLICY_KEYS = ("warmup", "recompute_every", "threshold", "decision", "num_steps")
# Tensor element types by name, with their ONNX TensorProto codes (a fixed part of the ONNX
# spec, so no onnx import is needed to compare a model with its manifest).
ONNX_DTYPES = {"float32": 1, "uint8": 2, "int8": 3, "int16": 5, "int32": 6, "int64": 7,
               "bool": 9, "float16": 10, "float64": 11, "bfloat16": 16}
_RESERVED = re.compile(rf"^({MASK_NAME}|{STATS_NAME}|(new_)?cache_\d+_\d+|output_\d+)$")


class ExportError(ForesightError):
    """The model could not be exported (graph break, dynamic shapes, exporter failure)."""


class ManifestMismatchError(ForesightError, ValueError):
    """An exported model or engine does not match its manifest."""


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

    @property
    def engine_inputs(self) -> tuple[TensorSpec, ...]:
        return (*self.inputs, self.reuse_mask, *(c.input for c in self.caches))

    @property
    def engine_outputs(self) -> tuple[TensorSpec, ...]:
        return (*self.outputs, self.block_stats,
                *(dataclasses.replace(c.input, name=c.output) for c in self.caches))

    def options(self, **overrides: Any) -> Options:
        """The policy options recorded at export, with ``overrides`` (policy keys only)."""
        policy = overrides.pop("policy", self.policy["policy"])
        settings = {k: v for k, v in self.policy.items() if k != "policy"}
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
            "block_stats": {**self.block_stats.to_json(), "columns": ["mse", "finite"]},
            "blocks": list(self.blocks), "if_nodes": len(self.blocks),
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
                extra=dict(d.get("extra", {})))
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
    if if_nodes is not None and if_nodes != len(manifest.blocks):
        problems.append(f"the model has {if_nodes} top-level If nodes, the manifest lists "
                        f"{len(manifest.blocks)} blocks")
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

    Static buffers (user inputs, mask, outputs, stats) are shared by every CFG branch.
    Each branch owns two cache banks; a step with parity ``p`` reads bank ``p`` through the
    ``cache_*`` inputs and writes bank ``1 - p`` through the ``new_cache_*`` outputs, so no
    cache is copied and no buffer moves. ``role`` is one of input, mask, output, stats,
    cache_in, cache_out; ``index`` is the position within its role."""

    inputs: tuple[TensorSpec, ...]
    mask: TensorSpec
    outputs: tuple[TensorSpec, ...]
    stats: TensorSpec
    caches: tuple[TensorSpec, ...]  # bank layout: the cache_* inputs
    cache_outputs: tuple[str, ...]
    cache_blocks: tuple[int, ...]  # block of each cache

    def bindings(self, parity: int) -> tuple[tuple[str, str, int, int], ...]:
        """``(engine tensor name, role, index, bank)``; bank is -1 for static buffers."""
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        rows = [(s.name, "input", i, -1) for i, s in enumerate(self.inputs)]
        rows.append((self.mask.name, "mask", 0, -1))
        rows += [(s.name, "output", i, -1) for i, s in enumerate(self.outputs)]
        rows.append((self.stats.name, "stats", 0, -1))
        rows += [(s.name, "cache_in", k, parity) for k, s in enumerate(self.caches)]
        rows += [(n, "cache_out", k, 1 - parity) for k, n in enumerate(self.cache_outputs)]
        return tuple(rows)

    @property
    def static_bytes(self) -> int:
        return sum(s.nbytes for s in (*self.inputs, self.mask, *self.outputs, self.stats))

    @property
    def bank_bytes(self) -> int:
        return sum(s.nbytes for s in self.caches)

    def bytes_for(self, branches: int) -> int:
        """Device bytes of every engine buffer for ``branches`` CFG branches."""
        return self.static_bytes + 2 * self.bank_bytes * branches


def binding_plan(manifest: Manifest) -> BindingPlan:
    return BindingPlan(inputs=manifest.inputs, mask=manifest.reuse_mask, outputs=manifest.outputs,
                       stats=manifest.block_stats, caches=tuple(c.input for c in manifest.caches),
                       cache_outputs=tuple(c.output for c in manifest.caches),
                       cache_blocks=tuple(c.block for c in manifest.caches))


def policy_options(policy: str, settings: Mapping[str, Any]) -> Options:
    """Validated ``Options`` from a policy name and policy keys only (no lowering/form)."""
    for key in settings:
        if key not in POLICY_KEYS:
            raise ForesightValueError(
                f"unknown policy option {key!r}; accepted: {', '.join(POLICY_KEYS)}")
    return Options.from_dict({"policy": policy, **settings})


def _policy_record(options: Options) -> dict[str, Any]:
    return {"policy": options.policy, **{k: getattr(options, k) for k in POLICY_KEYS}}


# -- capture -------------------------------------------------------------------------------

def capture_graph(model: torch.nn.Module, example_inputs: Mapping[str, Any]
                  ) -> tuple[fx.GraphModule, list]:
    """The one Dynamo graph of ``model(**example_inputs)`` and its example inputs.

    Assumes the forward traces without graph breaks at static shapes; raises
    ``ExportError`` naming the break otherwise. Runs under ``torch.no_grad``."""
    captured: dict[str, Any] = {}

    def capture(gm, inputs, **_):
        if "gm" in captured:
            raise ExportError("Dynamo produced more than one graph; export needs one")
        captured.update(gm=gm, inputs=list(inputs))
        return gm.forward

    try:
        with torch.no_grad():
            torch.compile(model, backend=capture, fullgraph=True, dynamic=False)(**example_inputs)
    except ExportError:
        raise
    except Exception as e:  # Dynamo's Unsupported and friends: one line of the reason
        raise ExportError(f"Dynamo could not trace the model as one graph "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"export needs a forward without graph breaks") from e
    return captured["gm"], captured["inputs"]


class _GraphFormModule(torch.nn.Module):
    """The graph form with the lifted weights baked in as buffers.

    ``forward(*user_inputs, reuse_mask, *caches)`` calls the graph-form GraphModule with
    every placeholder filled: user inputs by position, weights from this module's buffers
    (so ``torch.onnx.export`` writes them as initializers, not as inputs)."""

    def __init__(self, graph: fx.GraphModule, slots: Sequence[tuple[str, Any]],
                 constants: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.graph_form = graph
        self.slots = tuple(slots)  # ("user", position) | ("const", buffer name)
        self.num_user = sum(kind == "user" for kind, _ in slots)
        for name, value in constants.items():
            self.register_buffer(name, value.detach())

    def forward(self, *args):
        filled = [args[ref] if kind == "user" else getattr(self, ref) for kind, ref in self.slots]
        return self.graph_form(*filled, *args[self.num_user:])


def _cache_specs(segmented) -> list[tuple[int, int, torch.Size, torch.dtype]]:
    specs = []
    for l, name in enumerate(segmented.block_submods):
        out = next(iter(segmented.gm.get_submodule(name).graph.find_nodes(op="output"))).args[0]
        for k, node in enumerate(out):
            value = node.meta.get("example_value", node.meta.get("val"))
            if not isinstance(value, torch.Tensor):
                raise ExportError(f"output {k} of block {l} is not a tensor ({type(value).__name__})")
            specs.append((l, k, value.shape, value.dtype))
    return specs


def _tag_metric_nodes(ir_model) -> int:
    """Prefix the change-metric nodes of every compute branch with ``METRIC_NODE_PREFIX``.

    In the else branch of each top-level ``If``, the metric nodes are the ancestors of the
    last output (the stats) that no block output depends on. Tagging them lets a TensorRT
    build keep exactly these layers in float32 under an fp16/bf16 flag. Returns the count."""
    tagged = 0
    for node in ir_model.graph:
        if node.op_type != "If":
            continue
        branch = node.attributes["else_branch"].as_graph()

        def ancestors(values) -> set:
            seen, stack = set(), [v.producer() for v in values]
            while stack:
                n = stack.pop()
                if n is None or n in seen or n.graph is not branch:
                    continue
                seen.add(n)
                stack.extend(v.producer() for v in n.inputs if v is not None)
            return seen

        block = ancestors(branch.outputs[:-1])
        for n in ancestors(branch.outputs[-1:]) - block:
            n.name = METRIC_NODE_PREFIX + (n.name or n.op_type)
            tagged += 1
    return tagged


def _strip_stack_traces(ir_model) -> None:
    """Drop the exporter's per-node Python stack traces (~6 KB a node, all in our wrapper)."""
    from onnx_ir.traversal import RecursiveGraphIterator

    for node in RecursiveGraphIterator(ir_model.graph):
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)


def _versions() -> dict[str, str]:
    import diffusers
    import onnx

    import foresight_compile
    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "onnx": onnx.__version__, "foresight_compile": foresight_compile.__version__}


@dataclasses.dataclass(frozen=True)
class ExportedModel:
    onnx_path: pathlib.Path
    manifest_path: pathlib.Path
    manifest: Manifest

    def __str__(self) -> str:
        m = self.manifest
        return (f"exported {m.model_class or 'model'}: {len(m.blocks)} blocks (one If each), "
                f"{len(m.caches)} caches, opset {m.opset} -> {self.onnx_path}")


def export_onnx(model: torch.nn.Module, example_inputs: Mapping[str, Any],
                path: str | pathlib.Path, policy: str = "foresight", *, opset: int | None = None,
                external_data_threshold: int = 1024, keep_stack_traces: bool = False,
                **policy_settings: Any) -> ExportedModel:
    """Export ``model`` in the graph form: one ONNX ``If`` per block, cache as explicit state.

    Args:
        model: a module whose forward Dynamo traces as one graph (diffusers DiTs do).
        example_inputs: the keyword arguments of one forward call. Tensor arguments become
            ONNX inputs at exactly these shapes and dtypes; other arguments (``return_dict``)
            are baked in and recorded in the manifest, which engines check.
        path: the ``.onnx`` file to write; ``<path>.data`` holds weights of at least
            ``external_data_threshold`` bytes, ``<path>.manifest.json`` the manifest.
        policy, policy_settings: the reuse policy engines use by default (``warmup``,
            ``recompute_every``, ``threshold``, ``decision``, ``num_steps``); the ONNX graph
            does not depend on them.
    Guarantees: the file passes ``onnx.checker`` (full check), strict shape inference gives
    every output the static shape the manifest records, and the top-level ``If`` count is
    the block count. Raises ``ForesightValueError`` for bad arguments, ``BlockDiscoveryError``
    when the model has no block stack, ``ExportError`` when tracing or exporting fails."""
    import onnx
    import onnx_ir as ir

    from foresight_compile.passes.blocks import find_blocks
    from foresight_compile.passes.cache_branch import insert_cache_branches
    from foresight_compile.passes.partition import partition_blocks
    from foresight_compile.program import find_timestep_input

    if not isinstance(example_inputs, Mapping):
        raise ForesightValueError(
            f"example_inputs must be a dict of the keyword arguments of one forward call, got "
            f"{type(example_inputs).__name__}")
    if (isinstance(external_data_threshold, bool) or not isinstance(external_data_threshold, int)
            or external_data_threshold < 0):
        raise ForesightValueError(f"external_data_threshold must be an int >= 0 (bytes), got "
                                  f"{external_data_threshold!r}")
    options = policy_options(policy, policy_settings)
    path = pathlib.Path(path)
    if path.suffix != ".onnx":
        raise ForesightValueError(f"path must end in .onnx, got {str(path)!r}")
    for name in example_inputs:
        if _RESERVED.match(name):
            raise ForesightValueError(f"input name {name!r} collides with a name the export "
                                      f"reserves (reuse_mask, cache_*, output_*, block_stats)")

    gm, graph_inputs = capture_graph(model, example_inputs)
    stack = find_blocks(gm)
    segmented = partition_blocks(gm, stack)
    graph = insert_cache_branches(segmented)

    # Placeholders are user inputs (matched by identity: Dynamo hands the backend the very
    # tensors of the call) or weights and buffers, which are baked in.
    tensors = {k: v for k, v in example_inputs.items() if isinstance(v, torch.Tensor)}
    slots, constants, user_names = [], {}, []
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), graph_inputs):
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"graph input {node.name} is a {type(value).__name__}, not a "
                              f"tensor: export needs static shapes")
        user = next((k for k, t in tensors.items() if t is value), None)
        if user is not None and user not in user_names:
            slots.append(("user", len(user_names)))
            user_names.append(user)
        else:
            slots.append(("const", node.name))
            constants[node.name] = value
    timestep_index = find_timestep_input(gm, graph_inputs)
    timestep_slot = slots[timestep_index]
    if timestep_slot[0] != "user":
        raise BlockDiscoveryError("the timestep is not one of example_inputs' tensors: engines "
                                  "need it as an input to count steps")

    specs = _cache_specs(segmented)
    num_blocks = len(stack)
    device = tensors[user_names[timestep_slot[1]]].device  # the graph's device (CPU or CUDA)
    caches = [torch.zeros(shape, dtype=dtype, device=device) for _, _, shape, dtype in specs]
    mask = torch.zeros(num_blocks, dtype=torch.bool, device=device)
    module = _GraphFormModule(graph, slots, constants).eval()
    args = (*[tensors[k] for k in user_names], mask, *caches)
    with torch.no_grad():
        result = module(*args)
    num_outputs = len(result) - 1 - len(caches)
    cache_specs = tuple(CacheSpec(l, k, TensorSpec(f"cache_{l}_{k}", tuple(shape), dtype_name(dtype)),
                                  f"new_cache_{l}_{k}") for l, k, shape, dtype in specs)
    outputs = tuple(TensorSpec.of(f"output_{i}", t) for i, t in enumerate(result[:num_outputs]))
    input_specs = tuple(TensorSpec.of(k, tensors[k]) for k in user_names)
    input_names = [*user_names, MASK_NAME, *(c.input.name for c in cache_specs)]
    output_names = [*(s.name for s in outputs), STATS_NAME, *(c.output for c in cache_specs)]

    try:
        with torch.no_grad():
            program = torch.onnx.export(module, args, None, dynamo=True, input_names=input_names,
                                        output_names=output_names, opset_version=opset,
                                        verbose=False)
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed on the graph form: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
    ir_model = program.model
    if not keep_stack_traces:
        _strip_stack_traces(ir_model)
    _tag_metric_nodes(ir_model)
    data_name = f"{path.name}.data"
    large = any(v.const_value is not None and v.const_value.nbytes >= external_data_threshold
                for v in ir_model.graph.initializers.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    if large:
        ir.save(ir_model, path, external_data=data_name, size_threshold_bytes=external_data_threshold)
    else:
        ir.save(ir_model, path)
        (path.parent / data_name).unlink(missing_ok=True)  # a stale one from an earlier export

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ExportError(f"the exported model fails onnx.checker: {e}") from e
    proto = onnx.load(str(path), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    _, out_specs, ifs = onnx_io(inferred)
    manifest = Manifest(
        model_file=path.name, model_sha256=sha256_of(path), opset=_opset(proto),
        inputs=input_specs, timestep_input=user_names[timestep_slot[1]],
        constants={k: repr(v) for k, v in example_inputs.items() if k not in tensors},
        unused_inputs=tuple(k for k in tensors if k not in user_names),
        reuse_mask=TensorSpec.of(MASK_NAME, mask), caches=cache_specs, outputs=outputs,
        block_stats=TensorSpec(STATS_NAME, (num_blocks, 2), "float32"),
        blocks=tuple(b.path for b in stack.blocks), policy=_policy_record(options),
        versions=_versions(), model_class=f"{type(model).__module__}.{type(model).__qualname__}",
        external_data=data_name if large else None)
    in_specs, _, _ = onnx_io(proto)
    try:
        check_against_manifest(manifest, in_specs, out_specs, ifs, what="exported ONNX model "
                               "(after shape inference)")
    except ManifestMismatchError as e:
        raise ExportError(str(e)) from None
    manifest_path = manifest_path_for(path)
    write_manifest(manifest, manifest_path)
    return ExportedModel(path, manifest_path, manifest)


def _opset(proto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
