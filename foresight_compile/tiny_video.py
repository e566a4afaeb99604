"""A small trained video DiT that ships with the project, so fidelity figures mean something.

Random-weight models lack the step-to-step dynamics of trained ones (DESIGN.md §4). This
module holds everything around the shipped model, ``assets/tiny_video_dit/``:

- **data**: ``make_clips`` draws procedural clips (8 frames, 32×32 RGB in [-1, 1]) of one or
  two shapes (circle, square, triangle) in one of six saturated colours, crossing the frame
  right, left, up or down, slow or fast, over a plain or faintly textured grey background. Each clip
  comes with its ``Prompt``, e.g. ``"red circle moving right fast"``.
- **model**: ``TinyVideoTransformer``, diffusers' ``WanTransformer3DModel`` (patch (2, 4, 4),
  8 blocks, hidden 128, 2.3 M parameters) in pixel space, conditioned through
  ``encoder_hidden_states`` from ``TinyPromptEncoder`` (an embedding table over the attribute
  tokens). Two parameter-free steps wrap the Wan forward: it reads the clip with
  frame/column/row planes (``coordinate_planes``) and its stack predicts the clean clip,
  returned as the velocity of rectified flow: with ``x_t = (1 - s) x0 + s noise`` and
  ``timestep = 1000 s`` the forward returns ``noise - x0``, the convention of diffusers'
  ``FlowMatchEulerDiscreteScheduler``.
- **loading**: ``load_tiny_video_dit()`` (diffusers ``from_pretrained`` layout, safetensors).
- **sampling**: ``sample(...)``, an ordinary diffusers-style loop, so
  ``torch.compile(transformer, backend="foresight")`` plugs in.
- **evaluation**: ``evaluate_samples`` checks by image analysis that each clip's moving
  object has the prompted colour and moves in the prompted direction.

``examples/train_tiny_dit.py`` reproduces the weights.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from diffusers import ConfigMixin, FlowMatchEulerDiscreteScheduler, ModelMixin, WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "tiny_video_dit"
META_FILE = "tiny_video.json"

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
# Shift 3 (as SD3 and Wan sample): more of the steps at high noise, where the path is decided;
# training draws its noise levels with the same shift (examples/train_tiny_dit.py).
SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
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
    path = Path(path)
    model.transformer.save_pretrained(path / "transformer", safe_serialization=True)
    model.prompt_encoder.save_pretrained(path / "prompt_encoder", safe_serialization=True)
    meta = {"vocab": list(VOCAB), "clip": dataclasses.asdict(ClipSpec()),
            "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", **model.scheduler_config},
            "prediction": "velocity = noise - x0; x_t = (1 - sigma) x0 + sigma noise; "
                          "timestep = 1000 sigma; frames in [-1, 1]",
            "training": training or {}}
    (path / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def load_tiny_video_dit(path: str | Path | None = None, device: str | torch.device = "cpu") -> TinyVideoDiT:
    """Load the shipped model (or one saved by ``save_tiny_video_dit`` at ``path``), in eval
    mode, float32.

    Guarantees the vocabulary stored with the weights is the one this module tokenises with;
    raises ``FileNotFoundError`` naming the missing file, ``ValueError`` on a vocabulary
    mismatch."""
    path = Path(path) if path is not None else ASSET_DIR
    for needed in (META_FILE, "transformer/config.json", "prompt_encoder/config.json"):
        if not (path / needed).is_file():
            raise FileNotFoundError(f"{path / needed} is missing: expected the layout written by "
                                    f"save_tiny_video_dit (transformer/, prompt_encoder/, {META_FILE})")
    meta = json.loads((path / META_FILE).read_text())
    if tuple(meta["vocab"]) != VOCAB:
        raise ValueError(f"{path / META_FILE} has vocabulary {meta['vocab']}, this code "
                         f"tokenises with {list(VOCAB)}: weights and code are from different versions")
    transformer = TinyVideoTransformer.from_pretrained(path / "transformer").to(device).eval()
    encoder = TinyPromptEncoder.from_pretrained(path / "prompt_encoder").to(device).eval()
    scheduler = {k: v for k, v in meta["scheduler"].items() if k != "class"}
    return TinyVideoDiT(transformer, encoder, scheduler)


def initial_noise(seeds: Sequence[int], spec: ClipSpec = ClipSpec()) -> torch.Tensor:
    """One noise clip per seed (independent of batch composition), (B, 3, F, H, W)."""
    shape = spec.clip_shape(1)[1:]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


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
    prompts = as_prompts(prompts)
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one per prompt")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    x = initial_noise(seeds, spec)
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
