"""ONNX export of the graph form (one If per block) and the onnxruntime engine."""
import dataclasses
import json

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
import onnx  # noqa: E402

import foresight_compile  # noqa: E402
from conftest import rel_err  # noqa: E402
from foresight_compile import models  # noqa: E402
from foresight_compile.errors import ForesightValueError  # noqa: E402
from foresight_compile.export import export_onnx  # noqa: E402
from foresight_compile.runtime.engines.manifest import (ManifestMismatchError,  # noqa: E402
                                                        manifest_path_for, read_manifest,
                                                        write_manifest)
from foresight_compile.runtime import OrtEngine  # noqa: E402

POLICY = {"warmup": 3, "recompute_every": 2, "threshold": 50.0}
STEPS = 20


def _export(tmp_path_factory, name):
    dit = models.FACTORIES[name](layers=2)
    path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
    example = dit.inputs(torch.randn(dit.latent_shape), torch.tensor([999.0]))
    return dit, export_onnx(dit.model, example, path, policy="foresight", **POLICY)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return _export(tmp_path_factory, "wan")


@pytest.fixture(scope="module")
def cogvideox(tmp_path_factory):
    return _export(tmp_path_factory, "cogvideox")


@pytest.fixture(params=["wan", "cogvideox"])
def exported(request):
    return request.getfixturevalue(request.param)


def _top_level_ifs(path):
    model = onnx.load(str(path), load_external_data=False)
    return [n for n in model.graph.node if n.op_type == "If"], model


