"""Bench workloads: small configurations of real diffusers DiTs (no hub access needed).

Each factory returns a ``SmallDiT``: the model, its latent shape, and how to build one
forward call's keyword arguments. ``wan``/``cogvideox``/``latte`` have random weights, in
small fixed configurations (``layers`` deepens them); ``tiny_video_workload`` is the trained
Wan shipped with the package (``models/tiny_video/``), the one to quote fidelity figures on;
``tiny_cogvideox_workload`` and ``tiny_hunyuan_workload`` the trained CogVideoX and
HunyuanVideo.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch


DEFAULT_SCHEDULER = {"shift": 3.0}


@dataclasses.dataclass
class SmallDiT:
    name: str
    model: torch.nn.Module
    latent_shape: tuple[int, ...]
    text: torch.Tensor
    extra: dict
    prediction_channels: int | None = None  # Latte predicts (noise, sigma): keep the first half
    # FlowMatchEulerDiscreteScheduler arguments of the denoising loop; shift 3 (Wan's
    # default for video) unless the model was trained with another.
    scheduler_config: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_SCHEDULER))
    prompts: list | None = None  # tiny_video: the prompts behind ``text``
    # Batched classifier-free guidance (CogVideoX pipelines): ``text`` holds the conditional
    # rows then the unconditional ones, each call runs both halves, the prediction is
    # ``uncond + guidance * (cond - uncond)``. None: no guidance.
    guidance: float | None = None

    def inputs(self, latents: torch.Tensor, timestep: torch.Tensor) -> dict:
        if self.guidance is not None:
            latents = torch.cat([latents, latents])
            timestep = torch.cat([timestep, timestep])
        return dict(hidden_states=latents, timestep=timestep, encoder_hidden_states=self.text,
                    return_dict=False, **self.extra)

    def prediction(self, out) -> torch.Tensor:
        pred = out[0]
        if self.prediction_channels is not None:
            pred = pred[:, : self.prediction_channels] if self.name != "cogvideox" else pred
        if self.guidance is not None:
            cond, uncond = pred.chunk(2)
            pred = uncond + self.guidance * (cond - uncond)
        return pred


def wan(layers: int = 2, deep: bool = False, seed: int = 0, frames: int = 8, size: int = 16) -> SmallDiT:
    import diffusers
    torch.manual_seed(seed)
    if deep:
        cfg = dict(num_attention_heads=4, attention_head_dim=16, text_dim=32, ffn_dim=128)
    else:
        cfg = dict(num_attention_heads=2, attention_head_dim=12, text_dim=16, ffn_dim=32)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), in_channels=4, out_channels=4, freq_dim=256, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32, **cfg).eval()
    text = torch.randn(1, 12, cfg["text_dim"])
    return SmallDiT("wan", model, (1, 4, frames, size, size), text, {})


def cogvideox(layers: int = 2, seed: int = 0) -> SmallDiT:
    import diffusers
    torch.manual_seed(seed)
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        time_embed_dim=2, text_embed_dim=8, num_layers=layers, sample_width=16, sample_height=16,
        sample_frames=29, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=8).eval()
    return SmallDiT("cogvideox", model, (1, 8, 4, 16, 16), torch.randn(1, 8, 8), {})


def latte(layers: int = 2, seed: int = 0) -> SmallDiT:
    import diffusers
    torch.manual_seed(seed)
    model = diffusers.LatteTransformer3DModel(
        sample_size=16, num_layers=layers, patch_size=2, attention_head_dim=8,
        num_attention_heads=2, caption_channels=8, in_channels=4, cross_attention_dim=16,
        out_channels=8, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
        video_length=8).eval()
    return SmallDiT("latte", model, (1, 4, 8, 16, 16), torch.randn(1, 8, 8),
                    {"enable_temporal_attentions": True}, prediction_channels=4)


def tiny_video_workload(prompts: int = 4, path=None) -> SmallDiT:
    """The trained tiny video DiT on the first ``prompts`` evaluation prompts (one clip each):
    the latent is the clip itself (pixel space, (B, 3, 8, 32, 32) in [-1, 1])."""
    from foresight_compile.models import tiny_video as tv
    transformer, encoder, scheduler_config = tv.load_tiny_video_dit(path)
    chosen = tv.evaluation_prompts(prompts)
    with torch.no_grad():
        text = encoder.encode(chosen)
    return SmallDiT("tiny-video", transformer, tv.ClipSpec().clip_shape(len(chosen)), text, {}, scheduler_config=scheduler_config,
                    prompts=chosen)


def tiny_cogvideox_workload(prompts: int = 4, path=None, guidance: float | None = None) -> SmallDiT:
    """The trained tiny CogVideoX (velocity-predicting) on the first ``prompts`` evaluation
    prompts: the latent is the packed clip (B, 4, 6, 32, 32), frame pairs on channels.
    ``guidance``: batched CFG at that scale (one call of 2B rows per step)."""
    from foresight_compile.models import tiny_cogvideox as tc
    from foresight_compile.models import tiny_video as tv
    transformer, encoder, scheduler_config = tc.load_tiny_cogvideox(path)
    chosen = tv.evaluation_prompts(prompts)
    with torch.no_grad():
        text = encoder.encode(chosen)
        if guidance is not None:
            text = torch.cat([text, encoder(tv.null_tokens(len(chosen)))])
    shape = tc.pack(torch.zeros(tv.ClipSpec().clip_shape(len(chosen)))).shape
    return SmallDiT("tiny-video-cogvideox", transformer, tuple(shape), text, {},
                    scheduler_config=scheduler_config, prompts=chosen, guidance=guidance)


def tiny_hunyuan_workload(prompts: int = 4, path=None) -> SmallDiT:
    """The trained tiny HunyuanVideo (velocity-predicting; dual-stream then single-stream
    blocks) on the first ``prompts`` evaluation prompts: the latent is the clip itself
    (B, 3, 8, 32, 32). Each call passes what ``HunyuanVideoPipeline``'s denoising loop passes
    (``encoder_hidden_states``, ``encoder_attention_mask``, ``pooled_projections``,
    ``guidance = guidance_scale * 1000`` (ignored by this model), ``attention_kwargs=None``,
    ``return_dict=False``); no classifier-free guidance (the pipeline's true CFG is a second
    call per step: ``tiny_hunyuan.sample(..., guidance_scale=g)``)."""
    from foresight_compile.models import tiny_hunyuan as th
    from foresight_compile.models import tiny_video as tv
    transformer, encoder, scheduler_config = th.load_tiny_hunyuan(path)
    chosen = tv.evaluation_prompts(prompts)
    with torch.no_grad():
        text = encoder.encode(chosen)
    extra = th.transformer_kwargs(torch.zeros(len(chosen)), None, text,
                                  th.guidance_tensor(len(chosen)))
    for name in ("hidden_states", "timestep", "encoder_hidden_states", "return_dict"):
        del extra[name]  # SmallDiT.inputs passes these
    return SmallDiT("tiny-video-hunyuan", transformer, tv.ClipSpec().clip_shape(len(chosen)),
                    text.encoder_hidden_states, extra, scheduler_config=scheduler_config,
                    prompts=chosen)


FACTORIES: dict[str, Callable[..., SmallDiT]] = {"wan": wan, "cogvideox": cogvideox, "latte": latte,
                                                 "tiny-video": tiny_video_workload,
                                                 "tiny-video-cogvideox": tiny_cogvideox_workload,
                                                 "tiny-video-hunyuan": tiny_hunyuan_workload}


def denoise(model: Callable, dit: SmallDiT, steps: int, seed: int = 0, on_step=None) -> torch.Tensor:
    """An ordinary flow-matching denoising loop with diffusers' scheduler; returns the latent."""
    import diffusers
    # A user's workload object may leave the scheduler to us.
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        **getattr(dit, "scheduler_config", DEFAULT_SCHEDULER))
    scheduler.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(dit.latent_shape, generator=g)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(**dit.inputs(x, t.expand(x.shape[0])))
            x = scheduler.step(dit.prediction(out), t, x).prev_sample
            if on_step is not None:
                on_step(x)
    return x


def tiny_cogvideox_dit(path=None):
    """The trained tiny CogVideoX shipped with the package: ``(transformer, prompt_encoder,
    scheduler_config)``; see ``foresight_compile.models.tiny_cogvideox`` (``pack``,
    ``sample``)."""
    from foresight_compile.models.tiny_cogvideox.model import load_tiny_cogvideox
    return load_tiny_cogvideox(path)


def tiny_hunyuan_dit(path=None):
    """The trained tiny HunyuanVideo shipped with the package: ``(transformer,
    prompt_encoder, scheduler_config)``; see ``foresight_compile.models.tiny_hunyuan``
    (``sample``, ``transformer_kwargs``)."""
    from foresight_compile.models.tiny_hunyuan.model import load_tiny_hunyuan
    return load_tiny_hunyuan(path)


def tiny_video_dit(path=None):
    """The trained tiny video DiT shipped with the package (not random weights):
    ``(transformer, prompt_encoder, scheduler_config)``; see ``foresight_compile.models.tiny_video``
    for the data it was trained on, ``sample`` and ``evaluate_samples``."""
    from foresight_compile.models.tiny_video.model import load_tiny_video_dit
    return load_tiny_video_dit(path)
