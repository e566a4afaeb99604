"""The third shipped trained model: a velocity-predicting HunyuanVideo (dual-stream blocks,
then single-stream blocks), called as HunyuanVideoPipeline calls it."""
from __future__ import annotations

import json

import pytest
import torch

import foresight_compile
from conftest import rel_err
from foresight_compile import models
from foresight_compile.models import tiny_hunyuan as th
from foresight_compile.models import tiny_video as tv
from foresight_compile.program import programs_of

CHECK_PROMPTS = 10
CHECK_STEPS = 30
BLOCKS = [f"transformer_blocks.{i}" for i in range(2)] + [
    f"single_transformer_blocks.{i}" for i in range(6)]


def test_shipped_weights_load_in_diffusers_layout_under_25_mb():
    files = [p for p in th.WEIGHTS_DIR.rglob("*") if p.is_file()]
    names = {p.relative_to(th.WEIGHTS_DIR).as_posix() for p in files}
    assert {"tiny_hunyuan_video.json", "transformer/config.json", "prompt_encoder/config.json",
            "transformer/diffusion_pytorch_model.safetensors",
            "prompt_encoder/diffusion_pytorch_model.safetensors"} <= names
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    transformer, encoder, scheduler_config = models.tiny_hunyuan_dit()
    assert type(transformer).__name__ == "HunyuanVideoTransformer3DModel"  # plain diffusers class
    expected = th.transformer_config()
    got = {k: transformer.config[k] for k in expected}
    assert {**got, "rope_axes_dim": tuple(got["rope_axes_dim"])} == expected
    assert not transformer.training and scheduler_config == tv.SCHEDULER_CONFIG
    assert isinstance(encoder, th.TinyHunyuanPromptEncoder)
    meta = json.loads((th.WEIGHTS_DIR / th.META_FILE).read_text())
    assert meta["training"]["steps"] > 0 and "velocity" in meta["prediction"]


def test_prompt_encoder_gives_the_pipelines_three_text_inputs():
    encoder = th.TinyHunyuanPromptEncoder()
    text = encoder.encode(["red circle moving right fast",
                           "blue square moving up slow and green triangle moving left fast"])
    assert text.encoder_hidden_states.shape == (2, 8, 64)
    assert text.pooled_projections.shape == (2, 64)
    # the <none> slots of a one-object prompt are padding, masked as a tokenizer's
    assert text.encoder_attention_mask.tolist() == [[1.0] * 4 + [0.0] * 4, [1.0] * 8]
    null = encoder.null(1)
    assert null.encoder_attention_mask.tolist() == [[1.0] * 8]  # never empty
    assert torch.isfinite(null.pooled_projections).all()


def test_the_workload_calls_the_model_as_hunyuan_video_pipeline_does():
    dit = models.tiny_hunyuan_workload(prompts=2)
    kwargs = dit.inputs(torch.zeros(dit.latent_shape), torch.tensor([1000.0, 1000.0]))
    # HunyuanVideoPipeline.__call__'s transformer call (diffusers 0.42)
    assert set(kwargs) == {"hidden_states", "timestep", "encoder_hidden_states",
                           "encoder_attention_mask", "pooled_projections", "guidance",
                           "attention_kwargs", "return_dict"}
    assert kwargs["guidance"].tolist() == [1000.0, 1000.0]  # guidance_scale * 1000
    assert kwargs["return_dict"] is False and kwargs["attention_kwargs"] is None
    assert dit.latent_shape == (2, 3, 8, 32, 32)


@pytest.fixture(scope="module")
def shipped_samples():
    transformer, encoder, scheduler_config = th.load_tiny_hunyuan()
    prompts = tv.evaluation_prompts(CHECK_PROMPTS)
    return prompts, th.sample(transformer, encoder, scheduler_config, prompts, steps=CHECK_STEPS)


def test_shipped_model_draws_the_prompted_colour_moving_the_prompted_way(shipped_samples):
    prompts, frames = shipped_samples
    report = tv.evaluate_samples(frames, prompts)
    assert report.colour_accuracy >= 0.9, report
    assert report.direction_accuracy >= 0.6, report


