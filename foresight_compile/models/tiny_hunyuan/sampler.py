"""Sampling the tiny HunyuanVideo: the flow-matching Euler loop of ``tiny_video.sample`` (same
scheduler, same per-seed noise), with classifier-free guidance as ``HunyuanVideoPipeline``'s
true CFG: two calls per step, conditional first, then unconditional."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from foresight_compile.models.tiny_hunyuan.model import (EMBEDDED_GUIDANCE_SCALE,
                                                        TinyHunyuanPromptEncoder, guidance_tensor,
                                                        transformer_kwargs)
from foresight_compile.models.tiny_video.data import ClipSpec, Prompt
from foresight_compile.models.tiny_video.sampler import start_sampling


def sample(transformer: Callable, prompt_encoder: TinyHunyuanPromptEncoder, scheduler_config: dict,
           prompts: Sequence[Prompt | str], steps: int = 30, seeds: Sequence[int] | None = None,
           guidance_scale: float = 1.0, on_step: Callable | None = None,
           spec: ClipSpec = ClipSpec()) -> torch.Tensor:
    """Generate clips (B, 3, F, H, W) in [-1, 1]: the flow-matching Euler loop of
    ``tiny_video.sample`` (same scheduler, same per-seed initial noise).

    ``transformer`` may be the model or ``torch.compile(model, ...)``. It is called as
    ``HunyuanVideoPipeline`` calls it: ``hidden_states`` (the noisy clip), ``timestep`` (B,),
    ``encoder_hidden_states``, ``encoder_attention_mask``, ``pooled_projections``,
    ``guidance`` (``1000 * EMBEDDED_GUIDANCE_SCALE``, ignored by this model),
    ``attention_kwargs=None``, ``return_dict=False``. With ``guidance_scale != 1`` (the
    pipeline's ``true_cfg_scale``) a second call per step on the null prompt, and
    ``v = v_uncond + g (v_cond - v_uncond)``. ``on_step(i, t, x)`` is called after each step."""
    prompts, scheduler, x = start_sampling(prompts, seeds, steps, scheduler_config, spec)
    guided = guidance_scale != 1.0
    with torch.no_grad():
        text = prompt_encoder.encode(prompts)
        null = prompt_encoder.null(len(prompts)) if guided else None
        guidance = guidance_tensor(len(prompts), EMBEDDED_GUIDANCE_SCALE).to(x.device)
        for i, t in enumerate(scheduler.timesteps):
            timestep = t.expand(x.shape[0]).to(x.dtype)
            v = transformer(**transformer_kwargs(x, timestep, text, guidance))[0]
            if guided:
                u = transformer(**transformer_kwargs(x, timestep, null, guidance))[0]
                v = u + guidance_scale * (v - u)
            x = scheduler.step(v, t, x).prev_sample
            if on_step is not None:
                on_step(i, t, x)
    return x
