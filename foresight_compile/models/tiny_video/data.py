"""The tiny video DiT's data: procedural clips of shapes crossing the frame, and their prompts.

``make_clips`` draws clips (8 frames, 32x32 RGB in [-1, 1]) of one or two shapes (circle,
square, triangle) in one of six saturated colours, crossing the frame right, left, up or
down, slow or fast, over a plain or faintly textured grey background. Each clip comes with
its ``Prompt``, e.g. ``"red circle moving right fast"``, tokenised over ``VOCAB``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

SHAPES = ("circle", "square", "triangle")
# Saturated colours only: every background is grey, so chroma alone separates object
# from background in evaluate_samples, textured or not.
COLOURS = {"red": (0.90, 0.15, 0.15), "green": (0.15, 0.80, 0.20), "blue": (0.20, 0.35, 0.95),
           "yellow": (0.95, 0.85, 0.15), "magenta": (0.90, 0.20, 0.85), "cyan": (0.15, 0.85, 0.90)}
# Image coordinates (x right, y down): "up" decreases the row index.
DIRECTIONS = {"right": (1.0, 0.0), "left": (-1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
# Fast enough that the path spans a third to over half the frame: at the 4-pixel patch,
# slower motion (0.75 / 1.5 px/frame) left a model that ignored the direction word.
SPEEDS = {"slow": 1.5, "fast": 2.5}  # pixels per frame
NULL, NONE = "<null>", "<none>"  # unconditional (CFG) token; absent-second-object token
VOCAB = (NULL, NONE) + SHAPES + tuple(COLOURS) + tuple(DIRECTIONS) + tuple(SPEEDS)
MAX_OBJECTS = 2
SLOTS_PER_OBJECT = 4  # shape, colour, direction, speed
# Rejection sampling of two-object layouts; a failure rate near zero (measured: none in 10^4 clips).
MAX_PLACEMENT_TRIES = 1000

@dataclasses.dataclass(frozen=True)
class ClipSpec:
    """Geometry of a clip. The shipped model was trained on the defaults only."""

    frames: int = 8
    size: int = 32
    radius: tuple[float, float] = (3.0, 4.5)  # circle radius / square half side, pixels
    triangle_scale: float = 1.35  # triangle circumradius / radius, for similar areas
    # A lone object crosses the frame within this many pixels of its middle line (two objects:
    # anywhere they fit apart), so the prompt fixes its path up to a few pixels: a target a
    # model can learn in the CPU training budget. Adopted with the other recipe changes
    # (x0 prediction, coordinate planes, shift 3); whether the full range would also do
    # with the final recipe was not measured.
    cross_jitter: float = 4.0
    start_slack: float = 3.0  # pixels: how far from the edge it leaves an object may begin

    def clip_shape(self, batch: int) -> tuple[int, int, int, int, int]:
        """(batch, 3, frames, size, size): the shape of ``batch`` clips (and of their noise)."""
        return (batch, 3, self.frames, self.size, self.size)


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One moving object. ``__post_init__`` rejects words outside the vocabulary."""

    shape: str
    colour: str
    direction: str
    speed: str

    def __post_init__(self) -> None:
        for field, valid in (("shape", SHAPES), ("colour", COLOURS), ("direction", DIRECTIONS),
                             ("speed", SPEEDS)):
            value = getattr(self, field)
            if value not in valid:
                raise ValueError(f"unknown {field} {value!r}; accepted: {', '.join(valid)}")

    @property
    def text(self) -> str:
        return f"{self.colour} {self.shape} moving {self.direction} {self.speed}"


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One or two objects, e.g. ``Prompt.parse("red circle moving up slow and blue square
    moving left fast")``. ``tokens()`` gives the fixed-length token ids the encoder reads."""

    objects: tuple[ObjectSpec, ...]

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"a prompt has 1 to {MAX_OBJECTS} objects, got {len(self.objects)}")
        if len({o.colour for o in self.objects}) != len(self.objects):
            raise ValueError("the objects of a prompt must have different colours (evaluation "
                             "tells them apart by colour)")

    @classmethod
    def parse(cls, text: str) -> "Prompt":
        """Parse ``"COLOUR SHAPE moving DIRECTION SPEED"``, objects joined by ``" and "``."""
        objects = []
        for part in text.strip().lower().split(" and "):
            words = part.split()
            if len(words) != 5 or words[2] != "moving":
                raise ValueError(f"cannot parse {part!r}: expected 'COLOUR SHAPE moving DIRECTION "
                                 f"SPEED', e.g. 'red circle moving right fast'")
            objects.append(ObjectSpec(shape=words[1], colour=words[0], direction=words[3],
                                      speed=words[4]))
        return cls(tuple(objects))

    @property
    def text(self) -> str:
        return " and ".join(o.text for o in self.objects)

    def tokens(self) -> list[int]:
        words = []
        for i in range(MAX_OBJECTS):
            o = self.objects[i] if i < len(self.objects) else None
            words += [o.shape, o.colour, o.direction, o.speed] if o else [NONE] * SLOTS_PER_OBJECT
        return [VOCAB.index(w) for w in words]


