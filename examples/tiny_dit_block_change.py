"""How much each block's output changes from one denoising step to the next: trained vs random.

For every block l and step t of a sampling run, the relative MSE between consecutive steps,
    change[l, t] = mean((y_l(t) - y_l(t-1))^2) / mean(y_l(t-1)^2),
for the shipped tiny video DiT and for a random-weight copy of the same architecture (same
prompts, same noise). Foresight (arXiv 2506.00329) reuses block l while its change stays
under lambda times the change it saw at the end of warm-up, so these curves are the signal
it feeds on. Writes examples/output/tiny_dit_block_change.png and prints a summary.

    python examples/tiny_dit_block_change.py            # 50 steps, 4 prompts
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from foresight_compile.models import tiny_video as tv  # noqa: E402

ROOT = Path(__file__).resolve().parent


def block_changes(model: tv.TinyVideoDiT, prompts, steps: int) -> torch.Tensor:
    """(blocks, steps - 1) relative MSE of each block's output between consecutive steps."""
    outputs: list[list[torch.Tensor]] = [[] for _ in model.transformer.blocks]
    hooks = [block.register_forward_hook(lambda mod, args, out, l=l: outputs[l].append(out.detach().clone()))
             for l, block in enumerate(model.transformer.blocks)]
    try:
        tv.sample(model.transformer, model.prompt_encoder, model.scheduler_config, prompts, steps=steps)
    finally:
        for h in hooks:
            h.remove()
    change = torch.zeros(len(outputs), steps - 1)
    for l, ys in enumerate(outputs):
        for t in range(1, steps):
            change[l, t - 1] = ((ys[t] - ys[t - 1]).double().square().mean()
                                / ys[t - 1].double().square().mean())
    return change


def summarise(name: str, change: torch.Tensor, warmup: int, lam: float) -> None:
    # Foresight's test, replayed offline against the previous step (the method compares with
    # its cache, which may be older): reuse block l at step t if change <= lam * change at W-1.
    basis = change[:, warmup - 2]  # change between steps W-2 and W-1
    after = change[:, warmup - 1:]
    below = (after <= lam * basis[:, None]).float().mean(1)
    early, late = change[:, : warmup - 1].median(1).values, after.median(1).values
    print(f"\n{name}")
    print(f"{'block':>5}{'step W-1':>11}{'median <W':>11}{'median >=W':>12}{'min':>10}{'max':>10}"
          f"{'<= lam*basis':>14}")
    for l in range(change.shape[0]):
        print(f"{l:>5}{basis[l]:>11.2e}{early[l]:>11.2e}{late[l]:>12.2e}{change[l].min():>10.2e}"
              f"{change[l].max():>10.2e}{below[l]:>14.0%}")
    print(f"  all blocks: median change {change.median():.2e}; post-warm-up steps under "
          f"{lam} x the warm-up change: {below.mean():.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--threshold", type=float, default=0.5, help="Foresight's lambda")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "output/tiny_dit_block_change.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    prompts = tv.evaluation_prompts(args.prompts)
    trained = block_changes(tv.load_tiny_video_dit(), prompts, args.steps)
    random = block_changes(tv.build_tiny_video_dit(seed=0), prompts, args.steps)
    summarise("trained (shipped weights)", trained, args.warmup, args.threshold)
    summarise("random weights, same architecture", random, args.warmup, args.threshold)
    plot(trained, random, args)


def plot(trained: torch.Tensor, random: torch.Tensor, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    steps = range(1, args.steps)
    colours = plt.cm.viridis(torch.linspace(0, 0.9, trained.shape[0]).tolist())
    for ax, change, title in ((axes[0], trained, "trained (shipped weights)"),
                              (axes[1], random, "random weights, same architecture")):
        for l in range(change.shape[0]):
            ax.plot(steps, change[l], color=colours[l], lw=1.3, label=f"block {l}")
        ax.axvline(args.warmup - 1, color="0.5", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("step t (change from t-1 to t)")
        ax.set_title(title)
    axes[0].set_ylabel("relative MSE of block output, consecutive steps")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"tiny video DiT, {args.steps} steps, {args.prompts} prompts (dashed: end of "
                 f"warm-up W={args.warmup})", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"\nplot: {args.out}")


if __name__ == "__main__":
    main()
