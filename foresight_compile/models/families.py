"""Small-config factories for the diffusers DiT families (diffusers 0.42.1, torch 2.13 CPU):
the matrix the export, dynamic-shape and GPU checks run over.

Every factory ``f(layers=2, seed=0)`` returns a ``Family``: the model (eval, float32, seeded
random weights), the latent shape, ``inputs(latents, timestep) -> kwargs`` for one forward
call (batch 1), ``example`` (the kwargs of one call at t=999) and ``prediction(out)``
(the denoiser output taken from the model's return value). A ``Family`` quacks like
``foresight_compile.models.SmallDiT`` (``latent_shape``, ``inputs``, ``prediction``,
``scheduler_config``), so ``foresight_compile.models.denoise(model, fam, steps)`` and
``OrtEngine`` work with it.

``inputs`` receives the scheduler's timestep (FlowMatchEulerDiscreteScheduler: 1000 -> 0)
and converts it to the model's own convention where the pipeline does (Flux, QwenImage:
``t / 1000``; Cosmos3: per-patch ``vision_timesteps``). Weights are random, so outputs are
not images: these configs are for tracing, block discovery, export and equivalence checks.

Configs follow diffusers' own model tests (tests/models/transformers/test_models_*.py),
with two blocks per stack, two heads and small widths.

    from foresight_compile.models.families import FAMILIES
    fam = FAMILIES["flux"]()
    out = fam.model(**fam.example)
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

DEFAULT_SCHEDULER = {"shift": 3.0}


@dataclasses.dataclass
class Family:
    name: str
    model: torch.nn.Module
    latent_shape: tuple[int, ...]
    make_inputs: Callable[[torch.Tensor, torch.Tensor], dict]
    take: Callable[[Any], torch.Tensor] = lambda out: out[0]
    stacks: dict[str, int] = dataclasses.field(default_factory=dict)  # expected ModuleLists
    notes: str = ""
    scheduler_config: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_SCHEDULER))

    def inputs(self, latents: torch.Tensor, timestep: torch.Tensor) -> dict:
        return self.make_inputs(latents, timestep)

    def prediction(self, out) -> torch.Tensor:
        return self.take(out)

    @property
    def example(self) -> dict:
        g = torch.Generator().manual_seed(1234)
        return self.inputs(torch.randn(self.latent_shape, generator=g), torch.tensor([999.0]))


def _d():
    import diffusers
    return diffusers


def _text(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _ts(t: torch.Tensor) -> torch.Tensor:
    """The scheduler's timestep as a float32 (1,) tensor."""
    return t.reshape(-1)[:1].to(torch.float32)


# ---------------------------------------------------------------- the families in the brief

def wan(layers: int = 2, seed: int = 0) -> Family:
    torch.manual_seed(seed)
    model = _d().WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    text = _text(1, 12, 16)
    return Family("wan", model, (1, 4, 8, 16, 16),
                  lambda x, t: dict(hidden_states=x, timestep=_ts(t), encoder_hidden_states=text,
                                    return_dict=False), stacks={"blocks": layers})


def cogvideox(layers: int = 2, seed: int = 0) -> Family:
    torch.manual_seed(seed)
    model = _d().CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        time_embed_dim=2, text_embed_dim=8, num_layers=layers, sample_width=16, sample_height=16,
        sample_frames=29, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=8).eval()
    text = _text(1, 8, 8)
    # hidden_states is (B, F, C, H, W): frames before channels.
    return Family("cogvideox", model, (1, 8, 4, 16, 16),
                  lambda x, t: dict(hidden_states=x, timestep=_ts(t), encoder_hidden_states=text,
                                    return_dict=False), stacks={"transformer_blocks": layers})


def latte(layers: int = 2, seed: int = 0) -> Family:
    torch.manual_seed(seed)
    model = _d().LatteTransformer3DModel(
        sample_size=16, num_layers=layers, patch_size=2, attention_head_dim=8,
        num_attention_heads=2, caption_channels=8, in_channels=4, cross_attention_dim=16,
        out_channels=8, norm_type="ada_norm_single", num_embeds_ada_norm=1000,
        video_length=8).eval()
    text = _text(1, 8, 8)
    return Family("latte", model, (1, 4, 8, 16, 16),
                  lambda x, t: dict(hidden_states=x, timestep=_ts(t), encoder_hidden_states=text,
                                    enable_temporal_attentions=True, return_dict=False),
                  take=lambda out: out[0][:, :4],  # (noise, learned sigma)
                  stacks={"transformer_blocks": layers, "temporal_transformer_blocks": layers})