def test_random_weights_fail_the_same_check(shipped_samples):
    prompts, _ = shipped_samples
    model = th.build_tiny_hunyuan(seed=0)
    frames = th.sample(model.transformer, model.prompt_encoder, model.scheduler_config,
                       prompts[:4], steps=4)
    report = tv.evaluate_samples(frames, prompts[:4])
    assert report.colour_accuracy < 0.5 and report.direction_accuracy < 0.5, report


def test_the_model_predicts_the_velocity_the_scheduler_expects():
    """x_t = (1 - s) x0 + s noise: at s = 1 the clean estimate x_t - s v is a clip in range."""
    transformer, encoder, _ = th.load_tiny_hunyuan()
    noise = tv.initial_noise([0])
    with torch.no_grad():
        v = th.velocity(transformer, noise, torch.tensor([1000.0]),
                        encoder.encode(["red circle moving right fast"]))
    x0 = noise - v
    assert v.shape == noise.shape and x0.abs().mean() < noise.abs().mean()


def test_the_default_policy_serves_dual_and_single_stream_blocks_as_one_region():
    """The eight blocks carry (video, text) from the first dual-stream block to the last
    single-stream one: one stack, and under the default policy one region whose exit alone
    keeps a cache (the 1-block token refiner is no stack); a served step keeps what the
    model draws. Eager lowering: the decisions are the segments', Inductor's compile is
    the slow test's."""
    dit = models.tiny_hunyuan_workload(prompts=4)
    steps = 20
    reference = models.denoise(dit.model, dit, steps)
    fast = torch.compile(dit.model, backend="foresight",
                         options={"strict": True, "lowering": "eager"})
    with foresight_compile.generation(num_steps=steps):
        out = models.denoise(fast, dit, steps)
    s = foresight_compile.stats(fast)
    assert s.accelerated and s.policy == "budget" and s.blocks == BLOCKS
    (program,) = programs_of(dit.model)
    assert program.layout.cached == (False,) * (len(BLOCKS) - 1) + (True,)
    assert all(all(row) or not any(row) for row in s.mask)  # a step serves all or none
    assert s.reused_fraction >= 0.3
    assert rel_err(out, reference) > 1e-5  # it really reused
    drawn = tv.evaluate_samples(out, dit.prompts)
    uncached = tv.evaluate_samples(reference, dit.prompts)
    assert drawn.colour_accuracy >= uncached.colour_accuracy, (drawn, uncached)
    assert drawn.direction_accuracy >= uncached.direction_accuracy, (drawn, uncached)


@pytest.mark.slow
def test_policy_none_reproduces_plain_torch_compile():
    """Two Inductor compiles of the whole model: ~4 min on 2 shared CPU cores with a cold
    Inductor cache, ~30 s with a warm one."""
    dit = models.tiny_hunyuan_workload(prompts=2)
    steps = 6
    inductor = models.denoise(torch.compile(dit.model, backend="inductor"), dit, steps)
    torch._dynamo.reset()
    ours = torch.compile(dit.model, backend="foresight", options={"policy": "none", "strict": True})
    out = models.denoise(ours, dit, steps)
    assert rel_err(out, inductor) <= 1e-5
    s = foresight_compile.stats(ours)
    assert s.blocks == BLOCKS and s.reused_fraction == 0.0 and s.cache_bytes == 0
    assert s.block_computes == [steps] * len(BLOCKS)


def test_policy_none_eager_lowering_is_bitwise_the_model():
    dit = models.tiny_hunyuan_workload(prompts=2)
    eager = models.denoise(dit.model, dit, 4)
    ours = torch.compile(dit.model, backend="foresight",
                         options={"policy": "none", "lowering": "eager", "strict": True})
    assert torch.equal(models.denoise(ours, dit, 4), eager)
    assert foresight_compile.stats(ours).blocks == BLOCKS
