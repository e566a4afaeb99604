"""What a benchmark runs: a model, how to call it, and the denoising loop.

Built-in workloads are small configs of real diffusers DiTs: ``tiny-video`` is the trained
one shipped with the package (fidelity figures mean something on it); the others have
random weights. A user's
workload is ``module:factory``: a zero-argument callable returning an object with
``model`` (an ``nn.Module``), ``latent_shape`` (tuple), ``inputs(latents, timestep) -> dict``
(keyword arguments of one forward call) and ``prediction(output) -> Tensor`` (the model's
noise/velocity prediction), as ``foresight_compile.models.SmallDiT`` has; optionally
``scheduler_config`` (``FlowMatchEulerDiscreteScheduler`` arguments, default shift 3).

``in_dtype`` casts a workload as users run a model in reduced precision.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch

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


# What ``--dtype`` accepts: the precisions diffusers pipelines load DiTs in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def in_dtype(dit, dtype: str):
    """``dit`` as ``from_pretrained(torch_dtype=dtype)`` loads a model: its parameters and
    buffers in ``dtype`` except those of the modules the class keeps in float32
    (``_keep_in_fp32_modules``, matched on a dotted name's parts as diffusers matches them:
    Wan's norms, time embedder and modulation tables); the floating-point call inputs in
    ``dtype``; the latent and the scheduler's math float32 in the loop, as diffusers
    pipelines keep them, and the prediction back in float32. The timestep stays as the loop
    passes it (the models cast it where they embed it). The model is cast in place; float32
    returns ``dit`` unchanged."""
    if dtype not in DTYPES:
        raise ForesightValueError(f"dtype {dtype!r} is not supported; accepted: {', '.join(DTYPES)}")
    if dtype == "float32":
        return dit
    target = DTYPES[dtype]
    keep = getattr(dit.model, "_keep_in_fp32_modules", None) or []
    for name, tensor in [*dit.model.named_parameters(), *dit.model.named_buffers()]:
        if tensor.is_floating_point() and not any(k in name.split(".") for k in keep):
            tensor.data = tensor.data.to(target)
    inputs, prediction = dit.inputs, dit.prediction

    def cast_inputs(latents, timestep):
        return {k: (v.to(target) if isinstance(v, torch.Tensor) and v.is_floating_point()
                    and k != "timestep" else v) for k, v in inputs(latents, timestep).items()}

    def float_prediction(out):
        return prediction(out).float()

    dit.inputs, dit.prediction = cast_inputs, float_prediction
    return dit
