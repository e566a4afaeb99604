"""A small trained video DiT that ships with the project, so fidelity figures mean something.

Random-weight models lack the step-to-step dynamics of trained ones (docs/DESIGN.md section 4). The
shipped model (``foresight_compile/assets/tiny_video_dit/``) is described in four modules:
``data`` (procedural clips and prompts), ``model`` (the Wan subclass, its prompt encoder,
loading), ``sampler`` (a diffusers flow-matching loop) and ``evaluation`` (colour and
direction checks, pictures). This package hands their public names on::

    from foresight_compile.models import tiny_video as tv
    transformer, encoder, scheduler_config = tv.load_tiny_video_dit()
    clips = tv.sample(transformer, encoder, scheduler_config, ["red circle moving right fast"])
"""
from foresight_compile.models.tiny_video.data import (COLOURS, DIRECTIONS, MAX_OBJECTS, NONE,
                                                     NULL, SHAPES, SLOTS_PER_OBJECT, SPEEDS,
                                                     VOCAB, Clips, ClipSpec, ObjectSpec, Prompt,
                                                     as_prompts, evaluation_prompts, make_clips,
                                                     null_tokens, random_prompts)
from foresight_compile.models.tiny_video.evaluation import (CHROMA_THRESHOLD, MIN_SPEED,
                                                           EvalReport, SampleCheck,
                                                           evaluate_samples, save_gif,
                                                           save_strip, to_uint8)
from foresight_compile.models.tiny_video.model import (ASSET_DIR, META_FILE, SCHEDULER_CONFIG,
                                                      SIGMA_EPS, TinyPromptEncoder,
                                                      TinyVideoDiT, TinyVideoTransformer,
                                                      build_tiny_video_dit, coordinate_planes,
                                                      load_tiny_video_dit, model_input,
                                                      save_tiny_video_dit, transformer_config)
from foresight_compile.models.tiny_video.sampler import initial_noise, sample

__all__ = [
    "COLOURS", "DIRECTIONS", "MAX_OBJECTS", "NONE", "NULL", "SHAPES", "SLOTS_PER_OBJECT",
    "SPEEDS", "VOCAB", "Clips", "ClipSpec", "ObjectSpec", "Prompt", "as_prompts",
    "evaluation_prompts", "make_clips", "null_tokens", "random_prompts", "CHROMA_THRESHOLD", "MIN_SPEED", "EvalReport",
    "SampleCheck", "evaluate_samples", "save_gif", "save_strip", "to_uint8", "ASSET_DIR",
    "META_FILE", "SCHEDULER_CONFIG", "SIGMA_EPS", "TinyPromptEncoder", "TinyVideoDiT",
    "TinyVideoTransformer", "build_tiny_video_dit", "coordinate_planes", "load_tiny_video_dit",
    "model_input", "save_tiny_video_dit", "transformer_config", "initial_noise", "sample",
]
