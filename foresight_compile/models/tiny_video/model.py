"""The tiny video DiT's model: a ``WanTransformer3DModel`` subclass and its prompt encoder.

``TinyVideoTransformer`` is diffusers' ``WanTransformer3DModel`` (patch (2, 4, 4), 8 blocks,
hidden 128, 2.3 M parameters) in pixel space, conditioned through ``encoder_hidden_states``
from ``TinyPromptEncoder`` (an embedding table over the attribute tokens). Two
parameter-free steps wrap the Wan forward: it reads the clip with frame/column/row planes
(``coordinate_planes``) and its stack predicts the clean clip, returned as the velocity of
rectified flow: with ``x_t = (1 - s) x0 + s noise`` and ``timestep = 1000 s`` the forward
returns ``noise - x0``, the convention of diffusers' ``FlowMatchEulerDiscreteScheduler``.
``load_tiny_video_dit()`` loads the shipped weights (diffusers ``from_pretrained`` layout,
safetensors); ``examples/train_tiny_dit.py`` reproduces them.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple, Sequence

import torch
from diffusers import ConfigMixin, ModelMixin, WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from foresight_compile.models.tiny_video.data import (MAX_OBJECTS, SLOTS_PER_OBJECT, VOCAB,
                                                     ClipSpec, Prompt, as_prompts)

ASSET_DIR = Path(__file__).resolve().parents[2] / "assets" / "tiny_video_dit"
META_FILE = "tiny_video.json"
# Shift 3 (as SD3 and Wan sample): more of the steps at high noise, where the path is decided;
# training draws its noise levels with the same shift (examples/train_tiny_dit.py).
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}


class TinyPromptEncoder(ModelMixin, ConfigMixin):
    """Token ids (B, slots) -> ``encoder_hidden_states`` (B, slots, dim): a token embedding
    plus a per-slot embedding (so the second object's tokens differ from the first's)."""

    @register_to_config
    def __init__(self, vocab_size: int = len(VOCAB), num_slots: int = MAX_OBJECTS * SLOTS_PER_OBJECT,
                 dim: int = 64) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.slot_embedding = nn.Parameter(torch.randn(num_slots, dim) * 0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens) + self.slot_embedding

    def encode(self, prompts: Sequence[Prompt | str]) -> torch.Tensor:
        """``encoder_hidden_states`` for prompts (strings are parsed with ``Prompt.parse``)."""
        tokens = torch.tensor([p.tokens() for p in as_prompts(prompts)], dtype=torch.long)
        return self(tokens.to(self.device))


def coordinate_planes(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W): each position's frame index, column and row, mapped to [-1, 1].

    Wan has no absolute position embedding (its RoPE is relative in time and space), so a
    pixel-space Wan cannot tell the first frame from the last or the left edge from the
    right: "moving right" is then learnable only through relative attention, slowly. Like
    Wan image-to-video, which concatenates conditioning channels (image latent, frame mask)
    to ``hidden_states``, the tiny model reads the clip plus these planes (CoordConv)."""
    B, _, F, H, W = x.shape
    t, y, w = (torch.linspace(-1.0, 1.0, n, dtype=x.dtype, device=x.device) for n in (F, H, W))
    grid = torch.stack(torch.meshgrid(t, w, y, indexing="ij"))  # (3, F, W, H): t, column, row
    return grid.transpose(-1, -2)[None].expand(B, 3, F, H, W)


SIGMA_EPS = 1e-3  # below every sigma diffusers' flow-matching schedules sample (>= 0.0089)


class TinyVideoTransformer(WanTransformer3DModel):
    """diffusers' ``WanTransformer3DModel`` with two parameter-free steps around its forward,
    so it is a drop-in velocity model for ``FlowMatchEulerDiscreteScheduler``:

    - in: ``hidden_states`` is the noisy clip (B, 3, F, H, W); the Wan stack reads it with
      its ``coordinate_planes`` (``in_channels=6``);
    - out: the Wan stack predicts the clean clip x0 (JiT, Li & He 2025: in pixel space with
      large patches, predicting the clean image trains far faster than predicting noise or
      velocity, whose noise part must be carried through a narrow residual stream); the
      forward returns the velocity ``(x_t - x0) / sigma`` with ``sigma = timestep / 1000``.

    Velocity-predicting Wans of the same size (seven recipes, up to 2800 steps) drew the
    prompted colour but moved the prompted way in no more than 12-50% of clips (chance 25%)."""

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_hidden_states: torch.Tensor, encoder_hidden_states_image=None,
                return_dict: bool = True, attention_kwargs=None):
        clean = super().forward(model_input(hidden_states), timestep, encoder_hidden_states,
                                encoder_hidden_states_image, return_dict=False,
                                attention_kwargs=attention_kwargs)[0]
        sigma = (timestep.float() / SCHEDULER_CONFIG["num_train_timesteps"]).clamp_min(SIGMA_EPS)
        # In the input's dtype, so a bfloat16 pipeline gets bfloat16 back, as from any Wan.
        velocity = (hidden_states - clean) / sigma.to(hidden_states.dtype).reshape(-1, 1, 1, 1, 1)
        if not return_dict:
            return (velocity,)
        return Transformer2DModelOutput(sample=velocity)


