"""The ``foresight`` torch.compile backend.

Registered in the ``torch_dynamo_backends`` entry-point group, so
``torch.compile(model, backend="foresight", options={...})`` works without importing this
package. Dynamo calls ``foresight_backend(gm, example_inputs, options=...)`` once per
graph. When the graph holds no cacheable block stack, or building the block program fails
(an Inductor codegen error, a symbolic-shape assertion, a lowering error while compiling
our segments), the graph is compiled by plain Inductor with one warning saying why
(``strict=True`` raises instead). Failures after the backend returned (a segment compiled
or first run at a call) fall back in the program (``program.py``).
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch.fx as fx

from foresight_compile.errors import (BlockDiscoveryError, ForesightFallbackWarning,
                                      ForesightValueError, SegmentCompileError, dynamo_control,
                                      surfaced)
from foresight_compile.options import Options
from foresight_compile.passes.collectives import group_names
from foresight_compile.parallel import prepare_on_stack
from foresight_compile.program import ForesightProgram, failure_reason, fall_back

log = logging.getLogger(__name__)

__all__ = ["ForesightFallbackWarning", "foresight_backend", "graph_break_note"]


def foresight_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                      options: Mapping[str, Any] | None = None):
    try:
        opts = Options.from_dict(options)
    except ForesightValueError as e:  # a bad option
        raise surfaced(e) from None
    try:
        return ForesightProgram(gm, example_inputs, opts)
    except ForesightValueError as e:  # a profile made for another model, a cache ceiling
        raise surfaced(e) from None
    except BlockDiscoveryError as e:
        if group_names(gm.graph.nodes):
            # A graph with collectives but no stack: diffusers' context-parallel hooks broke
            # the model into one graph per block.
            e = BlockDiscoveryError(
                f"{e} (the graph holds collectives: under context parallelism, call "
                f"foresight_compile.prepare_parallel(model) after enable_parallelism and "
                f"before the first call; TORCH_LOGS=graph_breaks shows where Dynamo split "
                f"the model)")
        late = prepare_on_stack()  # diffusers' enable_parallelism without prepare_parallel
        if late:
            e = BlockDiscoveryError(
                f"{e} (a caller had diffusers' context-parallel hooks not prepared for "
                f"tracing: foresight_compile.prepare_parallel(model) was applied now, so "
                f"later calls trace the model whole; call it after enable_parallelism to "
                f"reuse from the first call)")
        if opts.strict and not late:
            raise surfaced(e) from None
        reason = f"{e}{graph_break_note(gm)}"
    except Exception as e:  # compiling our segments failed where plain Inductor may work
        if dynamo_control(e):
            raise
        if opts.strict:
            if isinstance(e, SegmentCompileError) and e.__cause__ is not None:
                raise e.__cause__ from None
            raise
        log.debug("building the block program failed", exc_info=True)
        reason = failure_reason(e, "building the block program")
    if opts.lowering == "eager":
        compiled = gm.forward
    else:
        from torch._inductor.compile_fx import compile_fx
        compiled = compile_fx(gm, list(example_inputs))
    # Warned after compile_fx returns: when it asks Dynamo to restart the analysis (a
    # scalar to tensorify), the backend is called again, and warns once then.
    fall_back(example_inputs, reason, opts)
    return compiled


def graph_break_note(gm: fx.GraphModule) -> str:
    """Where Dynamo ended this graph, when a graph break did (empty otherwise): blocks
    split by a graph break are not cacheable; ``foresight_compile.explain`` says more."""
    why = getattr(gm, "compile_subgraph_reason", None)
    if why is None or not getattr(why, "graph_break", False):
        return ""
    stack = list(getattr(why, "user_stack", None) or [])
    where = (f" at {stack[-1].filename.rsplit('/', 1)[-1]}:{stack[-1].lineno} "
             f"({(stack[-1].line or '').strip()})" if stack else "")
    first = str(why.reason).strip().splitlines()[0] if why.reason else "graph break"
    return (f"; this graph ends at a graph break{where}: {first} (see "
            f"foresight_compile.explain(model, inputs) for every break and its remedy)")