def as_prompts(prompts: Sequence[Prompt | str]) -> list[Prompt]:
    return [p if isinstance(p, Prompt) else Prompt.parse(p) for p in prompts]


def null_tokens(batch: int) -> torch.Tensor:
    """Token ids of the unconditional prompt (classifier-free guidance), shape (batch, 8)."""
    return torch.full((batch, MAX_OBJECTS * SLOTS_PER_OBJECT), VOCAB.index(NULL), dtype=torch.long)


def random_prompts(n: int, generator: torch.Generator, two_object_prob: float = 0.0) -> list[Prompt]:
    """``n`` prompts with attributes drawn uniformly; a second object (of another colour)
    with probability ``two_object_prob``. Deterministic for a given generator state."""
    def pick(options, k):
        return [options[i] for i in torch.randint(len(options), (k,), generator=generator).tolist()]
    colours = list(COLOURS)
    out = []
    for _ in range(n):
        count = 2 if torch.rand((), generator=generator).item() < two_object_prob else 1
        cols = [colours[i] for i in torch.randperm(len(colours), generator=generator)[:count].tolist()]
        out.append(Prompt(tuple(ObjectSpec(s, c, d, v) for s, c, d, v in zip(
            pick(SHAPES, count), cols, pick(list(DIRECTIONS), count), pick(list(SPEEDS), count)))))
    return out


def evaluation_prompts(n: int = 32, seed: int = 1234) -> list[Prompt]:
    """The fixed single-object prompts of the acceptance check (the first ``k`` of them are
    the same for every ``n >= k``)."""
    return random_prompts(n, torch.Generator().manual_seed(seed), two_object_prob=0.0)


@dataclasses.dataclass
class Clips:
    """``frames``: (B, 3, F, H, W) in [-1, 1]. ``centres``: (B, 2, F, 2) drawn (x, y) centre of
    each object per frame, NaN for an absent second object. ``tokens``: (B, 8) long."""

    frames: torch.Tensor
    prompts: list[Prompt]
    tokens: torch.Tensor
    centres: torch.Tensor


