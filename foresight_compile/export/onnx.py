"""ONNX export of the graph form: one ``If`` per cached unit, the cache as explicit state.

    exported = foresight_compile.export_onnx(model, example_inputs, "wan.onnx",
                                             policy="foresight", warmup=8, threshold=0.5)
    engine = foresight_compile.runtime.OrtEngine("wan.onnx")   # reads wan.onnx.manifest.json

``export_onnx`` traces the model with Dynamo (one graph, static shapes), runs the same
passes as the backend (``find_blocks`` -> ``partition_blocks`` -> ``insert_cache_branches``)
and exports the graph form with ``torch.onnx.export(..., dynamo=True)``. A policy that
decides per block gets one ONNX ``If`` per block; a policy that serves whole steps (the
default, ``budget``) gets ONE ``If`` around the whole block region, whose cache is the
region exit's history alone (``passes/region.py``): a served step runs one forecast and
copies one history, whatever the depth. Then-branch: serve the cache (or its forecast);
else-branch: compute, measure the change, write the new cache. The ONNX model's inputs are
the model's tensor inputs, ``reuse_mask`` (bool [L]: an ``If`` reads its unit's block),
``forecast_weights`` (float32 [L, k + 1], forecast order k >= 1 only) and one
``cache_{l}_{i}`` per cached value of a cached block ``l`` (k + 1 per output, newest
first); its outputs are the model's outputs, ``block_stats`` (float32 [U, 5], one row per
``If``: the raw change sums of ``passes/change_metric.py``) and one ``new_cache_{l}_{i}``
per cache; the manifest's ``units`` lists the block each ``If`` stands for. With a forecast, the
``If``'s then-branch serves ``sum_j w_j h_j`` and keeps the history; the else-branch
computes the block and shifts its outputs in. The weights are initializers; those of at least
``external_data_threshold`` bytes go to ``<name>.onnx.data``. The manifest written next to
it is the contract the engines check (``runtime/engines/manifest.py``).
"""
from __future__ import annotations

import dataclasses
import pathlib
import warnings
from typing import Any, Mapping, Sequence

import torch
import torch.fx as fx

