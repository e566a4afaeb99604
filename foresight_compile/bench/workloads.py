"""What a benchmark runs: a model, how to call it, and the denoising loop.

Built-in workloads are small configs of real diffusers DiTs: ``tiny-video`` is the trained
one shipped with the package (fidelity figures mean something on it); the others have
random weights. A user's
workload is ``module:factory``: a zero-argument callable returning an object with
``model`` (an ``nn.Module``), ``latent_shape`` (tuple), ``inputs(latents, timestep) -> dict``
(keyword arguments of one forward call) and ``prediction(output) -> Tensor`` (the model's
noise/velocity prediction), as ``foresight_compile.models.SmallDiT`` has; optionally
``scheduler_config`` (``FlowMatchEulerDiscreteScheduler`` arguments, default shift 3).
"""
from __future__ import annotations

import importlib
from typing import Callable

from foresight_compile import models
from foresight_compile.errors import ForesightValueError

BUILTIN: dict[str, Callable[[], models.SmallDiT]] = {
    "wan": lambda: models.wan(layers=2),
    "wan-deep": lambda: models.wan(layers=24, deep=True),
    "wan-ci": lambda: models.wan(layers=12, deep=True),
    "cogvideox": lambda: models.cogvideox(layers=4),
    "latte": lambda: models.latte(layers=2),
    "tiny-video": lambda: models.tiny_video_workload(prompts=4),
    "tiny-video-cogvideox": lambda: models.tiny_cogvideox_workload(prompts=4),
    "tiny-video-hunyuan": lambda: models.tiny_hunyuan_workload(prompts=4),
}


def load_workload(spec: str):
    """A built-in name (see ``BUILTIN``) or ``package.module:factory``."""
    if spec in BUILTIN:
        return BUILTIN[spec]()
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as e:
            raise ForesightValueError(f"workload {spec!r}: cannot load {attr!r} from "
                                      f"{module_name!r} ({e})") from None
        workload = factory()
        missing = [a for a in ("model", "latent_shape", "inputs", "prediction")
                   if not hasattr(workload, a)]
        if missing:
            raise ForesightValueError(f"workload {spec!r} returned an object without "
                                      f"{', '.join(missing)}")
        return workload
    raise ForesightValueError(
        f"unknown workload {spec!r}; built-in: {', '.join(sorted(BUILTIN))}, or module:factory")