def _coverage(shape_idx: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor,
              spec: ClipSpec) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] from an approximate signed distance (pixels)."""
    circle = torch.sqrt(dx * dx + dy * dy) - r
    square = torch.maximum(dx.abs(), dy.abs()) - r
    # Upward equilateral triangle: the max over its three edges' half-plane distances (exact
    # inside, a slight overestimate near the corners outside: fine for anti-aliasing).
    inradius = 0.5 * spec.triangle_scale * r
    s, c = math.sin(math.pi / 3), math.cos(math.pi / 3)
    triangle = torch.maximum(torch.maximum(dy, s * dx - c * dy), -s * dx - c * dy) - inradius
    sdf = torch.where(shape_idx == 0, circle, torch.where(shape_idx == 1, square, triangle))
    return (0.5 - sdf).clamp(0.0, 1.0)


def make_clips(batch: int, generator: torch.Generator, spec: ClipSpec = ClipSpec(),
               prompts: Sequence[Prompt | str] | None = None, two_object_prob: float = 0.2,
               textured_prob: float = 0.25) -> Clips:
    """Draw ``batch`` clips (random prompts unless ``prompts`` is given).

    Assumes nothing beyond a seeded ``generator``; the same generator state gives the same
    clips. Guarantees: every object stays fully inside every frame; it moves
    ``SPEEDS[speed]`` pixels per frame along ``DIRECTIONS[direction]``, starting within
    ``spec.start_slack`` pixels of the edge it moves away from (a lone object: within
    ``spec.cross_jitter`` of the middle line across its direction); ``centres`` is where
    it was drawn; backgrounds are grey (plain, or with faint stripes or a checkerboard),
    never coloured; two objects' centres are at least the sum of their radii apart in every
    frame (so neither hides the other; squares may overlap at a corner), the second drawn
    over the first.
    """
    prompts = as_prompts(prompts) if prompts is not None else random_prompts(
        batch, generator, two_object_prob)
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for batch={batch}; pass one per clip")
    F, S = spec.frames, spec.size
    g = generator

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    ys, xs = torch.meshgrid(torch.arange(S, dtype=torch.float32),
                            torch.arange(S, dtype=torch.float32), indexing="ij")
    level = uniform(0.08, 0.40, batch, 1, 1)
    period = uniform(4.0, 8.0, batch, 1, 1)
    angle = uniform(0.0, math.pi, batch, 1, 1)
    stripes = torch.sin(2 * math.pi * (xs * angle.cos() + ys * angle.sin()) / period)
    checker = torch.sign(torch.sin(math.pi * xs / period) * torch.sin(math.pi * ys / period))
    kind = torch.randint(2, (batch, 1, 1), generator=g)
    pattern = torch.where(kind == 0, stripes, checker)
    textured = (torch.rand(batch, 1, 1, generator=g) < textured_prob).float()
    background = (level + 0.05 * textured * pattern).clamp(0, 1)
    frames = background[:, None, None].expand(batch, 3, F, S, S).clone()

    centres = torch.full((batch, MAX_OBJECTS, F, 2), float("nan"))
    t = torch.arange(F, dtype=torch.float32)

    def place(obj: ObjectSpec, lone: bool) -> tuple[torch.Tensor, torch.Tensor]:
        r = uniform(*spec.radius, 1)
        extent = (r * (spec.triangle_scale if obj.shape == "triangle" else 1.0)).item()
        d = DIRECTIONS[obj.direction]
        # Along its direction an object starts within start_slack pixels of the edge it leaves
        # (it crosses the frame); across it, anywhere inside. A first recipe that started
        # anywhere its path fit gave a model that ignored the direction word (at high noise
        # the direction then barely changes where the object is expected in each frame).
        lo, hi = extent, S - 1 - extent
        mid = (S - 1) / 2
        cross = (max(lo, mid - spec.cross_jitter), min(hi, mid + spec.cross_jitter)) if lone else (lo, hi)
        slack = min(spec.start_slack, hi - lo - SPEEDS[obj.speed] * (F - 1))  # the path stays inside
        start = torch.stack([uniform(*cross, 1)[0] if dd == 0 else
                             (lo + slack * torch.rand((), generator=g)) if dd > 0 else
                             (hi - slack * torch.rand((), generator=g)) for dd in d])
        return r, start + t[:, None] * SPEEDS[obj.speed] * torch.tensor(d)  # (1,), (F, 2)

    for b, prompt in enumerate(prompts):
        for _ in range(MAX_PLACEMENT_TRIES):
            placed = [place(obj, len(prompt.objects) == 1) for obj in prompt.objects]
            if len(placed) == 1 or ((placed[0][1] - placed[1][1]).norm(dim=-1)
                                    >= placed[0][0] + placed[1][0]).all():
                break
        else:
            raise RuntimeError(f"could not place {prompt.text!r} without overlap in "
                               f"{MAX_PLACEMENT_TRIES} tries")
        for k, (obj, (r, path)) in enumerate(zip(prompt.objects, placed)):
            centres[b, k] = path
            dx = xs - path[:, 0, None, None]
            dy = ys - path[:, 1, None, None]
            alpha = _coverage(torch.tensor(SHAPES.index(obj.shape)), dx, dy, r, spec)  # (F, S, S)
            colour = torch.tensor(COLOURS[obj.colour])[:, None, None, None]
            frames[b] = frames[b] * (1 - alpha) + colour * alpha
    tokens = torch.tensor([p.tokens() for p in prompts], dtype=torch.long)
    return Clips(frames * 2 - 1, prompts, tokens, centres)
