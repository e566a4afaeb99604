"""Models to measure on: the bench workloads (small configs of diffusers DiTs, ``small``)
and the trained tiny video DiTs (``tiny_video``, ``tiny_cogvideox``, ``tiny_hunyuan``)."""
from foresight_compile.models.small import (DEFAULT_SCHEDULER, FACTORIES, SmallDiT, cogvideox,
                                            denoise, latte, tiny_cogvideox_dit,
                                            tiny_cogvideox_workload, tiny_hunyuan_dit,
                                            tiny_hunyuan_workload, tiny_video_dit,
                                            tiny_video_workload, wan)

__all__ = ["DEFAULT_SCHEDULER", "FACTORIES", "SmallDiT", "cogvideox", "denoise", "latte",
           "tiny_cogvideox_dit", "tiny_cogvideox_workload", "tiny_hunyuan_dit",
           "tiny_hunyuan_workload", "tiny_video_dit", "tiny_video_workload", "wan"]