def test_one_if_per_block_with_mask_caches_and_stats_as_explicit_io(exported):
    dit, ex = exported
    ifs, model = _top_level_ifs(ex.onnx_path)
    assert len(ifs) == len(ex.manifest.blocks) == 2
    inputs = {v.name: v for v in model.graph.input}
    outputs = [v.name for v in model.graph.output]
    assert {"hidden_states", "timestep", "encoder_hidden_states", "reuse_mask"} <= set(inputs)
    for cache in ex.manifest.caches:
        assert cache.input.name in inputs and cache.output in outputs
    assert "block_stats" in outputs
    # static shapes everywhere: every dimension is a number
    for v in [*model.graph.input, *model.graph.output]:
        assert all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim), v.name
    # the predicate of If l is reuse_mask[l]; then = serve (no MatMul), else = compute
    for node in ifs:
        branches = {a.name: a.g for a in node.attribute}
        assert not any(n.op_type == "MatMul" for n in branches["then_branch"].node)
        assert any(n.op_type == "MatMul" for n in branches["else_branch"].node)
    # weights are initializers, not inputs; the large ones live in the external file
    assert not any(i.name in inputs for i in model.graph.initializer)
    external = [i for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(i.ByteSize() < 4096 for i in model.graph.initializer
                            if i.data_location != onnx.TensorProto.EXTERNAL)
    assert (ex.onnx_path.parent / ex.manifest.external_data).is_file()


def test_manifest_records_io_blocks_policy_opset_and_versions(wan):
    _, ex = wan
    data = json.loads(manifest_path_for(ex.onnx_path).read_text())
    assert ex.manifest_path == manifest_path_for(ex.onnx_path)
    assert data["blocks"] == ["blocks.0", "blocks.1"] and data["if_nodes"] == 2
    assert data["policy"] == {"policy": "foresight", "warmup": 3, "recompute_every": 2,
                              "threshold": 50.0, "decision": "per_layer", "num_steps": None,
                              "order": None, "tolerance": 0.4, "max_run": None}
    assert data["history_slots"] == 1 and data["forecast_weights"] is None
    assert data["latent_input"] == "hidden_states"
    assert data["block_stats"]["shape"] == [2, 5]
    assert data["opset"] >= 18 and data["versions"]["torch"] == torch.__version__
    assert "diffusers" in data["versions"]
    assert data["reuse_mask"] == {"name": "reuse_mask", "shape": [2], "dtype": "bool"}
    assert [c["input"]["name"] for c in data["caches"]] == ["cache_0_0", "cache_1_0"]
    assert data["caches"][1]["input"]["shape"] == [1, 512, 24]
    assert data["timestep_input"] == "timestep" and data["constants"] == {"return_dict": "False"}
    assert read_manifest(ex.manifest_path) == ex.manifest


def _torch_run(dit, policy, steps=STEPS):
    compiled = torch.compile(dit.model, backend="foresight",
                             options={"policy": policy, **POLICY, "lowering": "eager", "strict": True})
    out = models.denoise(compiled, dit, steps)
    return out, foresight_compile.stats(compiled)


@pytest.mark.parametrize("policy", ["none", "foresight"])
def test_ort_engine_matches_torch_foresight_path(exported, policy):
    dit, ex = exported
    expected, torch_stats = _torch_run(dit, policy)
    engine = OrtEngine(ex.onnx_path, policy=policy)
    got = models.denoise(engine, dit, STEPS)
    stats = engine.stats()
    assert stats.mask == torch_stats.mask  # same decisions, step by step
    assert rel_err(got, expected) < 1e-4
    if policy == "foresight":
        assert 0 < stats.reused_fraction < 1
        assert stats.block_computes == torch_stats.block_computes
        # one value per block both ways; the engine in two banks (reads one, writes the other)
        assert stats.cache_bytes == 2 * torch_stats.cache_bytes
        # the stats the engine fed back are the torch path's change metrics and thresholds
        torch.testing.assert_close(torch.tensor(stats.change), torch.tensor(torch_stats.change),
                                   rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(torch.tensor(stats.thresholds),
                                   torch.tensor(torch_stats.thresholds), rtol=1e-3, atol=1e-6)
    else:
        assert stats.reused_fraction == 0


def test_two_calls_per_step_get_their_own_branch_and_cache_banks(wan):
    dit, ex = wan
    uncond = torch.zeros_like(dit.text)

    def cfg_loop(model):
        import diffusers
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        scheduler.set_timesteps(12)
        x = torch.randn(dit.latent_shape, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            for t in scheduler.timesteps:
                ts = t.expand(1)
                cond = model(hidden_states=x, timestep=ts, encoder_hidden_states=dit.text,
                             return_dict=False)[0]
                free = model(hidden_states=x, timestep=ts, encoder_hidden_states=uncond,
                             return_dict=False)[0]
                x = scheduler.step(free + 3.0 * (cond - free), t, x).prev_sample
        return x

    compiled = torch.compile(dit.model, backend="foresight",
                             options={"policy": "foresight", **POLICY, "lowering": "eager"})
    expected = cfg_loop(compiled)
    engine = OrtEngine(ex.onnx_path)
    got = cfg_loop(engine)
    stats = engine.stats()
    assert stats.branch[:4] == [0, 1, 0, 1]
    assert stats.mask == foresight_compile.stats(compiled).mask and stats.reused_fraction > 0
    assert rel_err(got, expected) < 1e-4
    assert set(engine.cache_addresses(0)).isdisjoint(engine.cache_addresses(1))


def test_cache_buffers_are_preallocated_once_and_keep_their_addresses(wan):
    dit, ex = wan
    engine = OrtEngine(ex.onnx_path)
    seen, held = [], []

    def record(_):
        seen.append(engine.cache_addresses(0))
        state = engine.controller.live_states()[0]
        held.append(tuple(t.data_ptr() for ts in state.buffers.tensors for t in ts))

    models.denoise(engine, dit, 8, on_step=record)
    assert len(set(seen)) == 1  # the banks never move
    banks = seen[0]
    assert len(banks) == 2 * len(ex.manifest.caches)
    # the controller's cache view alternates between the two banks, nothing else
    assert set(held) == {banks[:2], banks[2:]}
    assert held[0] != held[1]
    assert engine.stats().cache_bytes == sum(c.input.nbytes for c in ex.manifest.caches) * 2


def test_model_and_manifest_mismatch_is_refused(wan, cogvideox, tmp_path):
    _, wan_ex = wan
    _, cog_ex = cogvideox
    with pytest.raises(ManifestMismatchError, match="cache_0_1"):  # CogVideoX has two per block
        OrtEngine(wan_ex.onnx_path, manifest=cog_ex.manifest_path)
    wrong = dataclasses.replace(
        wan_ex.manifest, caches=(dataclasses.replace(
            wan_ex.manifest.caches[0], input=dataclasses.replace(wan_ex.manifest.caches[0].input,
                                                                 shape=(1, 256, 24))),
            *wan_ex.manifest.caches[1:]))
    write_manifest(wrong, tmp_path / "wrong.json")
    with pytest.raises(ManifestMismatchError, match=r"cache_0_0.*\[1, 256, 24\].*\[1, 512, 24\]"):
        OrtEngine(wan_ex.onnx_path, manifest=tmp_path / "wrong.json")
    # same inputs and outputs, different file: the SHA-256 catches it
    model = onnx.load(str(wan_ex.onnx_path), load_external_data=False)
    model.doc_string = "edited"
    (tmp_path / wan_ex.manifest.external_data).symlink_to(
        wan_ex.onnx_path.parent / wan_ex.manifest.external_data)
    onnx.save(model, str(tmp_path / wan_ex.onnx_path.name))
    with pytest.raises(ManifestMismatchError, match="SHA-256"):
        OrtEngine(tmp_path / wan_ex.onnx_path.name, manifest=wan_ex.manifest_path)
    with pytest.raises(ManifestMismatchError, match="no manifest"):
        OrtEngine(tmp_path / wan_ex.onnx_path.name)


def test_engine_arguments_are_checked_against_the_export(wan):
    dit, ex = wan
    engine = OrtEngine(ex.onnx_path)
    good = dit.inputs(torch.randn(dit.latent_shape), torch.tensor([999.0]))
    with pytest.raises(ValueError, match=r"hidden_states.*\[1, 4, 8, 8, 8\].*\[1, 4, 8, 16, 16\]"):
        engine(**{**good, "hidden_states": torch.randn(1, 4, 8, 8, 8)})
    with pytest.raises(ValueError, match="return_dict"):
        engine(**{**good, "return_dict": True})
    with pytest.raises(ValueError, match="unknown argument 'attention_kwargs'"):
        engine(**good, attention_kwargs={})
    with pytest.raises(ValueError, match="missing input"):
        engine(hidden_states=good["hidden_states"], timestep=good["timestep"])
    with pytest.raises(ForesightValueError, match="unknown policy option 'lowering'"):
        OrtEngine(ex.onnx_path, lowering="eager")
    assert engine.stats().steps == 0  # refused calls never reached the controller


def test_export_rejects_bad_arguments_before_tracing(tmp_path):
    dit = models.wan(layers=2)
    example = dit.inputs(torch.randn(dit.latent_shape), torch.tensor([999.0]))
    with pytest.raises(ForesightValueError, match="dict of the keyword arguments"):
        export_onnx(dit.model, tuple(example.values()), tmp_path / "m.onnx")
    with pytest.raises(ForesightValueError, match="unknown policy option 'form'"):
        export_onnx(dit.model, example, tmp_path / "m.onnx", form="graph")
    with pytest.raises(ForesightValueError, match="threshold"):
        export_onnx(dit.model, example, tmp_path / "m.onnx", threshold=-1.0)
    with pytest.raises(ForesightValueError, match=r"\.onnx"):
        export_onnx(dit.model, example, tmp_path / "m.bin")
    assert not list(tmp_path.iterdir())
