"""A tiny DiT-shaped model whose blocks are cheap, for tests that need many steps."""
from __future__ import annotations

import torch
from torch import nn


class ToyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        h = self.proj(h) * (1 + temb)
        h = torch.nn.functional.silu(h) * torch.sigmoid(self.gate(h))
        return x + 0.5 * h.tanh()


class ToyDiT(nn.Module):
    def __init__(self, dim: int = 8, layers: int = 3) -> None:
        super().__init__()
        self.t_embed = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim) for _ in range(layers))
        self.out = nn.Linear(dim, dim)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor):
        temb = self.t_embed(timestep[:, None].float() / 1000)[:, None, :]
        x = hidden_states
        for block in self.blocks:
            x = block(x, temb)
        return (self.out(x),)


def toy_loop(model, steps: int, shape=(1, 4, 8), seed: int = 0, start: float = 1000.0):
    """A denoising-shaped loop: decreasing timesteps, x updated from the prediction."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    outs = []
    with torch.no_grad():
        for t in torch.linspace(start, 1.0, steps):
            pred = model(hidden_states=x, timestep=t.expand(shape[0]))[0]
            x = x - 0.05 * pred
            outs.append(x)
    return x, outs


class ToyWorkload:
    """A `foresight-compile bench --workload toy:toy_workload` factory result."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.model = ToyDiT(layers=3).eval()
        self.latent_shape = (1, 4, 8)

    def inputs(self, latents, timestep):
        return dict(hidden_states=latents, timestep=timestep)

    def prediction(self, out):
        return out[0]


def toy_workload() -> ToyWorkload:
    return ToyWorkload()


class ExactBlock(nn.Module):
    """A block whose output tells which input it was computed from: nonlinear (so a
    forecast never equals a compute), in the input's dtype, any shape (..., dim)."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.scale = nn.Parameter(torch.rand(dim, generator=g) + 0.5)
        self.shift = nn.Linear(dim, dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x * self.scale.to(dtype) + temb.to(dtype)
        h = self.shift(h.float()).to(dtype)
        h = torch.tanh(h) * torch.sigmoid(self.mix(x.float()).to(dtype))
        return x + 0.5 * h


class ExactDiT(nn.Module):
    """``ToyDiT`` for the controller's property suite: any float dtype, any (B, N, dim)."""

    def __init__(self, dim: int = 8, layers: int = 3) -> None:
        super().__init__()
        self.t_embed = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(ExactBlock(dim, seed=l) for l in range(layers))

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor):
        temb = self.t_embed(timestep.reshape(-1, 1).float() / 1000)[:, None, :]
        x = hidden_states * 1.0
        for block in self.blocks:
            x = block(x, temb)
        return (x * 1.0,)
