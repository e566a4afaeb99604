"""The second trained tiny video DiT: a velocity-predicting ``CogVideoXTransformer3DModel``
(``model``) and its sampler (``sampler``); data and evaluation are ``models.tiny_video``'s.

    from foresight_compile.models import tiny_cogvideox as tc
    transformer, encoder, scheduler_config = tc.load_tiny_cogvideox()
    clips = tc.sample(transformer, encoder, scheduler_config, ["red circle moving right fast"])
"""
from foresight_compile.models.tiny_cogvideox.model import (FRAMES_PER_TOKEN, META_FILE,
                                                          WEIGHTS_DIR, TinyCogVideoX,
                                                          build_tiny_cogvideox, frames_per_token,
                                                          load_tiny_cogvideox, pack,
                                                          save_tiny_cogvideox, transformer_config,
                                                          unpack, velocity)
from foresight_compile.models.tiny_cogvideox.sampler import sample

__all__ = ["FRAMES_PER_TOKEN", "META_FILE", "WEIGHTS_DIR", "TinyCogVideoX", "build_tiny_cogvideox",
           "frames_per_token", "load_tiny_cogvideox", "pack", "save_tiny_cogvideox",
           "transformer_config", "unpack", "velocity", "sample"]
