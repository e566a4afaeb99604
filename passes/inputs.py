"""Graph-input analysis: which input is the timestep, which carries the latent.

Dynamo names a forward's keyword argument ``timestep`` as the placeholder
``L_kwargs_timestep_`` (``l_kwargs_timestep_`` after lowering names), a traced local
``L_timestep_``; parameters and buffers are ``L_self_...``. ``input_stem`` undoes that
naming so analyses can ask for an argument by the name the user's forward gives it.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.fx as fx

from foresight_compile.errors import BlockDiscoveryError

TIMESTEP_NAMES = ("timestep", "timesteps")
# Lifted module state under a hooked root (diffusers' ModelHook replaced the root's forward):
# ``l_function_reference_forward_self_dict_modules_blocks_modules_0_..._parameters_weight_``.
_HOOKED_STATE = re.compile(r"^l_\w*_self_(\w*_)?(parameters|buffers)_\w")


def is_module_state(name: str) -> bool:
    """A placeholder name of a lifted parameter or buffer: Dynamo's ``L_self_...`` (under a
    hooked root, ``L_function_reference_..._parameters_...``), export's ``p_...``/``b_...``."""
    name = name.lower()
    return name.startswith(("l_self_", "p_", "b_")) or _HOOKED_STATE.match(name) is not None


def input_stem(name: str) -> str | None:
    """``L_kwargs_timestep_`` / ``l_timestep_`` -> ``timestep``; None for parameters and
    buffers (``L_self_...``)."""
    name = name.lower()
    if not name.startswith("l_") or is_module_state(name):
        return None
    return re.sub(r"^l_((kwargs|args)_)?", "", name).rstrip("_")


def input_stems(gm: fx.GraphModule) -> list[str | None]:
    """``input_stem`` of every placeholder, in order."""
    return [input_stem(p.name) for p in gm.graph.find_nodes(op="placeholder")]


def find_input(gm: fx.GraphModule, example_inputs: Sequence, stem: str):
    """The example value of the user input named ``stem`` (e.g. ``hidden_states``), or None."""
    return next((v for s, v in zip(input_stems(gm), example_inputs) if s == stem), None)


def find_timestep_input(gm: fx.GraphModule, example_inputs: Sequence) -> int:
    """Index of the graph input that carries the denoising timestep.

    An input named ``timestep``/``timesteps`` wins, then one whose name ends in it
    (``vision_timesteps``); otherwise the first user tensor input
    with at most one dimension and at most 64 elements (diffusers passes the timestep as a
    (batch,) tensor, possibly positionally). Raises ``BlockDiscoveryError`` when there is
    none: without it denoising steps and generations cannot be told apart.
    """
    stems = input_stems(gm)
    for i, stem in enumerate(stems):
        if stem in TIMESTEP_NAMES and isinstance(example_inputs[i], torch.Tensor):
            return i
    # A prefixed name: Cosmos 3 takes per-token ``vision_timesteps`` (and also has a small
    # 1-D ``input_ids``, which the shape rule below would wrongly pick: every call would
    # then look like a new CFG branch of one step, and nothing would ever be reused).
    for i, stem in enumerate(stems):
        if (stem is not None and re.search(r"(^|_)timesteps?(_|$)", stem)
                and isinstance(example_inputs[i], torch.Tensor)):
            return i
    for i, (stem, value) in enumerate(zip(stems, example_inputs)):
        if (stem is not None and isinstance(value, torch.Tensor)
                and not isinstance(value, torch.nn.Parameter)
                and value.dim() <= 1 and value.numel() <= 64):
            return i
    raise BlockDiscoveryError(
        "no timestep input found (an input named 'timestep', or a tensor of at most one "
        "dimension): without it denoising steps and generations cannot be told apart")


def find_latent_input(gm: fx.GraphModule, example_inputs: Sequence) -> int:
    """Index of the graph input that carries the noisy latent: the input named
    ``hidden_states`` (diffusers' name in every DiT), else the largest user tensor input."""
    stems = input_stems(gm)
    candidates = [(i, v) for i, (stem, v) in enumerate(zip(stems, example_inputs))
                  if stem is not None and isinstance(v, torch.Tensor)
                  and not isinstance(v, torch.nn.Parameter)]
    for i, _ in candidates:
        if stems[i] == "hidden_states":
            return i
    if not candidates:
        raise BlockDiscoveryError("no tensor input found to read the latent from")
    return max(candidates, key=lambda iv: iv[1].numel())[0]
