"""The third trained tiny video DiT: diffusers' ``HunyuanVideoTransformer3DModel`` (dual-stream
blocks, then single-stream blocks), predicting the velocity directly.

Same data, prompts, noise and evaluator as ``models.tiny_video`` (procedural clips, 8 frames,
32x32 RGB in [-1, 1]); a third architecture class, so nothing is tuned to one model:

- **model**: a plain ``HunyuanVideoTransformer3DModel`` in pixel space: a 1-block token
  refiner on the text, ``num_layers`` dual-stream blocks (video and text with their own
  weights, joint attention), then ``num_single_layers`` single-stream blocks (one set of
  weights over the concatenated tokens); hidden 128 = 4 heads x 32, 3D RoPE over
  (frame, row, column) with axes (8, 12, 12), no absolute position embedding (the text keys
  are not rotated, so attention to them tells a video token where it is). Patch
  (2, 4, 4), native (``patch_size_t = 2``; HunyuanVideo's RoPE handles a temporal patch):
  4 x 8 x 8 = 256 video tokens (+ 8 text tokens), as the other two tiny models (a spatial
  patch of 2 would give 1024: four times the linear work, sixteen times the attention's,
  out of reach of the CPU training budget).
- **prompt**: ``TinyHunyuanPromptEncoder`` gives what HunyuanVideo's two text encoders give
  its pipeline: ``encoder_hidden_states`` (B, 8, 64) (token + slot embeddings, the Llama
  part), ``encoder_attention_mask`` (B, 8) (the ``<none>`` padding slots of a one-object
  prompt are masked, as a tokenizer's padding) and ``pooled_projections`` (B, 64) (the CLIP
  part: a projection of the masked mean), which enters every block's modulation.
- **guidance**: ``guidance_embeds=False``: HunyuanVideo's guidance embedding is for
  guidance-distilled checkpoints; this one is trained with 10% null prompts and sampled with
  true classifier-free guidance (two calls per step, as ``HunyuanVideoPipeline`` with
  ``true_cfg_scale``). The pipeline's ``guidance`` argument (``guidance_scale * 1000``) is
  still passed and ignored by the model.
- **prediction**: the model output IS the rectified-flow velocity ``noise - x0``:
  ``x_t = (1 - sigma) x0 + sigma noise``, ``timestep = 1000 sigma``, the convention of
  diffusers' ``FlowMatchEulerDiscreteScheduler`` (and of HunyuanVideo).

``examples/train_tiny_hunyuan.py`` reproduces the weights
(``foresight_compile/assets/tiny_hunyuan_video/``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from diffusers import ConfigMixin, HunyuanVideoTransformer3DModel, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from foresight_compile.models.tiny_video.data import (MAX_OBJECTS, NONE, SLOTS_PER_OBJECT, VOCAB,
                                                     Prompt, as_prompts, null_tokens)
from foresight_compile.models.tiny_video.model import SCHEDULER_CONFIG, load_saved, save_layout

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "assets" / "tiny_hunyuan_video"
META_FILE = "tiny_hunyuan_video.json"
# The ``guidance`` HunyuanVideoPipeline passes: guidance_scale * 1000 (the model ignores it,
# guidance_embeds=False); 1.0 = "no distilled guidance".
EMBEDDED_GUIDANCE_SCALE = 1.0


def transformer_config(layers: int = 2, single_layers: int = 6, heads: int = 4, head_dim: int = 32,
                       refiner_layers: int = 1, patch_size: int = 4, patch_size_t: int = 2,
                       rope_axes_dim: tuple[int, int, int] = (8, 12, 12)) -> dict:
    """Arguments of the ``HunyuanVideoTransformer3DModel`` (defaults: the delivered model).
    ``rope_axes_dim`` (frame, row, column) must sum to ``head_dim``."""
    if sum(rope_axes_dim) != head_dim:
        raise ValueError(f"rope_axes_dim {rope_axes_dim} must sum to head_dim {head_dim}")
    return dict(in_channels=3, out_channels=3, num_attention_heads=heads,
                attention_head_dim=head_dim, num_layers=layers, num_single_layers=single_layers,
                num_refiner_layers=refiner_layers, mlp_ratio=4.0, patch_size=patch_size,
                patch_size_t=patch_size_t, qk_norm="rms_norm", guidance_embeds=False,
                text_embed_dim=64, pooled_projection_dim=64, rope_theta=256.0,
                rope_axes_dim=tuple(rope_axes_dim))


class PromptEmbeds(NamedTuple):
    """What ``TinyHunyuanPromptEncoder`` returns: the three text inputs of the transformer."""

    encoder_hidden_states: torch.Tensor  # (B, 8, dim)
    encoder_attention_mask: torch.Tensor  # (B, 8), 1 = attend, float (the pipeline's dtype)
    pooled_projections: torch.Tensor  # (B, pooled_dim)

    @staticmethod
    def cat(parts: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        return PromptEmbeds(*(torch.cat(t) for t in zip(*parts)))


class TinyHunyuanPromptEncoder(ModelMixin, ConfigMixin):
    """Token ids (B, slots) -> ``PromptEmbeds``: a token embedding plus a per-slot embedding
    (the sequence), the mask of the non-``<none>`` slots, and a projection of the masked
    mean (the pooled vector)."""

    @register_to_config
    def __init__(self, vocab_size: int = len(VOCAB), num_slots: int = MAX_OBJECTS * SLOTS_PER_OBJECT,
                 dim: int = 64, pooled_dim: int = 64) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.slot_embedding = nn.Parameter(torch.randn(num_slots, dim) * 0.02)
        self.pooled_norm = nn.LayerNorm(dim)
        self.pooled_proj = nn.Linear(dim, pooled_dim)

    def forward(self, tokens: torch.Tensor) -> PromptEmbeds:
        hidden = self.token_embedding(tokens) + self.slot_embedding
        # the null prompt is all <null> tokens: never empty, so the mean is defined
        mask = (tokens != VOCAB.index(NONE)).to(hidden.dtype)
        mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return PromptEmbeds(hidden, mask, self.pooled_proj(self.pooled_norm(mean)))

    def encode(self, prompts: Sequence[Prompt | str]) -> PromptEmbeds:
        """The transformer's text inputs for prompts (strings are parsed with ``Prompt.parse``)."""
        tokens = torch.tensor([p.tokens() for p in as_prompts(prompts)], dtype=torch.long)
        return self(tokens.to(self.device))

    def null(self, batch: int) -> PromptEmbeds:
        """The unconditional prompt (classifier-free guidance), ``batch`` rows."""
        return self(null_tokens(batch).to(self.device))


