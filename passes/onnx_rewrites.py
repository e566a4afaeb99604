"""Rewrites of the captured Dynamo graph that make it exportable to ONNX / runnable in
onnxruntime. Each is exact (same values at the static export shapes) and works around a gap
in torch.onnx's torchlib (onnxscript 0.7.2), onnx or onnxruntime (1.32):

* ``drop_noop_squeezes``: ``x.squeeze(d)`` on a dim that is not 1 is a no-op in torch but
  an error as ONNX ``Squeeze`` (PixArt, Allegro: ``proj_out(h).squeeze(1)``).
* ``bool_masked_fill_to_logic``: ``Where`` on bool tensors has no onnxruntime CPU kernel
  (HunyuanVideo's text attention mask).
* ``keep_tiny_addends``: onnxscript's optimizer (which ``torch.onnx.export`` runs) matches
  pattern constants with ``abs_tol=1e-8``, so its ``x + 0 -> x`` rule also deletes
  ``x + 1e-15``. Sana's linear attention divides by ``(h + 1e-15)`` and gets 0/0 = NaN in
  every output. Tiny Python-float addends become shape-[1] tensors, which the scalar-only
  pattern does not match.
* ``decomplexify``: torchlib implements few ops for complex inputs (no ``unsqueeze``,
  ``split_with_sizes``, ...); QwenImage's rotary embedding is complex. Complex-valued nodes
  are recomputed on their ``view_as_real`` view (a trailing dim of 2): shape ops get the
  extra dim, complex products become real arithmetic, ``view_as_complex(x)`` is ``x`` and
  ``view_as_real(c)`` is the real view; complex placeholders (buffers) enter through one
  ``view_as_real``. Raises NotImplementedError on a complex op it does not know.

``rewrite_for_onnx(gm)`` applies all of them in place (a transform pass on the export's own
copy of the graph: the torch backend never runs it); ``gm`` must be the graph
``capture_graph`` returned (static shapes, ``example_value`` on every node), before
``find_blocks``: new nodes copy the ``nn_module_stack`` of the node they replace, so block
discovery sees the same blocks.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx


def rewrite_for_onnx(gm: fx.GraphModule) -> dict[str, int]:
    """Apply every rewrite; returns how many nodes each changed."""
    return {"decomplexify": decomplexify(gm), "drop_noop_squeezes": drop_noop_squeezes(gm),
            "bool_masked_fill_to_logic": bool_masked_fill_to_logic(gm),
            "keep_tiny_addends": keep_tiny_addends(gm)}


# onnxscript's pattern matcher compares constants with math.isclose(abs_tol=1e-8).
_TINY = 1e-7


def keep_tiny_addends(gm: fx.GraphModule) -> int:
    """Turn ``x + c`` / ``x - c`` with a Python float ``0 < |c| <= 1e-7`` into ``x + t``
    with ``t = torch.full((1,), c)`` (``x`` of at least one dimension, so the result shape
    is unchanged). See the module docstring. Returns the count."""
    adds = {operator.add, operator.sub, torch.add, torch.sub, torch.Tensor.add, torch.Tensor.sub}
    changed = 0
    for node in list(gm.graph.nodes):
        is_method = node.op == "call_method" and node.target in ("add", "sub")
        if not (is_method or (node.op == "call_function" and node.target in adds)):
            continue
        if len(node.args) != 2:
            continue
        for pos in (0, 1):
            c, other = node.args[pos], node.args[1 - pos]
            value = other.meta.get("example_value") if isinstance(other, fx.Node) else None
            if (isinstance(c, float) and 0 < abs(c) <= _TINY and isinstance(value, torch.Tensor)
                    and value.dim() >= 1 and value.is_floating_point()):
                with gm.graph.inserting_before(node):
                    t = gm.graph.call_function(torch.full, ((1,), c),
                                               {"dtype": value.dtype, "device": value.device})
                t.meta = {k: v for k, v in node.meta.items()
                          if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
                args = list(node.args)
                args[pos] = t
                node.args = tuple(args)
                changed += 1
                break
    if changed:
        gm.recompile()
    return changed


def drop_noop_squeezes(gm: fx.GraphModule) -> int:
    """Remove ``squeeze(dim)`` calls whose dims are not of size 1 (no-ops in torch).

    torch.onnx's torchlib (onnxscript <= 0.7.2) translates ``aten.squeeze.dim`` to ONNX
    ``Squeeze(axes=[dim])``, which is an error when that dimension is not 1 (Allegro's
    ``proj_out(h).squeeze(1)`` on (B, N, C)): the model then fails shape inference and
    onnxruntime refuses to load it. Export shapes are static, so the no-op is known here.
    Dims that are 1 are kept. Returns the number of nodes changed."""
    changed = 0
    for node in list(gm.graph.nodes):
        is_method = node.op == "call_method" and node.target == "squeeze"
        is_function = node.op == "call_function" and node.target in (torch.squeeze,
                                                                      torch.Tensor.squeeze)
        if not (is_method or is_function) or not node.args:
            continue
        source = node.args[0]
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        value = source.meta.get("example_value") if isinstance(source, fx.Node) else None
        if dim is None or not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
        if not all(isinstance(d, int) for d in dims):
            continue
        keep = tuple(d for d in dims if value.shape[d] == 1)
        if len(keep) == len(dims):
            continue
        if keep:
            node.args = (source, keep if isinstance(dim, (tuple, list)) else keep[0])
            node.kwargs = {k: v for k, v in node.kwargs.items() if k != "dim"}
        else:
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
        changed += 1
    if changed:
        gm.recompile()
    return changed


def bool_masked_fill_to_logic(gm: fx.GraphModule) -> int:
    """Rewrite ``b.masked_fill(m, False)`` / ``(m, True)`` on bool ``b`` as ``b & ~m`` /
    ``b | m``.

    torch.onnx translates it to ONNX ``Where`` over bool tensors, which onnxruntime's CPU
    provider (1.32 at least) does not implement ("Could not find an implementation for
    Where(16)"): HunyuanVideo builds its text attention mask this way. The result is the
    same tensor (the mask broadcasts to ``b``'s shape in both forms). Returns the count."""
    changed = 0
    for node in list(gm.graph.nodes):
        is_method = node.op == "call_method" and node.target == "masked_fill"
        is_function = node.op == "call_function" and node.target in (torch.masked_fill,
                                                                      torch.Tensor.masked_fill)
        if not (is_method or is_function) or len(node.args) != 3 or node.kwargs:
            continue
        source, mask, fill = node.args
        value = source.meta.get("example_value") if isinstance(source, fx.Node) else None
        if (not isinstance(value, torch.Tensor) or value.dtype != torch.bool
                or not isinstance(fill, bool)):
            continue
        with gm.graph.inserting_before(node):
            if fill:
                new = gm.graph.call_function(torch.logical_or, (source, mask))
            else:
                keep = gm.graph.call_function(torch.logical_not, (mask,))
                keep.meta = {k: v for k, v in node.meta.items() if k != "example_value"}
                new = gm.graph.call_function(torch.logical_and, (source, keep))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        changed += 1
    if changed:
        gm.recompile()
    return changed


def _val(n):
    return n.meta.get("example_value") if isinstance(n, fx.Node) else None


def _is_complex(n):
    v = _val(n)
    return isinstance(v, torch.Tensor) and v.is_complex()


def _dim(d, ndim):  # dim of the complex tensor -> dim of its real view
    return d if d >= 0 else d - 1


def decomplexify(gm: fx.GraphModule) -> int:
    """See the module docstring (complex intermediates). Returns the count."""
    g = gm.graph
    real: dict[fx.Node, fx.Node] = {}
    count = 0

    def R(a):
        return real[a] if isinstance(a, fx.Node) and a in real else a

    def emit(before, fn, args, kwargs=None, method=False):
        with g.inserting_before(before):
            if method:
                n = g.call_method(fn, args, kwargs or {})
            else:
                n = g.call_function(fn, args, kwargs or {})
        n.meta = {k: v for k, v in before.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
        return n

    for node in list(g.nodes):
        v = _val(node)
        # tuples of complex tensors (split) are handled via getitem
        out_complex = isinstance(v, torch.Tensor) and v.is_complex()
        tuple_complex = isinstance(v, (tuple, list)) and any(isinstance(x, torch.Tensor) and x.is_complex() for x in v)
        ins_complex = any(_is_complex(a) or a in real for a in node.all_input_nodes)
        if node.op == "placeholder":
            if out_complex:
                with g.inserting_after(node):
                    r = g.call_function(torch.view_as_real, (node,))
                r.meta = {}
                real[node] = r
            continue
        if not (out_complex or tuple_complex or ins_complex):
            continue
        t, a = node.target, node.args
        name = t if node.op == "call_method" else getattr(t, "__name__", str(t))
        if t is torch.view_as_complex:
            real[node] = a[0]
            continue
        if t is torch.view_as_real:
            node.replace_all_uses_with(R(a[0]))
            g.erase_node(node); count += 1
            continue
        if name in ("clone", "contiguous"):
            real[node] = emit(node, name, (R(a[0]),), method=True)
        elif name == "to":
            # complex -> complex dtype/device moves only (checked)
            if not out_complex:
                raise NotImplementedError(f"complex .to() to a real dtype: {node.format_node()}")
            real[node] = R(a[0])
        elif name in ("view", "reshape", "expand"):
            sizes = a[1:] if len(a) > 2 or not isinstance(a[1], (tuple, list)) else tuple(a[1])
            real[node] = emit(node, name, (R(a[0]), *sizes, 2), method=True)
        elif name == "unsqueeze":
            real[node] = emit(node, torch.unsqueeze, (R(a[0]), _dim(a[1], None)))
        elif name in ("split", "split_with_sizes"):
            dim = a[2] if len(a) > 2 else node.kwargs.get("dim", 0)
            real[node] = emit(node, torch.split, (R(a[0]), a[1], _dim(dim, None)))
        elif name == "cat":
            dim = a[1] if len(a) > 1 else node.kwargs.get("dim", 0)
            real[node] = emit(node, torch.cat, ([R(x) for x in a[0]], _dim(dim, None)))
        elif t is operator.getitem and isinstance(a[1], int) and isinstance(_val(a[0]), (tuple, list)):
            real[node] = emit(node, operator.getitem, (R(a[0]), a[1]))
        elif t is operator.getitem and out_complex:
            idx = a[1] if isinstance(a[1], tuple) else (a[1],)
            # the (re, im) dim is last: keep it whole
            idx = idx + ((slice(None),) if any(i is Ellipsis for i in idx) else (Ellipsis, slice(None)))
            real[node] = emit(node, operator.getitem, (R(a[0]), idx))
        elif t in (operator.mul, torch.mul) and out_complex:
            x, y = a[0], a[1]
            if not (_is_complex(x) and _is_complex(y)):
                # complex * real (tensor or number): scale both parts (LuminaNextDiT)
                c, r = (x, y) if _is_complex(x) else (y, x)
                if isinstance(r, fx.Node):
                    r = emit(node, torch.unsqueeze, (r, -1))
                elif not isinstance(r, (int, float)):
                    raise NotImplementedError(f"complex * {type(r).__name__}: {node.format_node()}")
                real[node] = emit(node, operator.mul, (R(c), r))
                count += 1
                continue
            xr, yr = R(x), R(y)
            x0 = emit(node, operator.getitem, (xr, (Ellipsis, 0)))
            x1 = emit(node, operator.getitem, (xr, (Ellipsis, 1)))
            y0 = emit(node, operator.getitem, (yr, (Ellipsis, 0)))
            y1 = emit(node, operator.getitem, (yr, (Ellipsis, 1)))
            re = emit(node, operator.sub, (emit(node, operator.mul, (x0, y0)), emit(node, operator.mul, (x1, y1))))
            im = emit(node, operator.add, (emit(node, operator.mul, (x0, y1)), emit(node, operator.mul, (x1, y0))))
            real[node] = emit(node, torch.stack, ((re, im), -1))
        else:
            raise NotImplementedError(f"complex op not handled: {node.format_node()}")
        count += 1
    g.eliminate_dead_code()
    gm.recompile()
    return count
