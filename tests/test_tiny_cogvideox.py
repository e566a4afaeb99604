"""The second shipped trained model: a velocity-predicting CogVideoX."""
from __future__ import annotations

import json

import pytest
import torch

import foresight_compile
from conftest import rel_err
from foresight_compile import models
from foresight_compile.models import tiny_cogvideox as tc
from foresight_compile.models import tiny_video as tv

CHECK_PROMPTS = 10
CHECK_STEPS = 30


def test_shipped_weights_load_in_diffusers_layout_under_25_mb():
    files = [p for p in tc.WEIGHTS_DIR.rglob("*") if p.is_file()]
    names = {p.relative_to(tc.WEIGHTS_DIR).as_posix() for p in files}
    assert {"tiny_cogvideox.json", "transformer/config.json", "prompt_encoder/config.json",
            "transformer/diffusion_pytorch_model.safetensors",
            "prompt_encoder/diffusion_pytorch_model.safetensors"} <= names
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    transformer, encoder, scheduler_config = models.tiny_cogvideox_dit()
    assert type(transformer).__name__ == "CogVideoXTransformer3DModel"  # plain diffusers class
    expected = tc.transformer_config()
    assert {k: transformer.config[k] for k in expected} == expected
    assert not transformer.training and scheduler_config == tv.SCHEDULER_CONFIG
    meta = json.loads((tc.WEIGHTS_DIR / tc.META_FILE).read_text())
    assert meta["training"]["steps"] > 0 and "velocity" in meta["prediction"]


def test_pack_puts_frame_pairs_on_channels_and_unpack_inverts_it():
    x = torch.randn(2, 3, 8, 4, 4)
    packed = tc.pack(x)
    assert packed.shape == (2, 4, 6, 4, 4)
    assert torch.equal(packed[:, 1, 3:], x[:, :, 3])  # token frame 1, second half: frame 3
    assert torch.equal(tc.unpack(packed), x)


@pytest.fixture(scope="module")
def shipped_samples():
    transformer, encoder, scheduler_config = tc.load_tiny_cogvideox()
    prompts = tv.evaluation_prompts(CHECK_PROMPTS)
    return prompts, tc.sample(transformer, encoder, scheduler_config, prompts, steps=CHECK_STEPS)


def test_shipped_model_draws_the_prompted_colour_moving_the_prompted_way(shipped_samples):
    prompts, frames = shipped_samples
    report = tv.evaluate_samples(frames, prompts)
    assert report.colour_accuracy >= 0.9, report
    assert report.direction_accuracy >= 0.6, report


def test_random_weights_fail_the_same_check(shipped_samples):
    prompts, _ = shipped_samples
    model = tc.build_tiny_cogvideox(seed=0)
    frames = tc.sample(model.transformer, model.prompt_encoder, model.scheduler_config,
                       prompts[:4], steps=4)
    report = tv.evaluate_samples(frames, prompts[:4])
    assert report.colour_accuracy < 0.5 and report.direction_accuracy < 0.5, report


def test_the_model_predicts_the_velocity_the_scheduler_expects():
    """x_t = (1 - s) x0 + s noise: at s = 1 the clean estimate x_t - s v is a clip in range."""
    transformer, encoder, _ = tc.load_tiny_cogvideox()
    noise = tv.initial_noise([0])
    with torch.no_grad():
        v = tc.velocity(transformer, noise, torch.tensor([1000.0]),
                        encoder.encode(["red circle moving right fast"]))
    x0 = noise - v
    assert v.shape == noise.shape and x0.abs().mean() < noise.abs().mean()


def test_the_default_policy_on_it_keeps_what_it_draws():
    dit = models.tiny_cogvideox_workload(prompts=4)
    steps = 20
    reference = models.denoise(dit.model, dit, steps)
    fast = torch.compile(dit.model, backend="foresight", options={"strict": True})
    with foresight_compile.generation(num_steps=steps):
        out = models.denoise(fast, dit, steps)
    assert foresight_compile.stats(fast).reused_fraction >= 0.3
    assert rel_err(out, reference) > 1e-5  # it really reused
    drawn = tv.evaluate_samples(tc.unpack(out), dit.prompts)
    uncached = tv.evaluate_samples(tc.unpack(reference), dit.prompts)
    assert drawn.colour_accuracy >= uncached.colour_accuracy, (drawn, uncached)
    assert drawn.direction_accuracy >= uncached.direction_accuracy, (drawn, uncached)
    torch._dynamo.reset()