def guidance_tensor(batch: int, scale: float = EMBEDDED_GUIDANCE_SCALE,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """HunyuanVideoPipeline's ``guidance``: ``guidance_scale * 1000`` per row."""
    return torch.tensor([scale] * batch, dtype=dtype) * 1000.0


def transformer_kwargs(x: torch.Tensor, timestep: torch.Tensor, text: PromptEmbeds,
                       guidance: torch.Tensor | None = None) -> dict:
    """The keyword arguments of one ``HunyuanVideoPipeline`` transformer call (its denoising
    loop, diffusers 0.42): ``attention_kwargs`` None, ``return_dict=False``."""
    if guidance is None:
        guidance = guidance_tensor(x.shape[0], dtype=x.dtype).to(x.device)
    return dict(hidden_states=x, timestep=timestep, encoder_hidden_states=text.encoder_hidden_states,
                encoder_attention_mask=text.encoder_attention_mask,
                pooled_projections=text.pooled_projections, guidance=guidance,
                attention_kwargs=None, return_dict=False)


def velocity(transformer: Callable, x: torch.Tensor, timestep: torch.Tensor,
             text: PromptEmbeds) -> torch.Tensor:
    """The model's velocity for a noisy clip x (B, 3, F, H, W) (the model's own layout)."""
    return transformer(**transformer_kwargs(x, timestep, text))[0]


class TinyHunyuan(NamedTuple):
    """What ``load_tiny_hunyuan`` returns: ``transformer, prompt_encoder, scheduler_config``."""

    transformer: HunyuanVideoTransformer3DModel
    prompt_encoder: TinyHunyuanPromptEncoder
    scheduler_config: dict


def build_tiny_hunyuan(seed: int = 0, **config) -> TinyHunyuan:
    """The architecture with fresh random weights (diffusers' default init), seeded."""
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(**transformer_config(**config))
    encoder = TinyHunyuanPromptEncoder(dim=transformer.config.text_embed_dim,
                                       pooled_dim=transformer.config.pooled_projection_dim)
    return TinyHunyuan(transformer.eval(), encoder.eval(), dict(SCHEDULER_CONFIG))


def save_tiny_hunyuan(model: TinyHunyuan, path: str | Path, training: dict | None = None) -> None:
    """``transformer/`` and ``prompt_encoder/`` (diffusers ``save_pretrained``, safetensors)
    and ``tiny_hunyuan_video.json`` (vocabulary, clip spec, scheduler, prediction convention,
    training record)."""
    save_layout(model, path, META_FILE,
                {"input_layout": "hidden_states (B, 3, F, H, W): the clip itself (pixel space), "
                                 "patch (2, 4, 4)",
                 "text_inputs": "encoder_hidden_states (B, 8, 64), encoder_attention_mask (B, 8) "
                                "(<none> slots masked), pooled_projections (B, 64): "
                                "TinyHunyuanPromptEncoder; guidance ignored (guidance_embeds=False)"},
                "velocity = noise - x0 (direct model output); x_t = (1 - sigma) x0 + sigma "
                "noise; timestep = 1000 sigma; frames in [-1, 1]", training)


def load_tiny_hunyuan(path: str | Path | None = None, device: str | torch.device = "cpu") -> TinyHunyuan:
    """Load a model saved by ``save_tiny_hunyuan`` (default: the shipped weights), eval mode,
    float32. Raises ``FileNotFoundError`` naming a missing file, ``ValueError`` on a
    vocabulary mismatch."""
    path = Path(path) if path is not None else WEIGHTS_DIR
    return TinyHunyuan(*load_saved(path, META_FILE, HunyuanVideoTransformer3DModel,
                                   "save_tiny_hunyuan", device,
                                   encoder_cls=TinyHunyuanPromptEncoder))
