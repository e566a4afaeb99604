"""Train the tiny HunyuanVideo (foresight_compile.models.tiny_hunyuan) to predict the
rectified-flow velocity directly.

Rectified flow on the project's procedural clips (foresight_compile.models.tiny_video.make_clips):
x_t = (1 - s) x0 + s noise, timestep = 1000 s, target noise - x0, the plain MSE on the model
output (no reparametrisation, no loss weighting). Noise levels: logit-normal (70%) / uniform
(30%) with the sampler's shift 3; 10% of the clips see the null prompt (classifier-free
guidance); AdamW 1e-3 (betas 0.9/0.99, wd 0.01), 100 warm-up steps then cosine to 5%, grad-norm
clip 1, EMA 0.998; residual branches and output head zero-initialised; 3000 steps x batch 16.
The recipe is train_tiny_cogvideox.py's, unchanged. Seeded end to end (a rerun follows the
shipped loss curve to float rounding, below); prints the loss curve and periodic evaluations
(EMA weights, first 16 evaluation prompts, 20 steps; they do not touch the training RNG), saves
the EMA weights (diffusers layout) and a loss plot.

    python examples/train_tiny_hunyuan.py                  # the shipped weights
    python examples/train_tiny_hunyuan.py --steps 50 --out /tmp/t  # a quick look

Speed on this 2-core CPU (bf16 autocast under torch.compile, the default: 0.70-0.88 CPU-s per
step against 1.07 eager). Measured on the idle machine (2026-12-07, load average 0.6 at the
start; its record: ``examples/output/tiny_hunyuan_training_rerun.json``): 3000 steps in 23.0
min wall (22.6 min training at 2.21 steps/s, 0.70 cpu-s/step, 0.4 min of evaluations). The
shipped run shared the machine with other jobs (load average 2.5 at its start, 3.8-4.8 through
it): 68.7 min wall, 0.88 cpu-s/step. The idle rerun matched the shipped loss curve to 4 digits
through step 250 and within 3% after (float reduction order under threads and bf16 autocast is
not bitwise repeatable): last-100 loss 0.0384 against 0.0386, and its EMA samples at step 3000
follow every prompt (colour and direction 16/16), as the shipped weights do.
The EMA weights follow prompts from step 1500 (16 evaluation prompts, 20 steps: colour
16/16, direction 16/16 from step 2000; see ``evals_16_prompts_20_steps`` in the json).
OMP_WAIT_POLICY=PASSIVE is set before torch loads (no spinning OpenMP threads on shared cores).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from foresight_compile.models import tiny_hunyuan as th  # noqa: E402
from foresight_compile.models import tiny_video as tv  # noqa: E402

HERE = Path(__file__).resolve().parent


def sample_sigmas(batch: int, g: torch.Generator, shift: float, uniform_share: float = 0.3) -> torch.Tensor:
    """Logit-normal (SD3) mixed with uniform, then the sampler's shift (more mass at high noise,
    where the object's path is decided)."""
    logit_normal = torch.sigmoid(torch.randn(batch, generator=g))
    uniform = torch.rand(batch, generator=g)
    u = torch.where(torch.rand(batch, generator=g) < uniform_share, uniform, logit_normal)
    return shift * u / (1 + (shift - 1) * u)


