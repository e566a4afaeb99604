"""The second trained tiny video DiT: diffusers' ``CogVideoXTransformer3DModel``, predicting
the velocity directly.

Same data, prompts, noise and evaluator as ``models.tiny_video`` (procedural clips, 8
frames, 32x32 RGB in [-1, 1]); another architecture and prediction convention, so nothing is
tuned to one model:

- **model**: a plain ``CogVideoXTransformer3DModel`` (8 blocks, hidden 128 = 4 heads x 32,
  ``time_embed_dim`` 128, spatial patch 4, absolute 3D sin-cos position embedding, no RoPE),
  in pixel space. The prompt enters as ``encoder_hidden_states`` (8 tokens of
  ``TinyPromptEncoder``), which CogVideoX concatenates with the video tokens in every block
  (two carried streams: video and text).
- **temporal patch 2 by frame packing**: diffusers 0.42.1 cannot combine ``patch_size_t`` with
  the sin-cos position embedding (``CogVideoXPatchEmbed`` builds the table for ``num_frames``
  input frames, not ``num_frames / patch_size_t`` token frames: a shape error). So the clip is
  handed to the model with each pair of consecutive frames stacked on the channel axis
  (``pack``: (B, 3, 8, H, W) -> (B, 4, 6, H, W); ``in_channels = out_channels = 6``). The
  4x4 conv patch embedding over 6 channels is exactly a (2, 4, 4) patch: 4 x 8 x 8 = 256
  video tokens (+ 8 text tokens), as the shipped Wan. ``unpack`` undoes it on the output.
- **prediction**: the model output IS the rectified-flow velocity ``noise - x0`` (no x0
  reparametrisation): ``x_t = (1 - sigma) x0 + sigma noise``, ``timestep = 1000 sigma``, the
  convention of diffusers' ``FlowMatchEulerDiscreteScheduler``.

``examples/train_tiny_cogvideox.py`` reproduces the weights
(``foresight_compile/assets/tiny_cogvideox/``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import torch
from diffusers import CogVideoXTransformer3DModel

from foresight_compile.models.tiny_video.data import ClipSpec, null_tokens
from foresight_compile.models.tiny_video.model import (SCHEDULER_CONFIG, TinyPromptEncoder,
                                                      load_saved, save_layout)

WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "assets" / "tiny_cogvideox"
META_FILE = "tiny_cogvideox.json"
FRAMES_PER_TOKEN = 2  # temporal patch, realised by frame packing (see module docstring)


def transformer_config(layers: int = 8, heads: int = 4, head_dim: int = 32, time_embed_dim: int = 128,
                       frames_per_token: int = FRAMES_PER_TOKEN, spec: ClipSpec = ClipSpec()) -> dict:
    """Arguments of the ``CogVideoXTransformer3DModel`` (defaults: the delivered model).

    ``sample_frames`` / ``temporal_compression_ratio`` only size the cached position table:
    CogVideoX uses ``(sample_frames - 1) // temporal_compression_ratio + 1`` token frames, here
    ``spec.frames / FRAMES_PER_TOKEN = 4`` (with ratio 1, ``sample_frames = 4``), so the table
    built at init (8 text slots of zeros + 4 x 8 x 8 sin-cos rows) is the one every forward uses."""
    token_frames = spec.frames // frames_per_token
    return dict(num_attention_heads=heads, attention_head_dim=head_dim,
                in_channels=3 * frames_per_token, out_channels=3 * frames_per_token,
                time_embed_dim=time_embed_dim, text_embed_dim=64, num_layers=layers,
                sample_width=spec.size, sample_height=spec.size, sample_frames=token_frames,
                temporal_compression_ratio=1, patch_size=4, patch_size_t=None,
                max_text_seq_length=len(null_tokens(1)[0]),
                use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False)


def pack(x: torch.Tensor, k: int = FRAMES_PER_TOKEN) -> torch.Tensor:
    """(B, 3, F, H, W) clip -> (B, F / k, 3 k, H, W) model input: groups of k consecutive frames
    on the channel axis (k = 2: frame 2j RGB, then frame 2j+1 RGB; k = 1: a transpose)."""
    B, C, F, H, W = x.shape
    return x.transpose(1, 2).reshape(B, F // k, k * C, H, W)


def unpack(y: torch.Tensor, k: int = FRAMES_PER_TOKEN) -> torch.Tensor:
    """Inverse of ``pack``: (B, F / k, 3 k, H, W) -> (B, 3, F, H, W)."""
    B, T, Ck, H, W = y.shape
    return y.reshape(B, T * k, Ck // k, H, W).transpose(1, 2)


def frames_per_token(transformer) -> int:
    """Frames stacked per input channel group: the model's ``in_channels / 3``."""
    return transformer.config.in_channels // 3


def velocity(transformer: Callable, x: torch.Tensor, timestep: torch.Tensor,
             text: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """The model's velocity for a noisy clip x (B, 3, F, H, W), in the clip layout."""
    k = frames_per_token(transformer) if k is None else k
    out = transformer(hidden_states=pack(x, k), timestep=timestep, encoder_hidden_states=text,
                      return_dict=False)[0]
    return unpack(out, k)


class TinyCogVideoX(NamedTuple):
    """What ``load_tiny_cogvideox`` returns: ``transformer, prompt_encoder, scheduler_config``."""

    transformer: CogVideoXTransformer3DModel
    prompt_encoder: TinyPromptEncoder
    scheduler_config: dict


def build_tiny_cogvideox(seed: int = 0, **config) -> TinyCogVideoX:
    """The architecture with fresh random weights (diffusers' default init), seeded."""
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(**transformer_config(**config))
    encoder = TinyPromptEncoder(dim=transformer.config.text_embed_dim)
    return TinyCogVideoX(transformer.eval(), encoder.eval(), dict(SCHEDULER_CONFIG))


def save_tiny_cogvideox(model: TinyCogVideoX, path: str | Path, training: dict | None = None) -> None:
    """``transformer/`` and ``prompt_encoder/`` (diffusers ``save_pretrained``, safetensors)
    and ``tiny_cogvideox.json`` (vocabulary, clip spec, packing, scheduler, prediction
    convention, training record)."""
    save_layout(model, path, META_FILE,
                {"input_layout": f"hidden_states (B, F/{FRAMES_PER_TOKEN}, 3*{FRAMES_PER_TOKEN}, "
                                 "H, W): consecutive frame pairs stacked on channels "
                                 "(tiny_cogvideox.pack)"},
                "velocity = noise - x0 (direct model output); x_t = (1 - sigma) x0 + sigma "
                "noise; timestep = 1000 sigma; frames in [-1, 1]", training)


def load_tiny_cogvideox(path: str | Path | None = None, device: str | torch.device = "cpu") -> TinyCogVideoX:
    """Load a model saved by ``save_tiny_cogvideox`` (default: the shipped weights),
    eval mode, float32. Raises ``FileNotFoundError`` naming a missing file, ``ValueError`` on a
    vocabulary mismatch."""
    path = Path(path) if path is not None else WEIGHTS_DIR
    return TinyCogVideoX(*load_saved(path, META_FILE, CogVideoXTransformer3DModel,
                                     "save_tiny_cogvideox", device))
