"""TensorRT lowering: everything that needs no GPU (settings, binding plan, which layers stay
float32, manifest and engine-file checks, the install hint). Building and running an engine
is examples/gpu_check.py's job on a GPU machine."""
import dataclasses
import importlib.util

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402

import foresight_compile  # noqa: E402
from foresight_compile.errors import ForesightValueError  # noqa: E402
from foresight_compile.export import export_onnx  # noqa: E402
from foresight_compile.export.tensorrt import (BuildSettings, engine_manifest,  # noqa: E402
                                               metric_layers)
from foresight_compile.runtime.engines.manifest import (  # noqa: E402
    METRIC_NODE_PREFIX, ManifestMismatchError, TensorSpec, binding_plan, check_against_manifest,
    manifest_mismatches, manifest_path_for, write_manifest)
from foresight_compile.runtime.engines.tensorrt import (  # noqa: E402
    TensorRTUnavailableError, TrtEngine, trt_dtype_name, verify_engine_file)
from toy import ToyDiT  # noqa: E402

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("toy") / "toy.onnx"
    example = {"hidden_states": torch.randn(1, 4, 8), "timestep": torch.tensor([999.0])}
    return export_onnx(ToyDiT(dim=8, layers=3), example, path, policy="static", warmup=2)


def test_binding_plan_reads_one_cache_bank_and_writes_the_other(toy):
    plan = binding_plan(toy.manifest)
    for parity in (0, 1):
        rows = {name: (role, index, bank) for name, role, index, bank in plan.bindings(parity)}
        assert set(rows) == {s.name for s in (*toy.manifest.engine_inputs,
                                              *toy.manifest.engine_outputs)}
        for k, cache in enumerate(toy.manifest.caches):
            assert rows[cache.input.name] == ("cache_in", k, parity)
            assert rows[cache.output] == ("cache_out", k, 1 - parity)
        assert rows["reuse_mask"] == ("mask", 0, -1) and rows["hidden_states"][2] == -1
    with pytest.raises(ValueError, match="parity must be 0 or 1"):
        plan.bindings(2)


def test_change_metric_nodes_are_tagged_only_inside_compute_branches(toy):
    model = onnx.load(str(toy.onnx_path))
    for node in (n for n in model.graph.node if n.op_type == "If"):
        branches = {a.name: a.g for a in node.attribute}
        compute = branches["else_branch"]
        tagged = [n for n in compute.node if n.name.startswith(METRIC_NODE_PREFIX)]
        assert {"ReduceSum", "Sub"} <= {n.op_type for n in tagged}
        assert not {"MatMul", "Gemm", "LayerNormalization"} & {n.op_type for n in tagged}
        stats_output = compute.output[-1].name
        assert any(stats_output in n.output for n in tagged)  # the stats come from the metric
        block_outputs = {o.name for o in compute.output[:-1]}
        assert not any(block_outputs & set(n.output) for n in tagged)
        assert not any(n.name.startswith(METRIC_NODE_PREFIX) for n in branches["then_branch"].node)


def test_metric_layers_pins_floating_outputs_of_tagged_layers_only():
    layers = [("node_MatMul_3", ["float16"]), (METRIC_NODE_PREFIX + "node_Sub_7", ["float16"]),
              (METRIC_NODE_PREFIX + "node_IsNaN_9", ["bool"]),
              (METRIC_NODE_PREFIX + "node_Split_2_1", ["float32", "bool", "bfloat16"])]
    assert metric_layers(layers) == [(1, (0,)), (3, (0, 2))]
    assert metric_layers(layers, prefix="none/") == []


def test_build_settings_reject_bad_values_naming_the_field():
    assert BuildSettings().strongly_typed and not BuildSettings(precision="fp16").strongly_typed
    with pytest.raises(ForesightValueError, match="precision got 'int8'"):
        BuildSettings(precision="int8")
    with pytest.raises(ForesightValueError, match="workspace_bytes"):
        BuildSettings(workspace_bytes=0)
    with pytest.raises(ForesightValueError, match="optimization_level"):
        BuildSettings(optimization_level=True)


def test_tensorrt_dtype_names_map_to_manifest_dtypes():
    assert trt_dtype_name("DataType.HALF") == "float16"
    assert trt_dtype_name("DataType.BOOL") == "bool"

    class Fake:
        name = "BF16"
    assert trt_dtype_name(Fake()) == "bfloat16"
    with pytest.raises(ForesightValueError, match="FP8"):
        trt_dtype_name("DataType.FP8")


def test_engine_io_that_differs_from_the_manifest_is_refused(toy):
    manifest = toy.manifest
    inputs = list(manifest.engine_inputs)
    outputs = [dataclasses.replace(s, dtype="float16") if s.name == "output_0" else s
               for s in manifest.engine_outputs]
    assert manifest_mismatches(manifest, inputs[::-1], manifest.engine_outputs) == []  # order free
    with pytest.raises(ManifestMismatchError, match=r"output 'output_0': manifest says float32"):
        check_against_manifest(manifest, inputs, outputs, what="TensorRT engine")
    problems = manifest_mismatches(manifest, inputs[:-1] + [TensorSpec("extra", (1,), "bool")],
                                   manifest.engine_outputs, if_nodes=2)
    assert any("'cache_2_0' is in the manifest but not in the model" in p for p in problems)
    assert any("'extra' is in the model but not in the manifest" in p for p in problems)
    assert any("2 top-level If nodes" in p for p in problems)


def test_engine_file_is_checked_against_its_manifest(toy, tmp_path):
    engine = tmp_path / "toy.plan"
    engine.write_bytes(b"serialized engine")
    manifest = engine_manifest(toy.manifest, engine, BuildSettings(precision="fp16"), "10.9.0")
    assert manifest.extra["tensorrt"]["precision"] == "fp16"
    verify_engine_file(engine, manifest)  # the file it was written for passes
    engine.write_bytes(b"another engine")
    with pytest.raises(ManifestMismatchError, match="SHA-256"):
        verify_engine_file(engine, manifest)
    with pytest.raises(ManifestMismatchError, match="describes an ONNX model"):
        verify_engine_file(engine, toy.manifest)


@pytest.mark.skipif(HAS_TENSORRT, reason="checks the message on a machine without TensorRT")
def test_without_tensorrt_the_error_says_how_to_install_it(toy, tmp_path):
    with pytest.raises(TensorRTUnavailableError, match="pip install") as info:
        foresight_compile.export_tensorrt(toy.onnx_path, tmp_path / "toy.plan")
    assert isinstance(info.value, ImportError)
    assert not (tmp_path / "toy.plan").exists()
    engine = tmp_path / "toy.plan"
    engine.write_bytes(b"serialized engine")
    write_manifest(engine_manifest(toy.manifest, engine, BuildSettings(), "10.9.0"),
                   manifest_path_for(engine))
    with pytest.raises(TensorRTUnavailableError, match="tensorrt"):
        TrtEngine(engine)


def test_export_tensorrt_checks_the_onnx_model_before_anything_else(toy, tmp_path):
    other = dataclasses.replace(toy.manifest, model_sha256="0" * 64)
    write_manifest(other, tmp_path / "other.json")
    with pytest.raises(ManifestMismatchError, match="SHA-256"):
        foresight_compile.export_tensorrt(toy.onnx_path, tmp_path / "toy.plan",
                                          manifest=tmp_path / "other.json")
    with pytest.raises(ForesightValueError, match="precision"):
        foresight_compile.export_tensorrt(toy.onnx_path, tmp_path / "toy.plan", precision="fp8")
