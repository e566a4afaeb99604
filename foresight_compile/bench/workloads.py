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


def check_dtype(dtype: str) -> torch.dtype:
    """The torch dtype ``--dtype`` names; a clear error naming what is accepted otherwise."""
    if dtype not in DTYPES:
        raise ForesightValueError(f"dtype {dtype!r} is not supported; accepted: {', '.join(DTYPES)}")
    return DTYPES[dtype]


class CastWorkload:
    """A workload whose call inputs are cast to ``dtype`` and whose other attributes are the
    wrapped workload's (the wrapped object itself is left as it was, its model aside)."""

    def __init__(self, workload, dtype: torch.dtype) -> None:
        self._workload, self._dtype = workload, dtype

    def __getattr__(self, name):
        if name.startswith("__") or name == "_workload":  # copy/pickle probe before __init__
            raise AttributeError(name)
        return getattr(self._workload, name)

    def inputs(self, latents: torch.Tensor, timestep: torch.Tensor) -> dict:
        # The timestep stays as the loop passes it: the models cast it where they embed it,
        # and bfloat16 would round it (999 -> 1000).
        return {k: (v.to(self._dtype) if isinstance(v, torch.Tensor) and v.is_floating_point()
                    and k != "timestep" else v)
                for k, v in self._workload.inputs(latents, timestep).items()}


def in_dtype(dit, dtype: str):
    """``dit`` as a diffusers pipeline runs it after ``from_pretrained(torch_dtype=dtype)``.

    The model is cast in place as ``from_pretrained`` loads it: every floating-point entry of
    its state dict in ``dtype``, except those under a module its class keeps in float32
    (``_keep_in_fp32_modules``, matched on a dotted name's parts as diffusers matches them:
    Wan's norms, time embedder and modulation tables), which are set to float32. Buffers
    outside the state dict keep the dtype they were built with. The returned workload casts
    the floating-point call inputs to ``dtype`` (top-level tensors; not the ``timestep`` key,
    which bfloat16 would round: a timestep under another key is cast) and returns
    the model's prediction in ``dtype``: the scheduler's step computes in float32 and hands
    the latent back in the prediction's dtype, so the latent between steps is in ``dtype``
    too, as in diffusers' Wan and HunyuanVideo pipelines. float32 returns ``dit`` unchanged
    after checking that its model is float32 (a model loaded in another dtype must say so
    with ``dtype``, or its report would be labelled float32)."""
    target = check_dtype(dtype)
    floating = {n: t for n, t in dit.model.state_dict(keep_vars=True).items() if t.is_floating_point()}
    if target == torch.float32:
        other = sorted({str(t.dtype).removeprefix("torch.") for t in floating.values()} - {"float32", "float64"})
        if other:
            raise ForesightValueError(
                f"the workload's model holds {', '.join(other)} weights; pass its dtype "
                f"(--dtype / dtype=, one of {', '.join(DTYPES)}) so the report says what ran")
        return dit
    keep = getattr(dit.model, "_keep_in_fp32_modules", None) or []
    keep = [keep] if isinstance(keep, str) else list(keep)  # as diffusers reads it
    for name, tensor in floating.items():
        kept = any(k in name.split(".") for k in keep)
        tensor.data = tensor.data.to(torch.float32 if kept else target)
    return CastWorkload(dit, target)
