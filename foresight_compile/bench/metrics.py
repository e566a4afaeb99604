"""Fidelity and speed figures. SSIM comes from torchmetrics (a maintained implementation)."""
from __future__ import annotations

import math

import torch


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR in dB with the reference's value range as peak; inf when identical."""
    mse = (x.double() - ref.double()).square().mean().item()
    peak = (ref.max() - ref.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def ssim(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean SSIM over the images made of the last three dims (frames of a video latent)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a = x.float().reshape(-1, *x.shape[-3:])
    b = ref.float().reshape(-1, *ref.shape[-3:])
    kernel = min(11, a.shape[-1], a.shape[-2])
    kernel -= 1 - kernel % 2  # odd
    # torchmetrics sizes its Gaussian window from sigma (1.5 -> 11 pixels); small latents
    # need a smaller window, so sigma shrinks with it.
    sigma = 1.5 if kernel >= 11 else max(0.1, (kernel - 1) / 7)
    value = structural_similarity_index_measure(
        a, b, data_range=(b.max() - b.min()).item(), kernel_size=kernel, sigma=sigma)
    return float(value)


def ceiling(block_share: float, skipped: float) -> float:
    """Upper bound on speedup when a share ``f`` of step time is blocks and ``r`` is skipped."""
    return 1.0 / max(1e-9, 1.0 - block_share * skipped)
