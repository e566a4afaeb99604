"""Sampling the tiny video DiT: an ordinary diffusers flow-matching Euler loop, so
``torch.compile(transformer, backend="foresight")`` (or any cache hook) plugs in."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from foresight_compile.models.tiny_video.data import ClipSpec, Prompt, as_prompts, null_tokens
from foresight_compile.models.tiny_video.model import TinyPromptEncoder


def initial_noise(seeds: Sequence[int], spec: ClipSpec = ClipSpec()) -> torch.Tensor:
    """One noise clip per seed (independent of batch composition), (B, 3, F, H, W)."""
    shape = spec.clip_shape(1)[1:]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


def start_sampling(prompts: Sequence[Prompt | str], seeds: Sequence[int] | None, steps: int,
                   scheduler_config: dict, spec: ClipSpec):
    """What every sampler of these clips starts from: the prompts, a flow-matching Euler
    scheduler set to ``steps``, and one noise clip per seed (default: the prompt's index)."""
    prompts = as_prompts(prompts)
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one per prompt")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    return prompts, scheduler, initial_noise(seeds, spec)


def sample(transformer: Callable, prompt_encoder: TinyPromptEncoder, scheduler_config: dict,
           prompts: Sequence[Prompt | str], steps: int = 30, seeds: Sequence[int] | None = None,
           guidance_scale: float = 1.0, on_step: Callable | None = None,
           spec: ClipSpec = ClipSpec()) -> torch.Tensor:
    """Generate clips (B, 3, F, H, W) in [-1, 1] with an ordinary flow-matching Euler loop.

    ``transformer`` may be the model or ``torch.compile(model, backend=...)``; it is called
    once per step with ``hidden_states`` (the noisy clip), ``timestep`` (B,) and
    ``encoder_hidden_states``, or
    twice (conditional first, then unconditional) when ``guidance_scale != 1``. Sample ``i``
    starts from the noise of ``seeds[i]`` (default ``i``), so it does not depend on the rest
    of the batch. ``on_step(i, t, x)`` is called after each step.
    """
    prompts, scheduler, x = start_sampling(prompts, seeds, steps, scheduler_config, spec)
    with torch.no_grad():
        text = prompt_encoder.encode(prompts)
        null = prompt_encoder(null_tokens(len(prompts)))
        for i, t in enumerate(scheduler.timesteps):
            timestep = t.expand(x.shape[0])
            v = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=text,
                            return_dict=False)[0]
            if guidance_scale != 1.0:
                u = transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=null,
                                return_dict=False)[0]
                v = u + guidance_scale * (v - u)
            x = scheduler.step(v, t, x).prev_sample
            if on_step is not None:
                on_step(i, t, x)
    return x
