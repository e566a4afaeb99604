"""Train the tiny video DiT shipped in foresight_compile/assets/tiny_video_dit/.

Rectified flow on procedural moving-shape clips (foresight_compile.models.tiny_video.make_clips):
x_t = (1 - s) x0 + s noise; the model returns the velocity noise - x0 at timestep 1000 s,
computed from its estimate of the clean clip (tiny_video.TinyVideoTransformer).
Seeded end to end; prints the loss curve, saves its plot and the weights (EMA) in
diffusers' save_pretrained layout.

    python examples/train_tiny_dit.py                 # the shipped weights (38 min on 2 cores)
    python examples/train_tiny_dit.py --steps 50 --out /tmp/tiny   # a quick look

Speed on a 2-core CPU: bfloat16 autocast under torch.compile is ~10x faster than float32
eager here (AMX; elementwise ops fused), so it is the default where the CPU supports
bfloat16; --precision fp32 --no-compile gives the slow, hardware-independent path. The
weights are kept and saved in float32 either way. OMP_WAIT_POLICY=PASSIVE (set below before
torch loads) stops OpenMP threads spinning while the cores are shared: on a busy machine a
step took 2.9 s spinning and 0.8 s passive.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from foresight_compile.models import tiny_video as tv  # noqa: E402

ROOT = Path(__file__).resolve().parent


def sample_sigmas(batch: int, g: torch.Generator, shift: float) -> torch.Tensor:
    # Logit-normal (SD3) concentrates on mid noise levels; the uniform share keeps both ends
    # trained. The shift (the sampler's, as in SD3/Wan) moves mass to high noise, where the
    # layout of the clip and so the object's path are decided (shift 1: 4% of the samples
    # above sigma 0.9; shift 3: 17%).
    logit_normal = torch.sigmoid(torch.randn(batch, generator=g))
    uniform = torch.rand(batch, generator=g)
    u = torch.where(torch.rand(batch, generator=g) < 0.3, uniform, logit_normal)
    return shift * u / (1 + (shift - 1) * u)


def zero_residual_outputs(transformer: torch.nn.Module) -> None:
    """DiT's adaLN-Zero idea for Wan blocks: zero the last projection of every residual
    branch (self-attention, cross-attention, feed-forward) and the output head, so each
    block starts as the identity. diffusers' default init leaves them random."""
    for block in transformer.blocks:
        for layer in (block.attn1.to_out[0], block.attn2.to_out[0], block.ffn.net[-1]):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    torch.nn.init.zeros_(transformer.proj_out.weight)
    torch.nn.init.zeros_(transformer.proj_out.bias)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--cfg-dropout", type=float, default=0.1,
                    help="share of clips trained with the null prompt (classifier-free guidance)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--init", choices=["zero-out", "diffusers"], default="zero-out",
                    help="zero-out: residual branches start at zero (see zero_residual_outputs)")
    ap.add_argument("--stop-after", type=int,
                    help="recipe experiments: stop after this many steps of the --steps schedule "
                         "and save nothing")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=400,
                    help="sample the first 16 evaluation prompts with the EMA weights this often "
                         "and print their colour / direction accuracy (0: never)")
    ap.add_argument("--snapshots", type=Path,
                    help="at each --eval-every: write the EMA weights (latest/) and a strip of the "
                         "evaluation samples here")
    ap.add_argument("--out", type=Path, default=ROOT.parent / "foresight_compile/assets/tiny_video_dit")
    ap.add_argument("--plot", type=Path, default=ROOT / "output/tiny_dit_loss.png")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    bf16 = args.precision == "bf16" or (
        args.precision == "auto" and torch.backends.mkldnn.is_available()
        and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    torch.manual_seed(args.seed)
    model = tv.build_tiny_video_dit(seed=args.seed)
    transformer, encoder = model.transformer.train(), model.prompt_encoder.train()
    if args.init == "zero-out":
        zero_residual_outputs(transformer)
    params = list(transformer.parameters()) + list(encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    print(f"tiny video DiT: {sum(p.numel() for p in params) / 1e6:.2f} M parameters, "
          f"{args.steps} steps x batch {args.batch}, {'bf16 autocast' if bf16 else 'fp32'}, "
          f"{'compiled' if not args.no_compile else 'eager'}, {args.threads} threads, "
          f"torch {torch.__version__}")

    def loss_fn(x0, noise, sigma, tokens):
        s = sigma[:, None, None, None, None]
        x_t = (1 - s) * x0 + s * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            text = encoder(tokens)
            v = transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=text,
                            return_dict=False)[0]
        # The velocity loss, written on the clean-clip estimate the model makes (see
        # tiny_video.TinyVideoTransformer): |v - v*|^2 = |x0_hat - x0|^2 / sigma^2, with the
        # weight capped below sigma 0.05 as in JiT, where it would otherwise explode.
        clean = x_t - s.clamp_min(tv.SIGMA_EPS) * v.float()
        return ((clean - x0) / s.clamp_min(0.05)).square().mean()

    def ema_model() -> tv.TinyVideoDiT:
        copied = tv.TinyVideoDiT(copy.deepcopy(transformer).eval(), copy.deepcopy(encoder).eval(),
                                 model.scheduler_config)
        with torch.no_grad():
            for p, e in zip(list(copied.transformer.parameters())
                            + list(copied.prompt_encoder.parameters()), ema):
                p.copy_(e)
        return copied

    def evaluate(step: int) -> None:
        prompts = tv.evaluation_prompts(16)
        snapshot = ema_model()
        frames = tv.sample(*snapshot, prompts, steps=20)
        if args.snapshots:
            tv.save_strip(frames, args.snapshots / f"samples_{step:05d}.png", [p.text for p in prompts])
            tv.save_tiny_video_dit(snapshot, args.snapshots / "latest", training={"steps": step})
        print(f"step {step:5d}  EMA samples (20 steps): {tv.evaluate_samples(frames, prompts)}", flush=True)

    step_fn = loss_fn if args.no_compile else torch.compile(loss_fn, dynamic=False)
    g = torch.Generator().manual_seed(args.seed)
    losses, curve = [], []
    start = time.perf_counter()
    for step in range(args.steps if args.stop_after is None else min(args.steps, args.stop_after)):
        clips = tv.make_clips(args.batch, g)
        tokens = torch.where(torch.rand(args.batch, 1, generator=g) < args.cfg_dropout,
                             tv.null_tokens(args.batch), clips.tokens)
        noise = torch.randn(clips.frames.shape, generator=g)
        sigma = sample_sigmas(args.batch, g, model.scheduler_config["shift"])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = step_fn(clips.frames, noise, sigma, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # EMA warm-up: early on the average would be dominated by the random init.
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step == 0:
            window = losses[-args.log_every:]
            elapsed = time.perf_counter() - start
            curve.append((step + 1, sum(window) / len(window)))
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            print(f"step {step + 1:5d}  loss {curve[-1][1]:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"elapsed {elapsed / 60:5.1f} min  eta {eta / 60:5.1f} min", flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            evaluate(step + 1)
    wall = time.perf_counter() - start
    if args.stop_after is not None:
        print(f"stopped after {len(losses)} steps ({wall / 60:.1f} min); nothing saved")
        return

    shipped = ema_model()
    final = sum(losses[-100:]) / len(losses[-100:])
    record = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
              "ema": args.ema, "init": args.init, "cfg_dropout": args.cfg_dropout, "seed": args.seed,
              "precision": "bf16-autocast" if bf16 else "fp32", "compiled": not args.no_compile,
              "threads": args.threads, "torch": torch.__version__, "wall_seconds": round(wall, 1),
              "final_loss_last100": round(final, 5),
              "loss_curve": [[s, round(v, 5)] for s, v in curve],
              "command": "python examples/train_tiny_dit.py"}
    tv.save_tiny_video_dit(shipped, args.out, training=record)
    print(f"done in {wall / 60:.1f} min; mean loss of the last 100 steps {final:.4f}; "
          f"weights (EMA) in {args.out}")
    plot_loss(losses, curve, args.plot)


def plot_loss(losses: list[float], curve: list[tuple[int, float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(losses) + 1), losses, color="0.75", lw=0.6, label="per step")
    ax.plot(*zip(*curve), color="C0", lw=1.8, label="window mean")
    ax.set_xlabel("step")
    ax.set_ylabel("velocity MSE")
    ax.set_yscale("log")
    ax.set_title("tiny video DiT: rectified-flow training loss")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"loss plot: {path}")


if __name__ == "__main__":
    main()
