"""The reuse map: what a user looks at to see why a configuration is fast or slow.

Left panel: evaluations (rows) x blocks (columns), reused cells dark, computed light.
Right panel: the change metric ``MSE(out, cache)`` relative to the block's threshold, as
``log10(mse / threshold)`` on a diverging scale centred on the threshold (blue: under it,
reuse allowed; red: over it); cells the policy reused are marked with a dot. Policies
without a metric (none, static) get the mask panel only.
"""
from __future__ import annotations

import math

import numpy as np


def plot_reuse_map(stats, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    mask = np.array(stats.mask, dtype=float) if stats.mask else np.zeros((0, len(stats.blocks)))
    has_metric = any(c is not None for c in stats.change)
    cols = 2 if has_metric else 1
    rows_n, blocks_n = mask.shape if mask.size else (0, len(stats.blocks))
    height = max(3.0, min(14.0, 0.12 * rows_n + 1.5))
    width = max(4.0, min(9.0, 0.25 * blocks_n + 2.5))
    fig, axes = plt.subplots(1, cols, figsize=(width * cols, height), dpi=110, squeeze=False)
    ax = axes[0][0]
    ax.imshow(mask, aspect="auto", cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
    ax.set_title(f"reused (dark): {stats.reused_fraction:.0%}", fontsize=9)
    ax.set_xlabel("block")
    ax.set_ylabel("evaluation (step; CFG branches interleave)")
    if has_metric:
        ratio = np.full(mask.shape, np.nan)
        for i, (change, thr) in enumerate(zip(stats.change, stats.thresholds)):
            if change is None or thr is None:
                continue
            for l, (c, t) in enumerate(zip(change, thr)):
                if t > 0 and c > 0 and math.isfinite(c) and math.isfinite(t):
                    ratio[i, l] = math.log10(c / t)
        finite = ratio[np.isfinite(ratio)]
        span = max(1e-3, float(np.abs(finite).max())) if finite.size else 1.0
        ax2 = axes[0][1]
        image = ax2.imshow(ratio, aspect="auto", cmap="coolwarm", interpolation="nearest",
                           norm=TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span))
        ys, xs = np.nonzero(mask > 0)
        ax2.scatter(xs, ys, s=4, c="k", marker=".", label="reused")
        ax2.set_title("log10(MSE / threshold)", fontsize=9)
        ax2.set_xlabel("block")
        fig.colorbar(image, ax=ax2, label="0 = at threshold; < 0 reusable")
        if len(xs):
            ax2.legend(loc="upper right", fontsize=7)
    fig.suptitle(f"foresight reuse map — policy {stats.policy}, {len(stats.blocks)} blocks, "
                 f"{stats.steps} evaluations", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