def pixart(layers: int = 2, seed: int = 0) -> Family:
    torch.manual_seed(seed)
    model = _d().PixArtTransformer2DModel(
        sample_size=16, num_layers=layers, patch_size=2, attention_head_dim=8,
        num_attention_heads=2, in_channels=4, out_channels=8, cross_attention_dim=16,
        caption_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
        norm_eps=1e-6, use_additional_conditions=False).eval()
    text = _text(1, 8, 8)
    return Family("pixart", model, (1, 4, 16, 16),
                  lambda x, t: dict(hidden_states=x, timestep=_ts(t), encoder_hidden_states=text,
                                    added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                                    return_dict=False),
                  take=lambda out: out[0][:, :4], stacks={"transformer_blocks": layers})


def ltx(layers: int = 2, seed: int = 0) -> Family:
    torch.manual_seed(seed)
    model = _d().LTXVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=layers, qk_norm="rms_norm_across_heads",
        caption_channels=16).eval()
    frames, height, width = 4, 8, 8
    text = _text(1, 16, 16)
    mask = torch.ones(1, 16, dtype=torch.bool)
    # Latents are packed (B, F*H*W, C) like the pipeline's; rope scale as LTXPipeline sets it
    # (vae temporal compression / frame rate, spatial compression, spatial compression).
    return Family("ltx", model, (1, frames * height * width, 4),
                  lambda x, t: dict(hidden_states=x, encoder_hidden_states=text, timestep=_ts(t),
                                    encoder_attention_mask=mask, num_frames=frames, height=height,
                                    width=width, rope_interpolation_scale=(8 / 25, 32, 32),
                                    return_dict=False), stacks={"transformer_blocks": layers})


def sd3(layers: int = 2, seed: int = 0) -> Family:
    torch.manual_seed(seed)
    model = _d().SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=layers, attention_head_dim=8,
        num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
        pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16).eval()
    text, pooled = _text(1, 8, 16), _text(1, 16, seed=2)
    return Family("sd3", model, (1, 4, 16, 16),
                  lambda x, t: dict(hidden_states=x, encoder_hidden_states=text,
                                    pooled_projections=pooled, timestep=_ts(t), return_dict=False),
                  stacks={"transformer_blocks": layers})


def hunyuan_video(layers: int = 2, seed: int = 0) -> Family:
    torch.manual_seed(seed)
    model = _d().HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
        num_layers=layers, num_single_layers=layers, num_refiner_layers=2, patch_size=1,
        patch_size_t=1, guidance_embeds=True, text_embed_dim=16, pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4)).eval()
    text, pooled = _text(1, 12, 16), _text(1, 8, seed=2)
    mask = torch.ones(1, 12)
    guidance = torch.tensor([6000.0])  # HunyuanVideoPipeline: guidance_scale * 1000
    return Family("hunyuan_video", model, (1, 4, 4, 8, 8),
                  lambda x, t: dict(hidden_states=x, timestep=_ts(t), encoder_hidden_states=text,
                                    encoder_attention_mask=mask, pooled_projections=pooled,
                                    guidance=guidance, return_dict=False),
                  stacks={"context_embedder.token_refiner.refiner_blocks": 2,
                          "transformer_blocks": layers, "single_transformer_blocks": layers},
                  notes="dual-stream transformer_blocks, then single_transformer_blocks; the "
                        "text token refiner has its own 2-block stack")


