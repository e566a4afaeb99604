"""optimize()/restore() on real diffusers pipelines built from small random components."""
import diffusers
import pytest
import torch

import foresight_compile
from foresight_compile import models
from foresight_compile.pipelines import optimize, restore


def wan_pipe():
    dit = models.wan(layers=2)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True],
                                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=dit.model,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    text = dict(prompt_embeds=torch.randn(1, 12, 16), negative_prompt_embeds=torch.randn(1, 12, 16))
    return pipe, lambda steps, size: pipe(**text, height=size, width=size, num_frames=9,
                                          num_inference_steps=steps, guidance_scale=5.0,
                                          output_type="pt", generator=torch.Generator().manual_seed(0)).frames


def cogvideox_pipe():
    dit = models.cogvideox(layers=2)
    vae = diffusers.AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
        latent_channels=4, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4).eval()
    pipe = diffusers.CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=dit.model,
                                       scheduler=diffusers.CogVideoXDDIMScheduler())
    text = dict(prompt_embeds=torch.randn(1, 8, 8), negative_prompt_embeds=torch.randn(1, 8, 8))
    return pipe, lambda steps, size: pipe(**text, height=size, width=size, num_frames=9,
                                          num_inference_steps=steps, guidance_scale=5.0,
                                          output_type="pt", generator=torch.Generator().manual_seed(0)).frames


def latte_pipe():
    dit = models.latte(layers=2)
    vae = diffusers.AutoencoderKL(block_out_channels=(8, 8), latent_channels=4, norm_num_groups=2,
                                  down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval()
    pipe = diffusers.LattePipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=dit.model,
                                   scheduler=diffusers.DDIMScheduler())
    text = dict(prompt_embeds=torch.randn(1, 8, 8), negative_prompt=None,
                negative_prompt_embeds=torch.randn(1, 8, 8))
    return pipe, lambda steps, size: pipe(**text, height=size, width=size, video_length=8,
                                          num_inference_steps=steps, guidance_scale=5.0,
                                          output_type="pt", generator=torch.Generator().manual_seed(0)).frames


PIPES = {"wan": wan_pipe, "cogvideox": cogvideox_pipe, "latte": latte_pipe}


@pytest.mark.parametrize("name", PIPES)
def test_optimize_none_is_exact_and_restore_gives_back_the_module(name):
    torch.manual_seed(0)
    pipe, run = PIPES[name]()
    reference = run(4, 16 if name != "wan" else 32)
    original, cls = pipe.transformer, type(pipe)
    assert optimize(pipe, policy="none", lowering="eager") is pipe
    assert torch.equal(run(4, 16 if name != "wan" else 32), reference)
    restore(pipe)
    assert pipe.transformer is original and type(pipe) is cls
    assert "cache_context" not in vars(original)
    assert torch.equal(run(4, 16 if name != "wan" else 32), reference)


@pytest.mark.parametrize("name", PIPES)
def test_optimize_reuses_with_cfg_changing_steps_and_sizes(name):
    torch.manual_seed(0)
    pipe, run = PIPES[name]()
    sizes = (32, 48) if name == "wan" else (16, 32)
    optimize(pipe, policy="static", lowering="eager", warmup=0.25, recompute_every=3)
    run(8, sizes[0])
    run(12, sizes[0])
    run(8, sizes[1])
    s = foresight_compile.stats(pipe.transformer)
    branches = 2 if name == "wan" else 1  # Wan names cond/uncond; the others batch CFG
    calls = [8 * branches, 12 * branches, 8 * branches]
    assert s.steps == sum(calls)
    assert len(set(s.branch)) == branches
    starts = [0, calls[0], calls[0] + calls[1]]
    for start, steps in zip(starts, (8, 12, 8)):
        rows = s.mask[start:start + steps * branches]
        steps_seen = s.step[start:start + steps * branches]
        assert steps_seen[:branches] == [0] * branches  # each call: a new generation
        warmup = round(0.25 * steps)  # resolved from num_inference_steps of that call
        assert not any(any(r) for r, st in zip(rows, steps_seen) if st < warmup)
        assert any(any(r) for r in rows)
    with pytest.raises(ValueError, match="already optimized"):
        optimize(pipe)


def test_optimize_validates_options_before_compiling():
    pipe, _ = wan_pipe()
    with pytest.raises(ValueError, match="'treshold'"):
        optimize(pipe, treshold=0.5)
    assert not isinstance(pipe.transformer, torch._dynamo.eval_frame.OptimizedModule)


