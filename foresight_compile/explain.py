"""``explain(model, *args, **kwargs)``: before compiling, what the backend will do.

Traces ``model`` once with Dynamo (a capture backend: no Inductor compile, no run of our
program; Dynamo's caches of other models are left alone, unlike ``torch._dynamo.explain``,
which resets them) and reports, per graph, the block stack that will be cached or the
reason it cannot be, and every graph break: where (the innermost user frame), the
operator, and the narrow remedy when one is known:

* a data-dependent *shape* (``torch.nonzero``, boolean-mask indexing, ``unique``: Mochi's
  attention selects the valid text tokens with ``nonzero``): Dynamo's documented
  ``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` traces it with an
  unbacked size; the backend compiles such graphs symbolically (Mochi: one graph, blocks
  cached, output within 2e-7 of eager);
* a data-dependent *scalar* (``.item()``, ``.tolist()``):
  ``torch._dynamo.config.capture_scalar_outputs = True``;
* otherwise, when the op's output shape does not depend on data: wrap it in a
  ``torch.library.custom_op`` with a ``register_fake`` implementation (an opaque node
  Dynamo traces through).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from foresight_compile.passes.blocks import find_blocks, why_not_cacheable

DYNAMIC_SHAPE_REMEDY = ("set torch._dynamo.config.capture_dynamic_output_shape_ops = True "
                        "before compiling: Dynamo then traces the op with a data-dependent "
                        "size and the blocks stay in one graph")
SCALAR_REMEDY = ("set torch._dynamo.config.capture_scalar_outputs = True before compiling: "
                 "Dynamo then traces the scalar as a symbolic value")
CUSTOM_OP_REMEDY = ("wrap the code at this line in a torch.library.custom_op with a "
                    "register_fake implementation (its output shape must not depend on data)")


@dataclasses.dataclass(frozen=True)
class GraphBreak:
    reason: str  # Dynamo's, first line
    where: str  # innermost user frame: file:line (code)
    operator: str | None  # e.g. "aten.nonzero.default", when Dynamo names one
    remedy: str | None
    stack: list[str]  # user frames, outermost first


@dataclasses.dataclass(frozen=True)
class GraphReport:
    blocks: list[str]  # block paths that will be cached ([]: none)
    reason: str | None  # why not, when blocks is empty


@dataclasses.dataclass(frozen=True)
class Explanation:
    graphs: list[GraphReport]
    breaks: list[GraphBreak]

    @property
    def cached_blocks(self) -> list[str]:
        return [b for g in self.graphs for b in g.blocks]

    @property
    def accelerated(self) -> bool:
        return bool(self.cached_blocks)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"foresight explain: {len(self.graphs)} graph(s), {len(self.breaks)} graph "
                 f"break(s); blocks cached: {', '.join(self.cached_blocks) or 'none'}"]
        for i, g in enumerate(self.graphs):
            lines.append(f"  graph {i}: " + (f"caches {len(g.blocks)} blocks" if g.blocks
                                             else f"not cacheable: {g.reason}"))
        for b in self.breaks:
            op = f" [{b.operator}]" if b.operator else ""
            lines.append(f"  graph break at {b.where}{op}: {b.reason}")
            if b.remedy:
                lines.append(f"    remedy: {b.remedy}")
        return "\n".join(lines)


def _remedy(reason: str, operator: str | None) -> str | None:
    text = f"{reason} {operator or ''}".lower()
    if "dynamic shape operator" in text or any(
            op in text for op in ("nonzero", "masked_select", "unique", "repeat_interleave")):
        return DYNAMIC_SHAPE_REMEDY
    if "_local_scalar_dense" in text or ".item()" in text or "tolist" in text \
            or "data dependent" in text or "data-dependent" in text:
        return SCALAR_REMEDY
    if operator is not None:
        return CUSTOM_OP_REMEDY
    return None


def _graph_break(why: Any) -> GraphBreak:
    reason = str(why.reason).strip()
    match = re.search(r"aten\.[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?", reason)
    operator = match.group(0) if match else None
    frames = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({(f.line or '').strip()})"
              for f in (why.user_stack or [])]
    return GraphBreak(reason=reason.splitlines()[0] if reason else "graph break",
                      where=frames[-1] if frames else "unknown", operator=operator,
                      remedy=_remedy(reason, operator), stack=frames)


def explain(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Explanation:
    """What ``torch.compile(model, backend="foresight")`` will cache for a call with these
    inputs, and what breaks the graph, where, with the remedy when one is known."""
    model = getattr(model, "_orig_mod", model)
    graphs: list[GraphReport] = []
    breaks: list[GraphBreak] = []

    def capture(gm, example_inputs, **_):
        reason = why_not_cacheable(gm)
        blocks = [] if reason is not None else [b.path for b in find_blocks(gm).blocks]
        graphs.append(GraphReport(blocks=blocks, reason=reason))
        why = getattr(gm, "compile_subgraph_reason", None)
        if why is not None and getattr(why, "graph_break", False):
            found = _graph_break(why)
            if found not in breaks:
                breaks.append(found)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=capture)(*args, **kwargs)
    return Explanation(graphs=graphs, breaks=breaks)
