"""diffusers' own pipelines, built from small random components (prompt embeddings passed
directly, no text encoder; latent output where the pipeline allows it, so no VAE), under
``optimize(pipe)``: with ``policy="none"`` the output equals the uncompiled pipeline's
(float32, <= 1e-5 relative), the default policy reuses blocks at 30 steps, and ``restore``
gives the pipeline back (same modules, same output).

Each case is a few Dynamo traces of a tiny model; the slower ones are marked ``slow``.
``python tests/test_pipeline_matrix.py`` prints the table (family, pipeline class, exact
with none, reused fraction with the default).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import diffusers
import pytest
import torch

import foresight_compile
from foresight_compile.models import families
from foresight_compile.pipelines import find_denoisers, optimize, restore

STEPS = 30


@dataclasses.dataclass
class Case:
    pipe: object
    call: dict
    take: Callable = staticmethod(lambda out: out[0])

    def run(self, steps: int) -> torch.Tensor:
        with torch.no_grad():
            out = self.pipe(**self.call, num_inference_steps=steps,
                            generator=torch.Generator().manual_seed(0), return_dict=False)
        return self.take(out)


def _text(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def wan():
    from test_pipelines import wan_pipe
    pipe, _ = wan_pipe()
    return Case(pipe, dict(prompt_embeds=_text(1, 12, 16), negative_prompt_embeds=_text(1, 12, 16, seed=2),
                           height=32, width=32, num_frames=9, guidance_scale=5.0, output_type="latent"))


def wan22():
    from test_pipelines import wan22_pipe
    pipe, _ = wan22_pipe()
    return Case(pipe, dict(prompt_embeds=_text(1, 12, 16), negative_prompt_embeds=_text(1, 12, 16, seed=2),
                           height=32, width=32, num_frames=9, guidance_scale=5.0, output_type="latent"))


def cogvideox():
    from test_pipelines import cogvideox_pipe
    pipe, _ = cogvideox_pipe()
    return Case(pipe, dict(prompt_embeds=_text(1, 8, 8), negative_prompt_embeds=_text(1, 8, 8, seed=2),
                           height=16, width=16, num_frames=9, guidance_scale=5.0, output_type="latent"))


def latte():
    from test_pipelines import latte_pipe
    pipe, _ = latte_pipe()
    return Case(pipe, dict(prompt_embeds=_text(1, 8, 8), negative_prompt=None,
                           negative_prompt_embeds=_text(1, 8, 8, seed=2), height=16, width=16,
                           video_length=8, guidance_scale=5.0, output_type="latent"))


def flux():
    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                  text_encoder=None, tokenizer=None, text_encoder_2=None,
                                  tokenizer_2=None, transformer=families.flux().model)
    return Case(pipe, dict(prompt_embeds=_text(1, 16, 32), pooled_prompt_embeds=_text(1, 32, seed=2),
                           negative_prompt_embeds=_text(1, 16, 32, seed=3),
                           negative_pooled_prompt_embeds=_text(1, 32, seed=4), true_cfg_scale=4.0,
                           height=128, width=128, output_type="latent"))


def sd3():
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=families.sd3().model, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
        text_encoder_3=None, tokenizer_3=None)
    return Case(pipe, dict(prompt_embeds=_text(1, 8, 16), pooled_prompt_embeds=_text(1, 16, seed=2),
                           negative_prompt_embeds=_text(1, 8, 16, seed=3),
                           negative_pooled_prompt_embeds=_text(1, 16, seed=4), guidance_scale=5.0,
                           height=128, width=128, output_type="latent"))


def hunyuan_video():
    pipe = diffusers.HunyuanVideoPipeline(
        text_encoder=None, tokenizer=None, transformer=families.hunyuan_video().model, vae=None,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None)
    return Case(pipe, dict(prompt_embeds=_text(1, 12, 16), pooled_prompt_embeds=_text(1, 8, seed=2),
                           prompt_attention_mask=torch.ones(1, 12), height=64, width=64,
                           num_frames=13, output_type="latent"))


def ltx():
    pipe = diffusers.LTXPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None,
                                 text_encoder=None, tokenizer=None, transformer=families.ltx().model)
    return Case(pipe, dict(prompt_embeds=_text(1, 16, 16), prompt_attention_mask=torch.ones(1, 16),
                           negative_prompt_embeds=_text(1, 16, 16, seed=2),
                           negative_prompt_attention_mask=torch.ones(1, 16), guidance_scale=3.0,
                           height=64, width=64, num_frames=9, output_type="latent"))


def skyreels_v2():
    pipe = diffusers.SkyReelsV2Pipeline(
        tokenizer=None, text_encoder=None, transformer=families.skyreels_v2().model, vae=None,
        scheduler=diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction",
                                                    use_flow_sigmas=True, flow_shift=8.0))
    return Case(pipe, dict(prompt_embeds=_text(1, 12, 16), negative_prompt_embeds=_text(1, 12, 16, seed=2),
                           height=32, width=32, num_frames=9, guidance_scale=5.0, output_type="latent"))


def qwenimage():
    pipe = diffusers.QwenImagePipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                       vae=None, text_encoder=None, tokenizer=None,
                                       transformer=families.qwenimage().model)
    return Case(pipe, dict(prompt_embeds=_text(1, 8, 16), prompt_embeds_mask=torch.ones(1, 8, dtype=torch.long),
                           negative_prompt_embeds=_text(1, 8, 16, seed=2),
                           negative_prompt_embeds_mask=torch.ones(1, 8, dtype=torch.long),
                           true_cfg_scale=4.0, height=128, width=128, output_type="latent"))


def allegro():
    torch.manual_seed(0)
    model = diffusers.AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        num_layers=2, cross_attention_dim=24, sample_width=16, sample_height=16,
        sample_frames=4, caption_channels=8).eval()
    pipe = diffusers.AllegroPipeline(tokenizer=None, text_encoder=None, vae=None,
                                     transformer=model, scheduler=diffusers.DDIMScheduler())
    return Case(pipe, dict(prompt_embeds=_text(1, 16, 8), prompt_attention_mask=torch.ones(1, 16),
                           negative_prompt=None, negative_prompt_embeds=_text(1, 16, 8, seed=2),
                           negative_prompt_attention_mask=torch.ones(1, 16), guidance_scale=5.0,
                           height=128, width=128, num_frames=13, output_type="latent"))


CASES = {"wan": wan, "wan22": wan22, "cogvideox": cogvideox, "latte": latte, "flux": flux,
         "sd3": sd3, "hunyuan_video": hunyuan_video, "ltx": ltx, "skyreels_v2": skyreels_v2,
         "qwenimage": qwenimage, "allegro": allegro}
QUICK = ("sd3", "ltx", "skyreels_v2", "cogvideox")  # ~3-6 s each; Wan, Wan 2.2: test_pipelines.py


def check(name: str) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    case = CASES[name]()
    pipe = case.pipe
    reference = case.run(STEPS)
    originals = dict(find_denoisers(pipe))
    optimize(pipe, policy="none", lowering="eager")
    exact = float((case.run(STEPS) - reference).norm() / reference.norm())
    restore(pipe)
    torch._dynamo.reset()
    optimize(pipe, lowering="eager")
    case.run(STEPS)
    report = foresight_compile.stats(pipe)
    restore(pipe)
    back = all(getattr(pipe, n) is m for n, m in originals.items()) and torch.equal(
        case.run(STEPS), reference)
    return dict(family=name, pipeline=type(pipe).__name__, exact=exact,
                reused={n: s.reused_fraction for n, s in report.items() if s.accelerated},
                accelerated=all(s.accelerated for s in report.values()), restored=back)


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in QUICK else pytest.mark.slow)
                                  for n in CASES])
def test_pipeline_optimize_is_exact_with_none_reuses_by_default_and_restores(name):
    row = check(name)
    assert row["exact"] <= 1e-5, row
    assert row["accelerated"] and all(f > 0 for f in row["reused"].values()), row
    assert row["restored"], row


if __name__ == "__main__":
    import sys
    names = sys.argv[1:] or list(CASES)
    print("| family | pipeline class | exact with none (rel) | reused fraction (default) |")
    print("|---|---|---|---|")
    for n in names:
        try:
            r = check(n)
            reused = ", ".join(f"{k}: {v:.1%}" for k, v in r["reused"].items())
            print(f"| {n} | {r['pipeline']} | {r['exact']:.1e} | {reused} |", flush=True)
        except Exception as e:  # noqa: BLE001 - the table says why
            print(f"| {n} | - | {type(e).__name__}: {str(e)[:150]} | - |", flush=True)