def wan22_pipe():
    """Wan 2.2's A14B layout: a high-noise `transformer` and a low-noise `transformer_2`
    (different weights, one class), switching at boundary_ratio * 1000."""
    high, low = models.wan(layers=2, seed=0).model, models.wan(layers=2, seed=1).model
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True],
                                     latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=high,
                                 transformer_2=low, boundary_ratio=0.875,
                                 scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    text = dict(prompt_embeds=torch.randn(1, 12, 16), negative_prompt_embeds=torch.randn(1, 12, 16))
    return pipe, lambda steps: pipe(**text, height=32, width=32, num_frames=9,
                                    num_inference_steps=steps, guidance_scale=5.0, output_type="pt",
                                    generator=torch.Generator().manual_seed(0)).frames


def test_wan22_two_experts_each_compiled_with_its_own_generation():
    torch.manual_seed(0)
    pipe, run = wan22_pipe()
    reference = run(30)
    timesteps = pipe.scheduler.timesteps
    high = int((timesteps >= 0.875 * 1000).sum())
    assert 0 < high < 30
    steps = {"transformer": high, "transformer_2": 30 - high}  # what each expert serves
    originals = {n: getattr(pipe, n) for n in steps}
    optimize(pipe, policy="none", lowering="eager")
    for name in steps:
        assert isinstance(getattr(pipe, name), torch._dynamo.eval_frame.OptimizedModule)
    out = run(30)
    assert float((out - reference).norm() / reference.norm()) <= 1e-5
    restore(pipe)
    assert all(getattr(pipe, n) is m for n, m in originals.items())
    assert all("cache_context" not in vars(m) for m in originals.values())
    assert torch.equal(run(30), reference)

    torch._dynamo.reset()
    optimize(pipe, lowering="eager")  # the default policy
    run(30)
    report = foresight_compile.stats(pipe)
    assert isinstance(report, foresight_compile.PipelineStats) and list(report) == list(steps)
    for name, n in steps.items():
        s = report[name]
        assert s.steps == 2 * n  # cond + uncond per step, on its own controller
        assert set(s.step) == set(range(n)) and len(set(s.generation)) == 1
        assert s.reused_fraction > 0, name
        tail = [m for m, st in zip(s.mask, s.step) if st >= n - 2]
        assert not any(any(m) for m in tail)  # the tail of each expert's own generation
    assert foresight_compile.stats(pipe.transformer_2).steps == 2 * steps["transformer_2"]
    assert 0 < report.reused_fraction < 1
    foresight_compile.reset(pipe, clear_stats=True)
    assert all(s.steps == 0 for s in foresight_compile.stats(pipe).values())
    restore(pipe)
    assert all(getattr(pipe, n) is m for n, m in originals.items())


class _TwoExpertsNoBoundary:
    """A pipeline whose second expert takes over after `switch` steps, with no
    boundary_ratio to read: each expert's step count is learned from the call before."""

    def __init__(self, switch: int):
        self.transformer = models.wan(layers=2, seed=0).model
        self.transformer_2 = models.wan(layers=2, seed=1).model
        self.switch = switch
        self.text = torch.randn(1, 12, 16)

    @property
    def components(self):
        return {"transformer": self.transformer, "transformer_2": self.transformer_2}

    @torch.no_grad()
    def __call__(self, num_inference_steps: int = 8):
        x = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
        for i in range(num_inference_steps):
            model = self.transformer if i < self.switch else self.transformer_2
            t = torch.tensor([1000.0 * (1 - i / num_inference_steps)])
            x = x - 0.1 * model(hidden_states=x, timestep=t, encoder_hidden_states=self.text,
                                return_dict=False)[0]
        return x


def test_expert_steps_without_a_boundary_are_learned_from_the_previous_call():
    pipe = _TwoExpertsNoBoundary(switch=3)
    optimize(pipe, policy="static", lowering="eager", warmup=0.34, recompute_every=100)
    pipe(num_inference_steps=10)  # first call: each expert assumes the pipeline's 10 steps
    foresight_compile.reset(pipe, clear_stats=True)
    pipe(num_inference_steps=10)  # now: 3 and 7 steps, warm-up a third of each
    s = foresight_compile.stats(pipe)
    assert s["transformer"].step == [0, 1, 2] and s["transformer_2"].step == list(range(7))
    # static: computes up to and at the warmup step, then serves (warmup 1 of 3, 2 of 7)
    assert [any(m) for m in s["transformer"].mask] == [False, False, True]
    assert [any(m) for m in s["transformer_2"].mask] == [False] * 3 + [True] * 4
    restore(pipe)