def _flux_ids(h: int, w: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(h, w, 3)
    img[..., 1] = torch.arange(h)[:, None]
    img[..., 2] = torch.arange(w)[None, :]
    return img.reshape(h * w, 3), torch.zeros(seq, 3)


def flux(layers: int = 2, seed: int = 0) -> Family:
    torch.manual_seed(seed)
    model = _d().FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=layers, num_single_layers=layers,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, guidance_embeds=False, axes_dims_rope=(4, 4, 8)).eval()
    h = w = 8  # packed latent grid (a 16x16x4 latent in 2x2 patches -> 64 tokens of 16)
    text, pooled = _text(1, 16, 32), _text(1, 32, seed=2)
    img_ids, txt_ids = _flux_ids(h, w, 16)
    return Family("flux", model, (1, h * w, 16),
                  lambda x, t: dict(hidden_states=x, encoder_hidden_states=text,
                                    pooled_projections=pooled, timestep=_ts(t) / 1000,
                                    img_ids=img_ids, txt_ids=txt_ids, return_dict=False),
                  stacks={"transformer_blocks": layers, "single_transformer_blocks": layers},
                  notes="FluxPipeline passes timestep / 1000")


def skyreels_v2(layers: int = 2, seed: int = 0) -> Family:
    torch.manual_seed(seed)
    model = _d().SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
        out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    text = _text(1, 12, 16)
    return Family("skyreels_v2", model, (1, 4, 8, 16, 16),
                  lambda x, t: dict(hidden_states=x, timestep=_ts(t), encoder_hidden_states=text,
                                    return_dict=False), stacks={"blocks": layers})


def allegro(layers: int = 2, seed: int = 0) -> Family:
    torch.manual_seed(seed)
    model = _d().AllegroTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
        num_layers=layers, cross_attention_dim=16, sample_width=16, sample_height=16,
        sample_frames=4, caption_channels=8).eval()
    text = _text(1, 16, 8)
    return Family("allegro", model, (1, 4, 4, 16, 16),
                  lambda x, t: dict(hidden_states=x, encoder_hidden_states=text, timestep=_ts(t),
                                    return_dict=False), stacks={"transformer_blocks": layers})


def mochi(layers: int = 2, seed: int = 0) -> Family:
    torch.manual_seed(seed)
    model = _d().MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=layers,
        pooled_projection_dim=16, in_channels=4, out_channels=None, qk_norm="rms_norm",
        text_embed_dim=16, time_embed_dim=4, activation_fn="swiglu",
        max_sequence_length=16).eval()
    text = _text(1, 16, 16)
    mask = torch.ones(1, 16, dtype=torch.bool)
    return Family("mochi", model, (1, 4, 4, 16, 16),
                  lambda x, t: dict(hidden_states=x, encoder_hidden_states=text, timestep=_ts(t),
                                    encoder_attention_mask=mask, return_dict=False),
                  stacks={"transformer_blocks": layers},
                  notes="MochiPipeline passes 1000 - t and negates the prediction; not mimicked")


def qwenimage(layers: int = 2, seed: int = 0) -> Family:
    torch.manual_seed(seed)
    model = _d().QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=layers, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False,
        axes_dims_rope=(8, 4, 4)).eval()
    h = w = 8
    text = _text(1, 8, 16)
    mask = torch.ones(1, 8, dtype=torch.long)
    return Family("qwenimage", model, (1, h * w, 16),
                  lambda x, t: dict(hidden_states=x, encoder_hidden_states=text,
                                    encoder_hidden_states_mask=mask, timestep=_ts(t) / 1000,
                                    img_shapes=[(1, h, w)], return_dict=False),
                  stacks={"transformer_blocks": layers},
                  notes="QwenImagePipeline passes timestep / 1000")


def cosmos(layers: int = 2, seed: int = 0) -> Family:
    torch.manual_seed(seed)
    model = _d().CosmosTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
        num_layers=layers, mlp_ratio=2, text_embed_dim=16, adaln_lora_dim=4,
        max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable").eval()
    # concat_padding_mask=True (Cosmos 1.0's setting) resizes the mask with torchvision,
    # which is not installed here; the all-zero mask the pipeline passes adds nothing.
    text = _text(1, 12, 16)
    mask = torch.ones(1, 12)
    padding = torch.zeros(1, 1, 16, 16)
    return Family("cosmos", model, (1, 4, 4, 16, 16),
                  lambda x, t: dict(hidden_states=x, timestep=_ts(t), encoder_hidden_states=text,
                                    attention_mask=mask, fps=30, padding_mask=padding,
                                    return_dict=False), stacks={"transformer_blocks": layers})


