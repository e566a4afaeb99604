"""ForesightProgram: what the backend returns to Dynamo for one graph, and the registry
that lets ``stats(model)`` / ``reset(model)`` find the programs of a model."""
from __future__ import annotations

import re
import time
import weakref
from typing import Sequence

import torch
import torch.fx as fx

from foresight_compile.errors import BlockDiscoveryError
from foresight_compile.lowering import SegmentCompiler
from foresight_compile.options import Options
from foresight_compile.passes.blocks import BlockStack, find_blocks
from foresight_compile.inductor_fixes import exact_cond_operand_strides
from foresight_compile.passes.cache_branch import insert_cache_branches
from foresight_compile.passes.partition import Segmented, partition_blocks
from foresight_compile.runtime.controller import ReuseController
from foresight_compile.runtime.executor import GraphFormExecutor, SegmentExecutor
from foresight_compile.runtime.policies import get_policy

_PROGRAMS: list[weakref.ref] = []
_TIMESTEP_NAME = re.compile(r"(^|_)timesteps?(_|$)", re.IGNORECASE)


def _input_stem(name: str) -> str | None:
    """``L_kwargs_timestep_`` / ``l_timestep_`` -> ``timestep``; None for parameters/buffers."""
    name = name.lower()
    if not name.startswith("l_") or name.startswith("l_self_"):
        return None
    return re.sub(r"^l_((kwargs|args)_)?", "", name).rstrip("_")


def find_timestep_input(gm: fx.GraphModule, example_inputs: Sequence) -> int:
    """Index of the graph input that carries the denoising timestep.

    An input named ``timestep``/``timesteps`` (Dynamo names a keyword argument
    ``L_kwargs_timestep_``, a traced local ``L_timestep_``) wins; otherwise the first
    user tensor input with at most one dimension and at most 64 elements (diffusers passes
    the timestep as a (batch,) tensor, possibly positionally).
    """
    placeholders = list(gm.graph.find_nodes(op="placeholder"))
    stems = [_input_stem(p.name) for p in placeholders]
    for i, stem in enumerate(stems):
        if stem in ("timestep", "timesteps") and isinstance(example_inputs[i], torch.Tensor):
            return i
    for i, (stem, value) in enumerate(zip(stems, example_inputs)):
        if (stem is not None and isinstance(value, torch.Tensor)
                and not isinstance(value, torch.nn.Parameter)
                and value.dim() <= 1 and value.numel() <= 64):
            return i
    raise BlockDiscoveryError(
        "no timestep input found (an input named 'timestep', or a tensor of at most one "
        "dimension): without it denoising steps and generations cannot be told apart")


