"""Sampling the tiny CogVideoX: the flow-matching Euler loop of ``tiny_video.sample`` (same
scheduler, same per-seed noise), with CFG batched into one call as CogVideoX pipelines do."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from foresight_compile.models.tiny_video.data import ClipSpec, Prompt, null_tokens
from foresight_compile.models.tiny_video.model import TinyPromptEncoder
from foresight_compile.models.tiny_video.sampler import start_sampling
from foresight_compile.models.tiny_cogvideox.model import velocity


def sample(transformer: Callable, prompt_encoder: TinyPromptEncoder, scheduler_config: dict,
           prompts: Sequence[Prompt | str], steps: int = 30, seeds: Sequence[int] | None = None,
           guidance_scale: float = 1.0, on_step: Callable | None = None,
           spec: ClipSpec = ClipSpec()) -> torch.Tensor:
    """Generate clips (B, 3, F, H, W) in [-1, 1]: the flow-matching Euler loop of
    ``tiny_video.sample`` (same scheduler, same per-seed initial noise).

    ``transformer`` may be the model or ``torch.compile(model, ...)``. It is called once per
    step with the packed noisy clip ``hidden_states`` (B, F/2, 6, H, W), ``timestep`` (B,) and
    ``encoder_hidden_states`` (B, 8, 64); with ``guidance_scale != 1`` once per step on a
    batch of 2B (conditional rows first, then unconditional), and
    ``v = v_uncond + g (v_cond - v_uncond)``. ``on_step(i, t, x)`` is called after each step."""
    prompts, scheduler, x = start_sampling(prompts, seeds, steps, scheduler_config, spec)
    guided = guidance_scale != 1.0
    with torch.no_grad():
        text = prompt_encoder.encode(prompts)
        if guided:
            text = torch.cat([text, prompt_encoder(null_tokens(len(prompts)).to(text.device))])
        for i, t in enumerate(scheduler.timesteps):
            xin = torch.cat([x, x]) if guided else x
            v = velocity(transformer, xin, t.expand(xin.shape[0]), text)
            if guided:
                cond, uncond = v.chunk(2)
                v = uncond + guidance_scale * (cond - uncond)
            x = scheduler.step(v, t, x).prev_sample
            if on_step is not None:
                on_step(i, t, x)
    return x