def cosmos3(layers: int = 2, seed: int = 0) -> Family:
    """Cosmos3OmniTransformer (Cosmos 3, "omni": text understanding + generation in one
    packed sequence). Vision-only generation: 2 text tokens, then T*H*W vision tokens."""
    torch.manual_seed(seed)
    model = _d().Cosmos3OmniTransformer(
        head_dim=6, hidden_act="relu2", hidden_size=12, intermediate_size=24, latent_channel=4,
        latent_patch_size=1, num_attention_heads=2, num_hidden_layers=layers,
        num_key_value_heads=1, patch_latent_dim=4, qk_norm_for_text=False, rms_norm_eps=1e-5,
        rope_axes_dim=[1, 1, 1], rope_theta=1e8, vocab_size=32, dtype="float32").eval()
    T, H, W = 2, 4, 4
    n = T * H * W
    length = 2 + n
    vision = torch.arange(2, length)

    def make(x, t):
        return dict(input_ids=torch.tensor([1, 2]), text_indexes=torch.tensor([0, 1]),
                    position_ids=torch.zeros(3, length, dtype=torch.long), und_len=2,
                    sequence_length=length, vision_tokens=[x], vision_token_shapes=[(T, H, W)],
                    vision_sequence_indexes=vision, vision_mse_loss_indexes=vision,
                    vision_timesteps=_ts(t).expand(n).clone(),
                    vision_noisy_frame_indexes=[torch.arange(T)], return_dict=False)
    return Family("cosmos3", model, (1, 4, T, H, W), make, take=lambda out: out[0][0],
                  stacks={"layers": layers},
                  notes="inputs are packed sequences with index tensors and lists; the "
                        "timestep is the per-token vision_timesteps")


class Cosmos3Denoiser(torch.nn.Module):
    """Cosmos3OmniTransformer as a denoiser of one video latent: tensors in, tensor out.

    The omni forward takes the latent inside a list (``vision_tokens=[x]``) and returns lists;
    export_onnx only turns top-level tensor arguments into ONNX inputs, so export this."""

    def __init__(self, model, shapes, noisy_frames):
        super().__init__()
        self.model = model
        self.shapes = shapes
        self.noisy_frames = noisy_frames

    def forward(self, latents, vision_timesteps, input_ids, text_indexes, position_ids,
                vision_sequence_indexes, und_len: int, sequence_length: int):
        out = self.model(input_ids=input_ids, text_indexes=text_indexes,
                         position_ids=position_ids, und_len=und_len,
                         sequence_length=sequence_length, vision_tokens=[latents],
                         vision_token_shapes=self.shapes,
                         vision_sequence_indexes=vision_sequence_indexes,
                         vision_mse_loss_indexes=vision_sequence_indexes,
                         vision_timesteps=vision_timesteps,
                         vision_noisy_frame_indexes=[self.noisy_frames], return_dict=False)
        return (out[0][0],)


def cosmos3_denoiser(layers: int = 2, seed: int = 0) -> Family:
    """``cosmos3`` behind ``Cosmos3Denoiser`` (the form export_onnx can take)."""
    inner = cosmos3(layers, seed)
    (T, H, W) = inner.latent_shape[2:]
    wrapper = Cosmos3Denoiser(inner.model, [(T, H, W)], torch.arange(T)).eval()

    def make(x, t):
        kw = inner.inputs(x, t)
        return dict(latents=x, vision_timesteps=kw["vision_timesteps"], input_ids=kw["input_ids"],
                    text_indexes=kw["text_indexes"], position_ids=kw["position_ids"],
                    vision_sequence_indexes=kw["vision_sequence_indexes"],
                    und_len=kw["und_len"], sequence_length=kw["sequence_length"])
    return Family("cosmos3_denoiser", wrapper, inner.latent_shape, make,
                  stacks={"model.layers": layers}, notes=inner.notes)


FAMILIES: dict[str, Callable[..., Family]] = {
    "wan": wan, "cogvideox": cogvideox, "latte": latte, "pixart": pixart, "ltx": ltx,
    "sd3": sd3, "hunyuan_video": hunyuan_video, "flux": flux, "skyreels_v2": skyreels_v2,
    "allegro": allegro, "mochi": mochi, "qwenimage": qwenimage, "cosmos": cosmos,
    "cosmos3": cosmos3, "cosmos3_denoiser": cosmos3_denoiser,
}


def get(name: str, **kw) -> Family:
    return FAMILIES[name](**kw)
