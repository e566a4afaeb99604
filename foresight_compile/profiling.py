"""ProfilingDiT's block profile (arXiv 2504.03140): foreground- vs background-focused blocks.

``profile_blocks(model, run)`` runs one calibration generation (``run(model)``, on the user's
own model and resolution, eager) with forward pre-hooks that only *read*: the model's outputs
are unchanged. For every block's self-attention it computes, for a seeded sample of query
tokens, ``softmax(q k^T / sqrt(d))`` from the block's own ``to_q``/``to_k`` projections, one
head at a time (memory: ``queries x tokens`` per head, never ``tokens^2``), and the attention
each token receives, ``a_j = mean_i A_ij``.

Foreground mask. The paper segments the noise prediction with SAM2; we have no SAM2, so the
foreground is derived from the model: the tokens whose representation entering the block
changes most between consecutive steps (the top ``foreground_quantile`` of the change norm,
measured through a fixed random projection to 16 dims so nothing full-size is kept). This is
per block and in the block's own token layout, so it also works for factorised models whose
temporal blocks attend across frames (Latte): no patchify or layout assumption is needed.

``R_attn = |high ∩ fg| / |fg|`` with ``high`` the top ``attention_quantile`` of ``a``, averaged
over attention sequences (frames, for spatial blocks) and calibration steps; a block is
foreground when ``R_attn >= tau``. With 20% high-attention tokens, chance overlap is 0.2, so
``tau = 0.3`` asks for clearly more than chance. Q/K norms and rotary embeddings are not
applied: the profile ranks blocks, it does not reproduce the forward pass.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from foresight_compile.errors import ForesightValueError
from foresight_compile.passes.blocks import module_blocks
from foresight_compile.runtime.policies.profile import BlockProfile

__all__ = ["BlockProfile", "profile_blocks"]


def _self_attention(block: torch.nn.Module) -> torch.nn.Module | None:
    for module in block.modules():
        if hasattr(module, "to_q") and hasattr(module, "to_k") and hasattr(module, "heads"):
            return module
    return None


def profile_blocks(model: torch.nn.Module, run: Callable[[torch.nn.Module], Any], *,
                   tau: float = 0.3, attention_quantile: float = 0.8,
                   foreground_quantile: float = 0.8, query_samples: int = 64,
                   seed: int = 0) -> BlockProfile:
    """Profile ``model`` with one calibration generation ``run(model)`` (see module doc)."""
    for name, q in (("attention_quantile", attention_quantile), ("foreground_quantile", foreground_quantile)):
        if not 0.0 < q < 1.0:
            raise ForesightValueError(f"{name} must lie in (0, 1), got {q}")
    blocks = module_blocks(model)
    if not blocks:
        raise ForesightValueError(f"{type(model).__name__} has no stack of repeated blocks to profile")
    generator = torch.Generator().manual_seed(seed)
    order: list[str] = []
    sums = {path: [0.0, 0] for path, _ in blocks}
    previous: dict[str, torch.Tensor] = {}
    projections: dict[int, torch.Tensor] = {}
    input_shape: list[int] = []
    handles = []

    def model_hook(module, args, kwargs):
        x = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(x, torch.Tensor) and not input_shape:
            input_shape.extend(x.shape)

    handles.append(model.register_forward_pre_hook(model_hook, with_kwargs=True))

    def make_hook(path: str, attn: torch.nn.Module):
        def hook(module, args, kwargs):
            x = kwargs.get("hidden_states", args[0] if args else None)
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                return
            if path not in order:
                order.append(path)
            with torch.no_grad():
                x = x.float()
                dim = x.shape[-1]
                if dim not in projections:
                    projections[dim] = torch.randn(dim, 16, generator=generator) / math.sqrt(16)
                sketch = x @ projections[dim].to(x.device)
                last = previous.get(path)
                previous[path] = sketch
                if last is None or last.shape != sketch.shape:
                    return
                change = (sketch - last).norm(dim=-1)  # (B, N)
                received = _attention_received(attn, x, query_samples, generator)  # (B, N)
                high = received >= torch.quantile(received, attention_quantile, dim=-1, keepdim=True)
                fg = change >= torch.quantile(change, foreground_quantile, dim=-1, keepdim=True)
                overlap = (high & fg).sum(-1).float() / fg.sum(-1).clamp(min=1).float()
                sums[path][0] += overlap.mean().item()
                sums[path][1] += 1
        return hook

    for path, block in blocks:
        attn = _self_attention(block)
        if attn is not None:
            handles.append(attn.register_forward_pre_hook(make_hook(path, attn), with_kwargs=True))
    try:
        run(model)
    finally:
        for h in handles:
            h.remove()
    paths = order + [p for p, _ in blocks if p not in order]
    r_attn = [sums[p][0] / sums[p][1] if sums[p][1] else 1.0 for p in paths]
    return BlockProfile(model=type(model).__name__, block_paths=paths, input_shape=input_shape,
                        r_attn=r_attn, foreground=[r >= tau for r in r_attn], tau=tau,
                        attention_quantile=attention_quantile,
                        foreground_quantile=foreground_quantile, query_samples=query_samples,
                        seed=seed)


def _attention_received(attn: torch.nn.Module, x: torch.Tensor, samples: int,
                        generator: torch.Generator) -> torch.Tensor:
    """Mean attention each token receives from a sample of queries, one head at a time."""
    q = attn.to_q(x)
    k = attn.to_k(x)
    b, n, _ = q.shape
    heads = attn.heads
    d = q.shape[-1] // heads
    idx = torch.randperm(n, generator=generator)[: min(samples, n)].to(x.device)
    q = q[:, idx].view(b, len(idx), heads, d)
    k = k.view(b, n, heads, d)
    received = torch.zeros(b, n, device=x.device)
    for h in range(heads):
        scores = torch.einsum("bqd,bkd->bqk", q[:, :, h], k[:, :, h]) / math.sqrt(d)
        received += scores.softmax(-1).mean(1)
    return received / heads