def zero_residual_outputs(transformer: torch.nn.Module) -> None:
    """adaLN-Zero style start: zero the last projection of every residual branch of the
    dual-stream blocks (attention and feed-forward, video and text), the single-stream blocks'
    fused output projection, and the output head, so each block starts as the identity and
    the model output at zero. diffusers' default init leaves them random."""
    def last_linear(ff):
        return [m for m in ff.net if isinstance(m, torch.nn.Linear)][-1]
    layers = []
    for block in transformer.transformer_blocks:
        layers += [block.attn.to_out[0], block.attn.to_add_out, last_linear(block.ff),
                   last_linear(block.ff_context)]
    layers += [block.proj_out for block in transformer.single_transformer_blocks]
    for layer in layers:
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
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--cfg-dropout", type=float, default=0.1)
    ap.add_argument("--shift", type=float, default=3.0, help="noise-level shift used in training")
    ap.add_argument("--uniform-share", type=float, default=0.3)
    ap.add_argument("--layers", type=int, default=2, help="dual-stream blocks")
    ap.add_argument("--single-layers", type=int, default=6, help="single-stream blocks")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--patch-size", type=int, default=4)
    ap.add_argument("--patch-size-t", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--init", choices=["zero-out", "diffusers"], default="zero-out")
    ap.add_argument("--stop-after", type=int, help="stop after this many steps of the --steps "
                    "schedule (recipe experiments); the EMA weights are still saved")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=500,
                    help="evaluate the EMA weights this often (0: never); does not change training")
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--snapshots", type=Path, help="at each evaluation: EMA weights (latest/) and a strip")
    ap.add_argument("--out", type=Path, default=HERE / "output" / "tiny_hunyuan_video",
                    help="where the weights go (the shipped ones: foresight_compile/assets/tiny_hunyuan_video)")
    ap.add_argument("--plot", type=Path, default=HERE / "output" / "tiny_hunyuan_loss.png")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    bf16 = args.precision == "bf16"
    torch.manual_seed(args.seed)
    model = th.build_tiny_hunyuan(seed=args.seed, layers=args.layers,
                                  single_layers=args.single_layers, heads=args.heads,
                                  patch_size=args.patch_size, patch_size_t=args.patch_size_t)
    transformer, encoder = model.transformer.train(), model.prompt_encoder.train()
    if args.init == "zero-out":
        zero_residual_outputs(transformer)
    params = list(transformer.parameters()) + list(encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    n_params = sum(p.numel() for p in params)
    print(f"tiny HunyuanVideo: {n_params / 1e6:.3f} M parameters ({sum(p.numel() for p in transformer.parameters()) / 1e6:.3f} M "
          f"transformer), {args.steps} steps x batch {args.batch}, {'bf16 autocast' if bf16 else 'fp32'}, "
          f"{'eager' if args.no_compile else 'compiled'}, {args.threads} threads, torch {torch.__version__}",
          flush=True)

    def loss_fn(x0, noise, sigma, tokens):
        s = sigma[:, None, None, None, None]
        x_t = (1 - s) * x0 + s * noise
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            v = th.velocity(transformer, x_t, sigma * 1000, encoder(tokens))
        return (v.float() - (noise - x0)).square().mean()

    def ema_model() -> th.TinyHunyuan:
        copied = th.TinyHunyuan(copy.deepcopy(transformer).eval(), copy.deepcopy(encoder).eval(),
                                model.scheduler_config)
        with torch.no_grad():
            for p, e in zip(list(copied.transformer.parameters())
                            + list(copied.prompt_encoder.parameters()), ema):
                p.copy_(e)
        return copied

    evals = []

    def evaluate(step: int) -> None:
        prompts = tv.evaluation_prompts(args.eval_prompts)
        snapshot = ema_model()
        frames = th.sample(*snapshot, prompts, steps=20)
        report = tv.evaluate_samples(frames, prompts)
        evals.append([step, report.colour_accuracy, report.direction_accuracy, report.speed_accuracy])
        if args.snapshots:
            tv.save_strip(frames, args.snapshots / f"samples_{step:05d}.png", [p.text for p in prompts])
            th.save_tiny_hunyuan(snapshot, args.snapshots / "latest", training={"steps": step})
        print(f"step {step:5d}  EMA samples (20 steps): {report}", flush=True)

    step_fn = loss_fn if args.no_compile else torch.compile(loss_fn, dynamic=False)
    g = torch.Generator().manual_seed(args.seed)
    losses, curve = [], []
    run_steps = args.steps if args.stop_after is None else min(args.steps, args.stop_after)
    load_at_start = os.getloadavg()
    start, cpu_start = time.perf_counter(), time.process_time()
    eval_seconds = 0.0
    for step in range(run_steps):
        clips = tv.make_clips(args.batch, g)
        tokens = torch.where(torch.rand(args.batch, 1, generator=g) < args.cfg_dropout,
                             tv.null_tokens(args.batch), clips.tokens)
        noise = torch.randn(clips.frames.shape, generator=g)
        sigma = sample_sigmas(args.batch, g, args.shift, args.uniform_share)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = step_fn(clips.frames, noise, sigma, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))  # EMA warm-up
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step == 0:
            window = losses[-args.log_every:]
            elapsed = time.perf_counter() - start - eval_seconds
            curve.append((step + 1, sum(window) / len(window)))
            eta = elapsed / (step + 1) * (run_steps - step - 1)
            print(f"step {step + 1:5d}  loss {curve[-1][1]:.4f}  lr {opt.param_groups[0]['lr']:.2e}  "
                  f"train {elapsed / 60:5.1f} min ({(step + 1) / elapsed:.2f} steps/s, "
                  f"{(time.process_time() - cpu_start) / (step + 1):.2f} cpu-s/step)  eta {eta / 60:5.1f} min",
                  flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            t0 = time.perf_counter()
            evaluate(step + 1)
            eval_seconds += time.perf_counter() - t0
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    load = os.getloadavg()

    final_model = ema_model()
    final = sum(losses[-100:]) / len(losses[-100:])
    record = {"steps": args.steps, "steps_run": run_steps, "batch": args.batch, "lr": args.lr,
              "warmup": args.warmup, "ema": args.ema, "init": args.init, "cfg_dropout": args.cfg_dropout,
              "shift": args.shift, "uniform_share": args.uniform_share, "layers": args.layers,
              "single_layers": args.single_layers, "heads": args.heads,
              "patch_size": args.patch_size, "patch_size_t": args.patch_size_t, "seed": args.seed,
              "precision": "bf16-autocast" if bf16 else "fp32", "compiled": not args.no_compile,
              "threads": args.threads, "torch": torch.__version__, "parameters": n_params,
              "wall_seconds": round(wall, 1), "eval_seconds": round(eval_seconds, 1),
              "train_seconds": round(wall - eval_seconds, 1), "cpu_seconds": round(cpu, 1),
              "loadavg_at_start": [round(x, 2) for x in load_at_start],
              "loadavg_at_end": [round(x, 2) for x in load],
              "final_loss_last100": round(final, 5),
              "loss_curve": [[s, round(v, 5)] for s, v in curve],
              "evals_16_prompts_20_steps": [[s, round(c, 4), round(d, 4), round(v, 4)] for s, c, d, v in evals],
              "command": "python examples/train_tiny_hunyuan.py " + " ".join(os.sys.argv[1:])}
    th.save_tiny_hunyuan(final_model, args.out, training=record)
    print(f"done: {run_steps} steps in {wall / 60:.1f} min wall ({(wall - eval_seconds) / 60:.1f} min "
          f"training, {run_steps / (wall - eval_seconds):.2f} steps/s, {cpu / run_steps:.2f} cpu-s/step; "
          f"load average at end {load[0]:.1f}); mean loss of the last 100 steps {final:.4f}; "
          f"EMA weights in {args.out}", flush=True)
    plot_loss(losses, curve, args.plot)
    args.plot.with_suffix(".json").write_text(json.dumps(losses) + "\n")


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
    ax.set_title("tiny HunyuanVideo: rectified-flow velocity loss")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"loss plot: {path}")


if __name__ == "__main__":
    main()
