"""Cache bytes of real model configurations, planned on the meta device (no weights).

Builds each diffusers transformer at its published configuration under
``torch.device("meta")``, passes meta tensors shaped as its pipeline passes them at the
resolution people generate, and asks ``foresight_compile.plan_cache`` (the backend's own
planning code) what each policy would hold per branch. A branch is one CFG pass of one
request: Wan calls the model twice per step (cond, uncond), CogVideoX batches both in one call
(batch 2, one branch), HunyuanVideo and Flux are guidance-distilled (one call).

    python examples/cache_memory.py                      # every configuration, Markdown table
    python examples/cache_memory.py --models wan-1.3b-480p flux-1024 --json /tmp/cache.json

A few CPU-minutes per configuration (Dynamo traces the full-depth model on meta tensors).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

import foresight_compile  # noqa: E402

BF16 = torch.bfloat16
POLICIES = [("budget (default)", {}),
            ("foresight / static / profiling", {"policy": "foresight"}),
            ("foresight, cache_dtype=float8_e4m3fn", {"policy": "foresight",
                                                      "cache_dtype": "float8_e4m3fn"})]


def _meta(*shape, dtype=BF16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def wan(layers: int, heads: int, ffn: int, channels: int, latent: tuple[int, int, int]):
    def build():
        import diffusers
        with torch.device("meta"):
            model = diffusers.WanTransformer3DModel(
                patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=128,
                in_channels=channels, out_channels=channels, text_dim=4096, freq_dim=256,
                ffn_dim=ffn, num_layers=layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024).to(BF16)
        inputs = dict(hidden_states=_meta(1, channels, *latent), timestep=_meta(1, dtype=torch.long),
                      encoder_hidden_states=_meta(1, 512, 4096), return_dict=False)
        return model, inputs
    return build


def hunyuan_video():
    import diffusers
    with torch.device("meta"):
        model = diffusers.HunyuanVideoTransformer3DModel(
            in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128,
            num_layers=20, num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0,
            patch_size=2, patch_size_t=1, qk_norm="rms_norm", guidance_embeds=True,
            text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
            rope_axes_dim=(16, 56, 56)).to(BF16)
    # 720x1280, 129 frames: latent (33, 90, 160); the pipeline's prompt template gives 256 tokens
    inputs = dict(hidden_states=_meta(1, 16, 33, 90, 160), timestep=_meta(1, dtype=torch.long),
                  encoder_hidden_states=_meta(1, 256, 4096),
                  encoder_attention_mask=_meta(1, 256, dtype=torch.bool),
                  pooled_projections=_meta(1, 768), guidance=_meta(1), return_dict=False)
    return model, inputs


def cogvideox_5b():
    import diffusers
    with torch.device("meta"):
        model = diffusers.CogVideoXTransformer3DModel(
            num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16,
            num_layers=42, text_embed_dim=4096, time_embed_dim=512,
            use_rotary_positional_embeddings=True, sample_height=60, sample_width=90,
            sample_frames=49).to(BF16)
    # 480x720, 49 frames: latent (13, 60, 90); CFG batched (2 rows, one call)
    tokens = 13 * 30 * 45
    inputs = dict(hidden_states=_meta(2, 13, 16, 60, 90), timestep=_meta(2, dtype=torch.long),
                  encoder_hidden_states=_meta(2, 226, 4096),
                  image_rotary_emb=(_meta(tokens, 64, dtype=torch.float32),
                                    _meta(tokens, 64, dtype=torch.float32)),
                  return_dict=False)
    return model, inputs


def flux_1024():
    import diffusers
    with torch.device("meta"):
        model = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
            pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)).to(BF16)
    # 1024x1024: 64x64 packed latent = 4096 tokens, 512 T5 tokens
    inputs = dict(hidden_states=_meta(1, 4096, 64), timestep=_meta(1), guidance=_meta(1),
                  encoder_hidden_states=_meta(1, 512, 4096), pooled_projections=_meta(1, 768),
                  txt_ids=_meta(512, 3, dtype=torch.float32),
                  img_ids=_meta(4096, 3, dtype=torch.float32), return_dict=False)
    return model, inputs


# name -> (builder, branches per request step under the pipeline's default guidance, label)
CONFIGS: dict[str, tuple[Callable, int, str]] = {
    "wan-1.3b-480p": (wan(30, 12, 8960, 16, (21, 60, 104)), 2,
                      "Wan2.1-1.3B, 480x832, 81 frames (32,760 tokens), CFG: 2 calls"),
    "wan-14b-720p": (wan(40, 40, 13824, 16, (21, 90, 160)), 2,
                     "Wan2.1-14B, 720x1280, 81 frames (75,600 tokens), CFG: 2 calls"),
    "wan2.2-5b-720p": (wan(30, 24, 14336, 48, (31, 44, 80)), 2,
                       "Wan2.2-TI2V-5B, 704x1280, 121 frames (27,280 tokens), CFG: 2 calls"),
    "hunyuan-720p": (hunyuan_video, 1,
                     "HunyuanVideo, 720x1280, 129 frames (118,800 tokens), guidance-distilled"),
    "cogvideox-5b": (cogvideox_5b, 1,
                     "CogVideoX-5B, 480x720, 49 frames (17,550 tokens), CFG batched (batch 2)"),
    "flux-1024": (flux_1024, 1, "Flux.1-dev, 1024x1024 (4,096 tokens), guidance-distilled"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--json", help="write the plans here")
    args = parser.parse_args()
    rows, dump = [], {}
    for name in args.models:
        build, branches, label = CONFIGS[name]
        model, inputs = build()
        plans = foresight_compile.plan_cache(model, **inputs, options=[o for _, o in POLICIES])
        torch._dynamo.reset()
        dump[name] = {"label": label, "branches": branches,
                      "plans": [p.to_dict() for p in plans]}
        cells = [f"{p.bytes_per_branch / 2**30:.2f} GiB" if p.bytes_per_branch >= 2**30
                 else f"{p.bytes_per_branch / 2**20:.0f} MiB" for p in plans]
        per_request = plans[0].bytes_per_branch * branches / 2**30
        rows.append(f"| {label} | {plans[0].blocks} | " + " | ".join(cells)
                    + f" | {per_request:.2f} GiB |")
        print(f"{name}: " + "; ".join(str(p) for p in plans), flush=True)
    print("\n| configuration | blocks | " + " | ".join(n for n, _ in POLICIES)
          + " | default per request |")
    print("|---|---|" + "---|" * len(POLICIES) + "---|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=1)


if __name__ == "__main__":
    main()
