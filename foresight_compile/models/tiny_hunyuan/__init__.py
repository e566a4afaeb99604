"""The third trained tiny video DiT: a velocity-predicting ``HunyuanVideoTransformer3DModel``
(dual-stream blocks, then single-stream blocks; ``model``) and its sampler (``sampler``);
data and evaluation are ``models.tiny_video``'s.

    from foresight_compile.models import tiny_hunyuan as th
    transformer, encoder, scheduler_config = th.load_tiny_hunyuan()
    clips = th.sample(transformer, encoder, scheduler_config, ["red circle moving right fast"])
"""
from foresight_compile.models.tiny_hunyuan.model import (EMBEDDED_GUIDANCE_SCALE, META_FILE,
                                                        WEIGHTS_DIR, PromptEmbeds, TinyHunyuan,
                                                        TinyHunyuanPromptEncoder,
                                                        build_tiny_hunyuan, guidance_tensor,
                                                        load_tiny_hunyuan, save_tiny_hunyuan,
                                                        transformer_config, transformer_kwargs,
                                                        velocity)
from foresight_compile.models.tiny_hunyuan.sampler import sample

__all__ = ["EMBEDDED_GUIDANCE_SCALE", "META_FILE", "WEIGHTS_DIR", "PromptEmbeds", "TinyHunyuan",
           "TinyHunyuanPromptEncoder", "build_tiny_hunyuan", "guidance_tensor",
           "load_tiny_hunyuan", "save_tiny_hunyuan", "transformer_config", "transformer_kwargs",
           "velocity", "sample"]