class ForesightProgram:
    """Callable Dynamo runs in place of the graph."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence, options: Options) -> None:
        start = time.perf_counter()
        self.options = options
        self.stack: BlockStack = find_blocks(gm)
        timestep_index = find_timestep_input(gm, example_inputs)
        signature_indices = [i for i, v in enumerate(example_inputs)
                             if not isinstance(v, torch.nn.Parameter)]
        # Weak references, not ids: a freed model's ids are reused by new objects, and a
        # program must never be taken for another model's.
        self._param_refs = [weakref.ref(v) for v in example_inputs
                            if isinstance(v, torch.nn.Parameter)]
        policy = get_policy(options.policy)(options)
        profile = getattr(policy, "profile", None)
        if profile is not None:
            stems = [_input_stem(n.name) for n in gm.graph.find_nodes(op="placeholder")]
            hidden = next((v for s, v in zip(stems, example_inputs) if s == "hidden_states"), None)
            profile.check([b.path for b in self.stack.blocks],
                          tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else None)
        self.controller = ReuseController(len(self.stack), policy, timestep_index, signature_indices)
        self.compiler = SegmentCompiler(
            "inductor" if options.lowering == "cudagraphs" else options.lowering)
        segmented = partition_blocks(gm, self.stack)
        if options.lowering == "cudagraphs":
            self.executor = _cudagraph_executor(segmented, example_inputs, self.controller,
                                                self.compiler, options)
        elif options.form == "graph":
            self.executor = _graph_form_executor(segmented, example_inputs, self.controller, options)
        else:
            self.executor = SegmentExecutor(segmented, self.controller, self.compiler)
        self.build_seconds = time.perf_counter() - start
        _PROGRAMS.append(weakref.ref(self))

    def owns_any(self, param_ids: set[int]) -> bool:
        """True when a parameter this program was compiled with is still alive and in
        ``param_ids``."""
        return any((p := r()) is not None and id(p) in param_ids for r in self._param_refs)

    @property
    def block_paths(self) -> list[str]:
        return [b.path for b in self.stack.blocks]

    @property
    def compile_seconds(self) -> float:
        return self.build_seconds + self.compiler.compile_seconds

    def __call__(self, *args):
        return self.executor(*args)


def _graph_form_executor(segmented: Segmented, example_inputs: Sequence,
                         controller: ReuseController, options: Options) -> GraphFormExecutor:
    specs, per_block = [], []
    for name in segmented.block_submods:
        out = next(iter(segmented.gm.get_submodule(name).graph.find_nodes(op="output"))).args[0]
        per_block.append(len(out))
        for node in out:
            value = node.meta.get("example_value", node.meta.get("val"))
            if not isinstance(value, torch.Tensor) or any(
                    not isinstance(d, int) for d in value.shape):
                raise BlockDiscoveryError(
                    f"form='graph' needs static shapes, but an output of {name} has shape "
                    f"{getattr(value, 'shape', None)}; use form='segments' for dynamic shapes")
            specs.append((tuple(value.shape), value.dtype))
    graph_gm = insert_cache_branches(segmented)
    num_outputs = len(next(iter(segmented.gm.graph.find_nodes(op="output"))).args[0])
    fn = graph_gm.forward
    if options.lowering == "inductor":
        from torch._inductor.compile_fx import compile_fx
        device = next(t.device for t in example_inputs if isinstance(t, torch.Tensor))
        caches = [torch.zeros(s, dtype=d, device=device) for s, d in specs]
        mask = torch.zeros(len(per_block), dtype=torch.bool, device=device)
        with exact_cond_operand_strides():
            fn = compile_fx(graph_gm, [*example_inputs, mask, *caches])
    return GraphFormExecutor(fn, controller, tuple(specs), tuple(per_block), num_outputs)


def _cudagraph_executor(segmented: Segmented, example_inputs: Sequence,
                        controller: ReuseController, compiler: SegmentCompiler, options: Options):
    """The CUDA-graph executor, or a ValueError naming the option when it cannot run."""
    from foresight_compile.backend import _surfaced
    from foresight_compile.errors import ForesightValueError
    from foresight_compile.runtime.cudagraphs import CudaGraphExecutor, cudagraphs_unavailable

    if options.form == "graph":
        problem = ("needs form='segments' (it captures the segments of the host-branch form), "
                   "got form='graph'")
    else:
        reason = cudagraphs_unavailable(example_inputs)
        problem = None if reason is None else (
            f"needs CUDA: {reason} (or use lowering='inductor' or 'eager')")
    if problem is not None:
        # Surfaced: Dynamo would otherwise wrap it in BackendCompilerFailed, hiding the
        # ValueError from a caller's except clause.
        raise _surfaced(ForesightValueError(f"option 'lowering'='cudagraphs' {problem}"))
    return CudaGraphExecutor(segmented, controller, compiler, example_inputs)


def programs_of(model: torch.nn.Module) -> list[ForesightProgram]:
    """Live programs compiled from ``model`` (or the OptimizedModule wrapping it)."""
    model = getattr(model, "_orig_mod", model)
    ids = {id(p) for p in model.parameters()}
    found = []
    for ref in list(_PROGRAMS):
        program = ref()
        if program is None:
            _PROGRAMS.remove(ref)
        elif program.owns_any(ids):
            found.append(program)
    return found
