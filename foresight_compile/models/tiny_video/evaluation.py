"""Evaluating tiny video DiT samples by image analysis, and writing them as pictures.

``evaluate_samples`` checks that each clip's moving object has the prompted colour (object
pixels found by chroma, the colour by the nearest palette chroma direction) and moves in the
prompted direction (least-squares velocity of the prompted colour's centroid).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from foresight_compile.models.tiny_video.data import (COLOURS, DIRECTIONS, SPEEDS, Prompt,
                                                     as_prompts)


@dataclasses.dataclass(frozen=True)
class SampleCheck:
    prompt: str
    colour: str | None  # dominant colour found (None: no object pixels)
    colour_ok: bool
    velocity: tuple[float, float] | None  # fitted centroid velocity (x, y), pixels per frame
    direction_ok: bool
    speed_ok: bool


@dataclasses.dataclass(frozen=True)
class EvalReport:
    samples: list[SampleCheck]

    def _rate(self, field: str) -> float:
        return sum(getattr(s, field) for s in self.samples) / max(1, len(self.samples))

    @property
    def colour_accuracy(self) -> float:
        return self._rate("colour_ok")

    @property
    def direction_accuracy(self) -> float:
        return self._rate("direction_ok")

    @property
    def speed_accuracy(self) -> float:
        return self._rate("speed_ok")

    def __str__(self) -> str:
        n = len(self.samples)
        return (f"{n} samples: colour {self.colour_accuracy:.1%} "
                f"({sum(s.colour_ok for s in self.samples)}/{n}), direction "
                f"{self.direction_accuracy:.1%} ({sum(s.direction_ok for s in self.samples)}/{n}), "
                f"speed {self.speed_accuracy:.1%} ({sum(s.speed_ok for s in self.samples)}/{n})")


CHROMA_THRESHOLD = 0.3  # max - min channel, in [0, 1]: backgrounds have 0, palette >= 0.65
MIN_SPEED = 0.3  # pixels per frame below which an object counts as not moving


def _classify_colours(rgb: torch.Tensor) -> torch.Tensor:
    """Palette index per pixel (..., 3) in [0, 1], by the direction of its chroma (the colour
    minus its grey part), so anti-aliased edges mixed with grey keep their colour."""
    palette = torch.tensor(list(COLOURS.values()))
    chroma = rgb - rgb.min(-1, keepdim=True).values
    ref = palette - palette.min(-1, keepdim=True).values
    cos = nn.functional.normalize(chroma, dim=-1) @ nn.functional.normalize(ref, dim=-1).T
    return cos.argmax(-1)


def evaluate_samples(frames: torch.Tensor, prompts: Sequence[Prompt | str]) -> EvalReport:
    """Check, by image analysis, that each clip shows each prompted object.

    Assumes clips (B, 3, F, H, W) in [-1, 1] on grey backgrounds (as ``make_clips`` draws
    them). Object pixels are those with chroma above ``CHROMA_THRESHOLD``, classified to the
    nearest palette colour. ``colour_ok``: the most frequent colour over all frames is the
    prompted one (two-object prompts: the two most frequent are the prompted pair).
    ``direction_ok``: the least-squares velocity of the centroid of the prompted colour's
    pixels is at least ``MIN_SPEED`` pixels per frame and within 45 degrees of the prompted
    direction (every object, for two-object prompts). ``speed_ok``: additionally the
    velocity's component along the direction is nearer the prompted speed than the other.
    """
    prompts = as_prompts(prompts)
    if frames.ndim != 5 or frames.shape[1] != 3 or frames.shape[0] != len(prompts):
        raise ValueError(f"expected frames (B, 3, F, H, W) with B = {len(prompts)} prompts, got "
                         f"{tuple(frames.shape)}")
    rgb = ((frames.detach().float().cpu() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 4, 1)  # B,F,H,W,3
    fg = (rgb.max(-1).values - rgb.min(-1).values) > CHROMA_THRESHOLD
    labels = _classify_colours(rgb)
    names = list(COLOURS)
    ys, xs = torch.meshgrid(torch.arange(rgb.shape[2], dtype=torch.float32),
                            torch.arange(rgb.shape[3], dtype=torch.float32), indexing="ij")
    checks = []
    for b, prompt in enumerate(prompts):
        counts = torch.bincount(labels[b][fg[b]], minlength=len(names))
        top = [names[i] for i in counts.argsort(descending=True)[: len(prompt.objects)].tolist()
               if counts[i] > 0]
        colour_ok = sorted(top) == sorted(o.colour for o in prompt.objects)
        direction_ok = speed_ok = True
        velocity = None
        for obj in prompt.objects:
            mask = (fg[b] & (labels[b] == names.index(obj.colour))).float()  # F,H,W
            area = mask.sum((1, 2))
            seen = area > 0
            if seen.sum() < 2:
                direction_ok = speed_ok = False
                continue
            cx = (mask * xs).sum((1, 2))[seen] / area[seen]
            cy = (mask * ys).sum((1, 2))[seen] / area[seen]
            t = torch.arange(rgb.shape[1], dtype=torch.float32)[seen]
            tc = t - t.mean()
            v = torch.stack([(tc * cx).sum(), (tc * cy).sum()]) / tc.square().sum()
            velocity = velocity or (round(v[0].item(), 3), round(v[1].item(), 3))
            along = float(v @ torch.tensor(DIRECTIONS[obj.direction]))
            ok = v.norm().item() >= MIN_SPEED and along >= v.norm().item() * math.cos(math.pi / 4)
            direction_ok &= ok
            nearest = min(SPEEDS, key=lambda s: abs(SPEEDS[s] - along))
            speed_ok &= ok and nearest == obj.speed
        checks.append(SampleCheck(prompt.text, top[0] if top else None, colour_ok, velocity,
                                  direction_ok, speed_ok))
    return EvalReport(checks)


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) uint8."""
    return ((frames.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(
        0, 2, 3, 4, 1)


def save_strip(frames: torch.Tensor, path: str | Path, labels: Sequence[str] | None = None,
               scale: int = 3) -> None:
    """A PNG with one row per clip, frames left to right, each row's label above it."""
    from PIL import Image, ImageDraw
    clips = to_uint8(frames).numpy()
    B, F, H, W, _ = clips.shape
    pad, text_h = 2, 12 if labels else 0
    cell_w, cell_h = W * scale + pad, H * scale + pad + text_h
    sheet = Image.new("RGB", (F * cell_w + pad, B * cell_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for b in range(B):
        top = pad + b * cell_h
        if labels:
            draw.text((pad, top), labels[b], fill=(0, 0, 0))
        for f in range(F):
            img = Image.fromarray(clips[b, f]).resize((W * scale, H * scale), Image.NEAREST)
            sheet.paste(img, (pad + f * cell_w, top + text_h))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def save_gif(frames: torch.Tensor, path: str | Path, scale: int = 4, ms_per_frame: int = 150) -> None:
    """An animated GIF with the clips side by side."""
    from PIL import Image
    clips = to_uint8(frames)  # B,F,H,W,3
    row = torch.cat(list(clips), dim=2).numpy()  # F,H,B*W,3
    images = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST)
              for f in row]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0)
