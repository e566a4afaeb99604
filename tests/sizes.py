"""Inputs of the small families (``families.py``) at several latent sizes, for the
dynamic-shape tests (diffusers' ``test_compile_on_different_shapes`` pattern).

``sized_inputs(fam, k)`` returns the kwargs of one call at size ``k`` (0, 1, 2): the
family's own example at ``k == 0``, then other spatial sizes, with every input tied to the
latent's size (position ids, ``img_shapes``, packed token counts, padding masks) rebuilt to
match. Text inputs keep their length. Sizes stay within each config's position tables.
"""
from __future__ import annotations

import torch

from foresight_compile.models.families import Family, _flux_ids, _ts

# Per family: the latent shape at each size.
SHAPES: dict[str, list[tuple[int, ...]]] = {
    "wan": [(1, 4, 8, 16, 16), (1, 4, 4, 16, 16), (1, 4, 8, 16, 24)],
    "skyreels_v2": [(1, 4, 8, 16, 16), (1, 4, 4, 16, 16), (1, 4, 8, 16, 24)],
    "cogvideox": [(1, 8, 4, 16, 16), (1, 8, 4, 16, 24), (1, 8, 4, 24, 24)],
    "latte": [(1, 4, 8, 16, 16), (1, 4, 8, 16, 24), (1, 4, 8, 24, 24)],
    "pixart": [(1, 4, 16, 16), (1, 4, 16, 24), (1, 4, 24, 24)],
    "sd3": [(1, 4, 16, 16), (1, 4, 16, 24), (1, 4, 24, 24)],
    "hunyuan_video": [(1, 4, 4, 8, 8), (1, 4, 4, 8, 12), (1, 4, 4, 12, 12)],
    "allegro": [(1, 4, 4, 16, 16), (1, 4, 4, 16, 24), (1, 4, 4, 24, 24)],
    "mochi": [(1, 4, 4, 16, 16), (1, 4, 4, 16, 24), (1, 4, 4, 24, 24)],
    "cosmos": [(1, 4, 4, 16, 16), (1, 4, 4, 16, 24), (1, 4, 4, 24, 24)],
    # packed latents: (1, tokens, channels); the grid is in GRIDS
    "flux": [(1, 64, 16), (1, 96, 16), (1, 144, 16)],
    "qwenimage": [(1, 16, 16), (1, 32, 16), (1, 64, 16)],
    "ltx": [(1, 256, 4), (1, 384, 4), (1, 576, 4)],
    "cosmos3": [(1, 4, 2, 4, 4), (1, 4, 2, 4, 6), (1, 4, 2, 6, 6)],
    "cosmos3_denoiser": [(1, 4, 2, 4, 4), (1, 4, 2, 4, 6), (1, 4, 2, 6, 6)],
}
GRIDS = {"flux": [(8, 8), (8, 12), (12, 12)], "qwenimage": [(4, 4), (4, 8), (8, 8)],
         "ltx": [(4, 8, 8), (4, 8, 12), (4, 12, 12)]}


def sized_inputs(fam: Family, k: int, t: float = 999.0) -> dict:
    shape = SHAPES[fam.name][k]
    g = torch.Generator().manual_seed(1234 + k)
    x = torch.randn(shape, generator=g)
    timestep = torch.tensor([t])
    kw = fam.inputs(x, timestep)
    name = fam.name
    if name == "flux":
        h, w = GRIDS[name][k]
        kw["img_ids"], kw["txt_ids"] = _flux_ids(h, w, kw["encoder_hidden_states"].shape[1])
    elif name == "qwenimage":
        h, w = GRIDS[name][k]
        kw["img_shapes"] = [(1, h, w)]
    elif name == "ltx":
        f, h, w = GRIDS[name][k]
        kw.update(num_frames=f, height=h, width=w)
    elif name == "cosmos":
        kw["padding_mask"] = torch.zeros(1, 1, *shape[-2:])
    elif name in ("cosmos3", "cosmos3_denoiser"):
        kw = _cosmos3(fam, x, timestep)
    return kw


def _cosmos3(fam: Family, x: torch.Tensor, t: torch.Tensor) -> dict:
    T, H, W = x.shape[2:]
    n = T * H * W
    length = 2 + n
    vision = torch.arange(2, length)
    kw = dict(input_ids=torch.tensor([1, 2]), text_indexes=torch.tensor([0, 1]),
              position_ids=torch.zeros(3, length, dtype=torch.long), und_len=2,
              sequence_length=length, vision_sequence_indexes=vision,
              vision_timesteps=_ts(t).expand(n).clone())
    if fam.name == "cosmos3_denoiser":
        fam.model.shapes = [(T, H, W)]
        return dict(latents=x, **kw)
    return dict(kw, vision_tokens=[x], vision_token_shapes=[(T, H, W)],
                vision_mse_loss_indexes=vision, vision_noisy_frame_indexes=[torch.arange(T)],
                return_dict=False)