from foresight_compile.errors import BlockDiscoveryError, ExportError, ForesightValueError
from foresight_compile.passes.blocks import find_blocks
from foresight_compile.version import __version__
from foresight_compile.passes.cache_branch import insert_cache_branches
from foresight_compile.passes.change_metric import STATS_COLUMNS
from foresight_compile.passes.inputs import find_latent_input, find_timestep_input
from foresight_compile.passes.onnx_rewrites import rewrite_for_onnx
from foresight_compile.passes.partition import partition_blocks
from foresight_compile.passes.region import collapse_region, region_exit
from foresight_compile.runtime.policies.registry import get_policy
from foresight_compile.runtime.engines.manifest import (
    MASK_NAME, METRIC_NODE_PREFIX, RESERVED_NAMES, STATS_NAME, WEIGHTS_NAME, CacheSpec, Manifest,
    ManifestMismatchError, TensorSpec, check_against_manifest, dtype_name, manifest_path_for,
    onnx_io, policy_options, policy_record, sha256_of, write_manifest)

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

    ``forward(*user_inputs, reuse_mask, [forecast_weights,] *caches)`` calls the graph-form
    GraphModule with
    every placeholder filled: user inputs by position, weights from this module's buffers
    (so ``torch.onnx.export`` writes them as initializers, not as inputs)."""

    def __init__(self, slots: Sequence[tuple[str, Any]], constants: Mapping[str, torch.Tensor],
                 graph: fx.GraphModule) -> None:
        super().__init__()
        self.graph_form = graph
        self.slots = tuple(slots)  # ("user", position) | ("const", buffer name)
        self.num_user = sum(kind == "user" for kind, _ in slots)
        for name, value in constants.items():
            self.register_buffer(name, value.detach())

    def forward(self, *args):
        filled = [args[ref] if kind == "user" else getattr(self, ref) for kind, ref in self.slots]
        return self.graph_form(*filled, *args[self.num_user:])


def _cache_specs(segmented, units, slots: int) -> list[tuple[int, int, torch.Size, torch.dtype]]:
    """``(block, index, shape, dtype)`` of every cache tensor: per unit (the block it stands
    for), ``slots`` values of each output, slot-major (newest first)."""
    specs = []
    for l, name in zip(units, segmented.block_submods):
        out = next(iter(segmented.gm.get_submodule(name).graph.find_nodes(op="output"))).args[0]
        values = []
        for k, node in enumerate(out):
            value = node.meta.get("example_value", node.meta.get("val"))
            if not isinstance(value, torch.Tensor):
                raise ExportError(f"output {k} of block {l} is not a tensor ({type(value).__name__})")
            values.append(value)
        specs += [(l, j * len(values) + k, v.shape, v.dtype) for j in range(slots)
                  for k, v in enumerate(values)]
    return specs


def _tag_metric_nodes(ir_model, stats_index: Sequence[int]) -> int:
    """Prefix the change-metric nodes of every compute branch with ``METRIC_NODE_PREFIX``.

    In the else branch of the l-th top-level ``If``, the metric nodes are the ancestors of
    output ``stats_index[l]`` (the stats) that no other output depends on. Tagging them lets
    a TensorRT build keep exactly these layers in float32 under an fp16/bf16 flag. Returns
    the count."""
    tagged = 0
    ifs = [node for node in ir_model.graph if node.op_type == "If"]
    for node, stats in zip(ifs, stats_index):
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

        others = ancestors([v for i, v in enumerate(branch.outputs) if i != stats])
        for n in ancestors(branch.outputs[stats:stats + 1]) - others:
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

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "onnx": onnx.__version__, "foresight_compile": __version__}


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
                path: str | pathlib.Path, policy: str = "budget", *, opset: int | None = None,
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
            ``recompute_every``, ``threshold``, ``decision``, ``num_steps``, ``order``,
            ``tolerance``, ``max_run``); the ONNX graph depends only on the forecast
            ``order`` (the history each block keeps, and the ``forecast_weights`` input).
    Guarantees: the file passes ``onnx.checker`` (full check), strict shape inference gives
    every output the static shape the manifest records, and the top-level ``If`` count is
    the block count. Raises ``ForesightValueError`` for bad arguments, ``BlockDiscoveryError``
    when the model has no block stack, ``ExportError`` when tracing or exporting fails."""
    import onnx
    import onnx_ir as ir

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
        if RESERVED_NAMES.match(name):
            raise ForesightValueError(f"input name {name!r} collides with a name the export "
                                      f"reserves (reuse_mask, cache_*, output_*, block_stats)")

    nested = [k for k, v in example_inputs.items() if not isinstance(v, torch.Tensor) and any(
        isinstance(t, torch.Tensor) and t.is_floating_point()
        for t in torch.utils._pytree.tree_leaves(v))]
    if nested:
        # Baked in as constants (only top-level tensor arguments become ONNX inputs). Right
        # for per-resolution tables (HunyuanDiT's image_rotary_emb), wrong for the latent
        # (Cosmos 3's vision_tokens=[latent]): engines then refuse any other value.
        warnings.warn(
            f"example_inputs {nested} hold floating-point tensors inside a list, tuple or "
            f"dict: they are baked into the model as constants, and engines will refuse any "
            f"other value. If one of them changes between calls (the latent), export a "
            f"wrapper module whose forward takes it as a tensor argument", stacklevel=2)
    gm, graph_inputs = capture_graph(model, example_inputs)
    rewrite_for_onnx(gm)
    stack = find_blocks(gm)
    segmented = partition_blocks(gm, stack)
    slots = options.forecast_order + 1
    # A policy serving whole steps caches the region exit alone: one If around the region.
    exit_block = region_exit(segmented) if get_policy(options.policy).step_level else None
    if exit_block is not None and len(stack) > 1:
        form, units = collapse_region(segmented, exit_block), (exit_block,)
    else:
        form, units = segmented, tuple(range(len(stack)))
    graph = insert_cache_branches(form, slots=slots, units=units)

    # Placeholders are user inputs (matched by identity: Dynamo hands the backend the very
    # tensors of the call) or weights and buffers, which are baked in.
    tensors = {k: v for k, v in example_inputs.items() if isinstance(v, torch.Tensor)}
    placeholder_slots, constants, user_names = [], {}, []
    for node, value in zip(gm.graph.find_nodes(op="placeholder"), graph_inputs):
        if not isinstance(value, torch.Tensor):
            raise ExportError(f"graph input {node.name} is a {type(value).__name__}, not a "
                              f"tensor: export needs static shapes")
        user = next((k for k, t in tensors.items() if t is value), None)
        if user is not None and user not in user_names:
            placeholder_slots.append(("user", len(user_names)))
            user_names.append(user)
        else:
            placeholder_slots.append(("const", node.name))
            constants[node.name] = value
    timestep_index = find_timestep_input(gm, graph_inputs)
    timestep_slot = placeholder_slots[timestep_index]
    latent_slot = placeholder_slots[find_latent_input(gm, graph_inputs)]
    if timestep_slot[0] != "user":
        raise BlockDiscoveryError("the timestep is not one of example_inputs' tensors: engines "
                                  "need it as an input to count steps")

    specs = _cache_specs(form, units, slots)
    num_blocks = len(stack)
    device = tensors[user_names[timestep_slot[1]]].device  # the graph's device (CPU or CUDA)
    caches = [torch.zeros(shape, dtype=dtype, device=device) for _, _, shape, dtype in specs]
    mask = torch.zeros(num_blocks, dtype=torch.bool, device=device)
    weights = (torch.zeros(num_blocks, slots, device=device),) if slots > 1 else ()
    module = _GraphFormModule(placeholder_slots, constants, graph).eval()
    args = (*[tensors[k] for k in user_names], mask, *weights, *caches)
    with torch.no_grad():
        result = module(*args)
    num_outputs = len(result) - 1 - len(caches)
    cache_specs = tuple(CacheSpec(l, k, TensorSpec(f"cache_{l}_{k}", tuple(shape), dtype_name(dtype)),
                                  f"new_cache_{l}_{k}") for l, k, shape, dtype in specs)
    outputs = tuple(TensorSpec.of(f"output_{i}", t) for i, t in enumerate(result[:num_outputs]))
    input_specs = tuple(TensorSpec.of(k, tensors[k]) for k in user_names)
    weights_spec = TensorSpec.of(WEIGHTS_NAME, weights[0]) if weights else None
    input_names = [*user_names, MASK_NAME, *([WEIGHTS_NAME] if weights else []),
                   *(c.input.name for c in cache_specs)]
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
    _tag_metric_nodes(ir_model, [len(next(iter(form.gm.get_submodule(name).graph.find_nodes(
        op="output"))).args[0]) for name in form.block_submods])
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
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except onnx.shape_inference.InferenceError:
        # onnx (<= 1.23 at least) data propagation inside an If branch can infer a wrong
        # rank for Reshape(x, Concat(Slice(Shape(x)), ...)) when the Slice bounds are
        # initializers of the outer graph; torch.onnx emits that for data-dependent shapes
        # (Mochi's attention keeps only the valid text tokens). The model is valid
        # (checker passed, onnxruntime runs it): infer without data propagation; the
        # output shapes below are still checked against the manifest.
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=False)
    _, out_specs, ifs = onnx_io(inferred)
    manifest = Manifest(
        model_file=path.name, model_sha256=sha256_of(path), opset=_opset(proto),
        inputs=input_specs, timestep_input=user_names[timestep_slot[1]],
        constants={k: repr(v) for k, v in example_inputs.items() if k not in tensors},
        unused_inputs=tuple(k for k in tensors if k not in user_names),
        reuse_mask=TensorSpec.of(MASK_NAME, mask), caches=cache_specs, outputs=outputs,
        block_stats=TensorSpec(STATS_NAME, (len(units), STATS_COLUMNS), "float32"),
        forecast_weights=weights_spec, history_slots=slots,
        latent_input=user_names[latent_slot[1]] if latent_slot[0] == "user" else None,
        blocks=tuple(b.path for b in stack.blocks), policy=policy_record(options),
        versions=_versions(), model_class=f"{type(model).__module__}.{type(model).__qualname__}",
        external_data=data_name if large else None, units=units)
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
