"""Every diffusers family the torch path caches exports and runs in onnxruntime: with reuse
off it equals the torch output, with the default policy it makes the torch path's
decisions. The default policy serves whole steps, so its export is ONE ``If`` around the
block region, whose serve branch runs the exit's forecast and nothing of any block.

A few families run in the default suite; the rest are marked slow (the benchmark job of
``.ci/run`` runs them). Mochi needs ``torch._dynamo.config.capture_dynamic_output_shape_ops``
(its attention keeps the valid text tokens with ``nonzero``); Cosmos 3 is exported through
the wrapper a user needs (its latent arrives in a list, which export would bake in).
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import foresight_compile  # noqa: E402
from conftest import rel_err  # noqa: E402
from foresight_compile.models.families import FAMILIES  # noqa: E402
from foresight_compile import models  # noqa: E402
from foresight_compile.runtime import OrtEngine  # noqa: E402

STEPS = 10
QUICK = ("wan", "flux")  # two-stream-then-single-stream covered by Flux; the rest in the slow job
EXPORTED = ("wan", "cogvideox", "latte", "pixart", "ltx", "sd3", "hunyuan_video", "flux",
            "skyreels_v2", "allegro", "mochi", "qwenimage", "cosmos", "cosmos3_denoiser")
POLICY = {"tolerance": 1.0}  # the default policy, loose enough to reuse in 10 random steps


def _params():
    return [pytest.param(name, marks=() if name in QUICK else pytest.mark.slow)
            for name in EXPORTED]


def _dynamo(name: str):
    return torch._dynamo.config.patch(capture_dynamic_output_shape_ops=(name == "mochi"))


def _torch_run(family, options):
    torch._dynamo.reset()
    with _dynamo(family.name):
        fast = torch.compile(family.model, backend="foresight",
                             options={**options, "lowering": "eager", "strict": True})
        with foresight_compile.generation(num_steps=STEPS):
            out = models.denoise(fast, family, STEPS)
    return out, foresight_compile.stats(fast)


@pytest.mark.parametrize("name", _params())
def test_family_exports_and_runs_in_onnxruntime(name, tmp_path):
    family = FAMILIES[name]()
    with _dynamo(name):
        exported = foresight_compile.export_onnx(family.model, family.example,
                                                 tmp_path / f"{name}.onnx", **POLICY)
    manifest = exported.manifest
    blocks, slots = len(manifest.blocks), manifest.history_slots
    assert blocks >= 2 and slots == 2
    import onnx
    graph = onnx.load(str(exported.onnx_path), load_external_data=False).graph
    (region,) = [n for n in graph.node if n.op_type == "If"]
    assert manifest.units == (blocks - 1,)  # the If stands for the exit block
    assert {c.block for c in manifest.caches} == {blocks - 1}  # the exit alone holds a cache
    serve = onnx.helper.get_attribute_value(
        next(a for a in region.attribute if a.name == "then_branch"))
    # One forecast of the exit's values, its history kept, nothing of any block.
    exit_values = len(manifest.caches) // slots
    assert len(serve.output) == exit_values * (1 + slots) + 1
    assert not any(n.op_type in ("MatMul", "Gemm", "Softmax", "LayerNormalization")
                   for n in serve.node)

    expected, _ = _torch_run(family, {"policy": "none"})
    off = OrtEngine(exported.onnx_path, policy="none")
    with foresight_compile.generation(num_steps=STEPS):
        got = models.denoise(off, family, STEPS)
    assert rel_err(got, expected) <= 1e-4, rel_err(got, expected)

    expected, torch_stats = _torch_run(family, POLICY)
    engine = OrtEngine(exported.onnx_path)
    with foresight_compile.generation(num_steps=STEPS):
        got = models.denoise(engine, family, STEPS)
    assert engine.stats().mask == torch_stats.mask and torch_stats.reused_fraction > 0
    assert rel_err(got, expected) <= 1e-3, rel_err(got, expected)
    torch._dynamo.reset()