def model_input(x: torch.Tensor) -> torch.Tensor:
    """What the Wan stack reads for a noisy clip x (B, 3, F, H, W): x and its coordinate planes."""
    return torch.cat([x, coordinate_planes(x)], dim=1)


def transformer_config() -> dict:
    """Arguments of the shipped ``WanTransformer3DModel`` (2.3 M parameters, 256 tokens;
    input: RGB + 3 coordinate planes, output: RGB velocity)."""
    return dict(patch_size=(2, 4, 4), num_attention_heads=4, attention_head_dim=32, in_channels=6,
                out_channels=3, text_dim=64, freq_dim=256, ffn_dim=512, num_layers=8,
                cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


class TinyVideoDiT(NamedTuple):
    """What ``load_tiny_video_dit`` returns: unpack as ``transformer, encoder, scheduler_config``."""

    transformer: TinyVideoTransformer
    prompt_encoder: TinyPromptEncoder
    scheduler_config: dict


def build_tiny_video_dit(seed: int = 0) -> TinyVideoDiT:
    """The shipped architecture with fresh random weights (diffusers' default init), seeded."""
    torch.manual_seed(seed)
    transformer = TinyVideoTransformer(**transformer_config())
    encoder = TinyPromptEncoder(dim=transformer.config.text_dim)
    return TinyVideoDiT(transformer.eval(), encoder.eval(), dict(SCHEDULER_CONFIG))


def save_tiny_video_dit(model: TinyVideoDiT, path: str | Path, training: dict | None = None) -> None:
    """Write ``transformer/`` and ``prompt_encoder/`` (diffusers ``save_pretrained``,
    safetensors) and ``tiny_video.json`` (vocabulary, clip spec, scheduler config, and the
    training record if given) under ``path``."""
    save_layout(model, path, META_FILE, {},
                "velocity = noise - x0; x_t = (1 - sigma) x0 + sigma noise; "
                "timestep = 1000 sigma; frames in [-1, 1]", training)


def save_layout(model, path: str | Path, meta_file: str, layout: dict, prediction: str,
                training: dict | None) -> None:
    """The layout ``load_saved`` reads, for every tiny model: ``transformer/`` and
    ``prompt_encoder/`` (diffusers ``save_pretrained``, safetensors) and ``meta_file``
    (vocabulary, clip spec, the model's own ``layout`` entries, scheduler, ``prediction``
    convention, training record)."""
    path = Path(path)
    model.transformer.save_pretrained(path / "transformer", safe_serialization=True)
    model.prompt_encoder.save_pretrained(path / "prompt_encoder", safe_serialization=True)
    meta = {"vocab": list(VOCAB), "clip": dataclasses.asdict(ClipSpec()), **layout,
            "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", **model.scheduler_config},
            "prediction": prediction, "training": training or {}}
    (path / meta_file).write_text(json.dumps(meta, indent=1) + "\n")


def load_tiny_video_dit(path: str | Path | None = None, device: str | torch.device = "cpu") -> TinyVideoDiT:
    """Load the shipped model (or one saved by ``save_tiny_video_dit`` at ``path``), in eval
    mode, float32.

    Guarantees the vocabulary stored with the weights is the one this module tokenises with;
    raises ``FileNotFoundError`` naming the missing file, ``ValueError`` on a vocabulary
    mismatch."""
    path = Path(path) if path is not None else ASSET_DIR
    return TinyVideoDiT(*load_saved(path, META_FILE, TinyVideoTransformer, "save_tiny_video_dit",
                                    device))


def load_saved(path: Path, meta_file: str, transformer_cls, saver: str,
               device: str | torch.device, encoder_cls=None) -> tuple:
    """(transformer, prompt encoder, scheduler config) from the layout the savers of the tiny
    models write (``transformer/``, ``prompt_encoder/``, ``meta_file``), eval mode; the
    prompt encoder's class is ``encoder_cls`` (default ``TinyPromptEncoder``); raises
    ``FileNotFoundError`` naming a missing file, ``ValueError`` on a vocabulary mismatch."""
    for needed in (meta_file, "transformer/config.json", "prompt_encoder/config.json"):
        if not (path / needed).is_file():
            raise FileNotFoundError(f"{path / needed} is missing: expected the layout written by "
                                    f"{saver} (transformer/, prompt_encoder/, {meta_file})")
    meta = json.loads((path / meta_file).read_text())
    if tuple(meta["vocab"]) != VOCAB:
        raise ValueError(f"{path / meta_file} has vocabulary {meta['vocab']}, this code "
                         f"tokenises with {list(VOCAB)}: weights and code are from different versions")
    transformer = transformer_cls.from_pretrained(path / "transformer").to(device).eval()
    encoder_cls = TinyPromptEncoder if encoder_cls is None else encoder_cls
    encoder = encoder_cls.from_pretrained(path / "prompt_encoder").to(device).eval()
    scheduler = {k: v for k, v in meta["scheduler"].items() if k != "class"}
    return transformer, encoder, scheduler
