"""What to cache at the block stack's exit: the exit output Y or the region residual R = Y - X?

Step-level reuse (policy ``budget``) either computes every block at a step or serves a
forecast of the stack's exit, the last block's carried outputs Y_t (what ``norm_out``,
``proj_out`` and the unpatchify read). Order-k forecasts are the Lagrange extrapolation
through the last k + 1 computed values at their real step indices. Two things can be cached:

  (a) the exit output Y_s, served as            F(Y)(t)
  (b) the region residual R_s = Y_s - X_s,      served as X_t + F(R)(t)

where X_t is the first block's carried input (the patch-embedded latent plus, for
CogVideoX, the text stream), recomputed by the prologue at every step. (b) - (a) =
X_t - F(X)(t): (b) replaces the extrapolated stack input by the true one.

Measured in eager PyTorch on the two trained tiny models (``models.tiny_video_dit``, a Wan,
and ``models.tiny_cogvideox_dit``, batched CFG), each through its own sampler (first
``--prompts`` evaluation prompts, seeds 0..n-1, its scheduler; CogVideoX with guidance 2),
at each step count of ``--steps``:

1. the uncached trajectory, recording per step X_t and Y_t (forward hooks around the block
   stack) and the model output V_t (the transformer's raw output; for CogVideoX the batched
   cond+uncond rows);
2. open loop: for every step t, gap g in 1..6 (all previous gaps h = g, so the history is
   t-g, t-2g, ..., t-(k+1)g) and order k in {0, 1, 2}, the forecast of Y_t both ways, served
   to the model at step t on the true latent (the blocks are not run, the last block returns
   the forecast), and the relative L2 error of the model output vs V_t and of the exit vs
   Y_t (the stream the epilogue reads: video tokens for CogVideoX). Medians over the
   middle 60% of the schedule and over the first / last 20% (steps with the whole history);
3. closed loop: the real sampler with hook-implemented step-level reuse on fixed schedules
   (``--warmup`` computed steps, then one computed step every N, the last ``--tail``
   computed), order 0, 1, 2, forecasts only from values computed in that run; PSNR (dB) of the
   final clips vs the uncached clips, (a) vs (b), the served fraction, and in how many clips
   (b) has the higher PSNR.

The reuse is implemented by wrapping each block of the stack: on a served step blocks
0..L-2 hand their carried input on unchanged (not run) and the last block returns the
forecast, so the stack costs nothing and only the exit value reaches the epilogue, as in
the backend's executor. A sanity check asserts that serving the true Y_t reproduces V_t.

    python examples/region_forecast_error.py                     # both models, 30 and 50 steps
    python examples/region_forecast_error.py --models tiny-video --steps 30 --every 2 3
    python examples/region_forecast_error.py --closed-only --prompts 8   # closed loop only
    python examples/region_forecast_error.py --json /tmp/region_forecast_error.json

About 5 CPU-minutes on one thread with the defaults (4 prompts; 11 minutes of wall time on
a busy 2-core machine). Prints Markdown tables.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from foresight_compile import models  # noqa: E402
from foresight_compile.bench.metrics import psnr  # noqa: E402
from foresight_compile.models import tiny_cogvideox as tc  # noqa: E402
from foresight_compile.models import tiny_video as tv  # noqa: E402

Carried = tuple  # the tensors a block carries to the next (1 for Wan, 2 for CogVideoX)


@dataclasses.dataclass
class Family:
    load: Callable
    blocks: str               # attribute holding the block ModuleList
    carried: tuple            # names of the carried block arguments, in output order
    sample: Callable
    guidance: float


FAMILIES = {
    "tiny-video": Family(models.tiny_video_dit, "blocks", ("hidden_states",), tv.sample, 1.0),
    "tiny-cogvideox": Family(models.tiny_cogvideox_dit, "transformer_blocks",
                             ("hidden_states", "encoder_hidden_states"), tc.sample, 2.0),
}


# --------------------------------------------------------------------------- the stack hook

class StackControl:
    """State shared by the block wrappers. ``serve``: None runs the blocks; otherwise a
    function (stack input X) -> forecast exit, and no block runs."""

    def __init__(self, carried: tuple, num_blocks: int) -> None:
        self.carried = carried
        self.num_blocks = num_blocks
        self.serve: Callable[[Carried], Carried] | None = None
        self.x: Carried | None = None  # this call's stack input
        self.y: Carried | None = None  # this call's exit (computed or served)


class Gate(nn.Module):
    """A block of the stack, run or skipped as ``StackControl`` says."""

    def __init__(self, inner: nn.Module, index: int, ctl: StackControl) -> None:
        super().__init__()
        self.inner = inner
        self.index = index
        self.__dict__["ctl"] = ctl  # not a submodule
        self.signature = inspect.signature(inner.forward)

    def _pack(self, values: Carried):
        return values[0] if len(values) == 1 else tuple(values)

    def forward(self, *args, **kwargs):
        ctl = self.ctl
        first, last = self.index == 0, self.index == ctl.num_blocks - 1
        if first or ctl.serve is not None:
            bound = self.signature.bind(*args, **kwargs).arguments
            carried = tuple(bound[name] for name in ctl.carried)
            if first:
                ctl.x = carried
        if ctl.serve is None:
            out = self.inner(*args, **kwargs)
            if last:
                ctl.y = (out,) if torch.is_tensor(out) else tuple(out)
            return out
        if not last:
            return self._pack(carried)  # not run: the stack input passes through
        ctl.y = tuple(ctl.serve(carried))
        return self._pack(ctl.y)


@contextlib.contextmanager
def gated(transformer: nn.Module, family: Family):
    blocks: nn.ModuleList = getattr(transformer, family.blocks)
    original = list(blocks)
    ctl = StackControl(family.carried, len(original))
    for i, block in enumerate(original):
        blocks[i] = Gate(block, i, ctl)
    try:
        yield ctl
    finally:
        for i, block in enumerate(original):
            blocks[i] = block


# --------------------------------------------------------------------------- forecasts

def lagrange_weights(steps: list[int], t: int) -> list[float]:
    """Weights of the extrapolation at ``t`` through values at ``steps`` (any order)."""
    out = []
    for j, sj in enumerate(steps):
        w = 1.0
        for i, si in enumerate(steps):
            if i != j:
                w *= (t - si) / (sj - si)
        out.append(w)
    return out


def extrapolate(values: list[Carried], steps: list[int], t: int) -> Carried:
    w = lagrange_weights(steps, t)
    return tuple(sum(wj * v[c] for wj, v in zip(w, values)) for c in range(len(values[0])))


def forecast(way: str, ys: list[Carried], xs: list[Carried], steps: list[int], t: int,
             x_now: Carried) -> Carried:
    """(a) F(Y)(t); (b) X_t + F(Y - X)(t)."""
    if way == "a":
        return extrapolate(ys, steps, t)
    residuals = [tuple(y[c] - x[c] for c in range(len(y))) for y, x in zip(ys, xs)]
    fr = extrapolate(residuals, steps, t)
    return tuple(x_now[c] + fr[c] for c in range(len(fr)))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------- measurements

@dataclasses.dataclass
class Trajectory:
    calls: list   # per step: the transformer's keyword arguments
    x: list       # per step: stack input (carried tuple)
    y: list       # per step: stack exit
    v: list       # per step: model output
    clip: torch.Tensor


def clone(values):
    return tuple(v.detach().clone() for v in values)


def run_sampler(family: Family, loaded, prompts, steps: int) -> torch.Tensor:
    transformer, encoder, scheduler_config = loaded
    return family.sample(transformer, encoder, scheduler_config, prompts, steps=steps,
                         guidance_scale=family.guidance)


def calls_per_step(family: Family) -> int:
    # tiny_video.sample calls the model twice per step (cond, uncond) with guidance;
    # tiny_cogvideox.sample batches CFG into one call.
    return 2 if family is FAMILIES["tiny-video"] and family.guidance != 1.0 else 1


def uncached(family: Family, loaded, prompts, steps: int) -> Trajectory:
    transformer = loaded[0]
    if calls_per_step(family) != 1:
        raise NotImplementedError("open loop assumes one model call per step (no Wan CFG)")
    traj = Trajectory([], [], [], [], None)
    with gated(transformer, family) as ctl:
        def hook(module, args, kwargs, out):
            traj.calls.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})
            traj.x.append(clone(ctl.x))
            traj.y.append(clone(ctl.y))
            traj.v.append(out[0].detach().clone())
        handle = transformer.register_forward_hook(hook, with_kwargs=True)
        try:
            traj.clip = run_sampler(family, loaded, prompts, steps)
        finally:
            handle.remove()
    assert len(traj.v) == steps, (len(traj.v), steps)
    return traj


def open_loop(family: Family, transformer, traj: Trajectory, gaps, orders) -> list[dict]:
    steps = len(traj.v)
    rows = []
    with gated(transformer, family) as ctl, torch.no_grad():
        # Sanity: serving the true exit reproduces the model output.
        ctl.serve = lambda x_now: traj.y[steps // 2]
        v = transformer(**traj.calls[steps // 2])[0]
        assert rel(v, traj.v[steps // 2]) < 1e-5, rel(v, traj.v[steps // 2])
        for t in range(steps):
            for g in gaps:
                for k in orders:
                    hist = [t - g * (j + 1) for j in range(k + 1)]
                    if hist[-1] < 0:
                        continue
                    for way in "ab":
                        ys = [traj.y[s] for s in hist]
                        xs = [traj.x[s] for s in hist]
                        pred: dict = {}

                        def serve(x_now, ys=ys, xs=xs, hist=hist, way=way, t=t, pred=pred):
                            pred["y"] = forecast(way, ys, xs, hist, t, x_now)
                            return pred["y"]
                        ctl.serve = serve
                        v = transformer(**traj.calls[t])[0]
                        rows.append(dict(t=t, g=g, k=k, way=way,
                                         out=rel(v, traj.v[t]),
                                         exit=rel(pred["y"][0], traj.y[t][0])))
        ctl.serve = None
    return rows


def closed_loop(family: Family, loaded, prompts, steps: int, compute: list[bool], order: int,
                way: str) -> torch.Tensor:
    transformer = loaded[0]
    per_step = calls_per_step(family)
    # One history per call of a step (Wan CFG: cond and uncond streams), newest first.
    history: list[list[tuple]] = [[] for _ in range(per_step)]
    count = [0]
    with gated(transformer, family) as ctl:
        def pre(module, args, kwargs):
            step, stream = divmod(count[0], per_step)
            if compute[step]:
                ctl.serve = None
            else:
                held = history[stream]
                hist = [h[0] for h in held]
                ys = [h[2] for h in held]
                xs = [h[1] for h in held]
                ctl.serve = lambda x_now: forecast(way, ys, xs, hist, step, x_now)

        def post(module, args, kwargs, out):
            step, stream = divmod(count[0], per_step)
            if compute[step]:
                held = history[stream]
                held.insert(0, (step, clone(ctl.x), clone(ctl.y)))
                del held[order + 1:]
            count[0] += 1
            ctl.serve = None
        handles = [transformer.register_forward_pre_hook(pre, with_kwargs=True),
                   transformer.register_forward_hook(post, with_kwargs=True)]
        try:
            clip = run_sampler(family, loaded, prompts, steps)
        finally:
            for h in handles:
                h.remove()
    assert count[0] == steps * per_step
    return clip


def schedule(steps: int, every: int, warmup: int, tail: int) -> list[bool]:
    """Compute the first ``warmup`` steps, then every ``every``-th step counted from the last
    warm-up step, and the last ``tail`` steps."""
    return [i < warmup or i >= steps - tail or (i - (warmup - 1)) % every == 0
            for i in range(steps)]


# --------------------------------------------------------------------------- report

def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else math.nan


def fmt(v: float) -> str:
    return "—" if math.isnan(v) else f"{v:.2e}"


def summarise_open(rows: list[dict], steps: int, gaps, orders) -> tuple[str, dict]:
    lo, hi = round(0.2 * steps), round(0.8 * steps)
    regions = {"early": lambda t: t < lo, "mid": lambda t: lo <= t < hi, "late": lambda t: t >= hi}
    summary = {}
    lines = [f"open loop, {steps} steps: median relative L2 error; mid = steps {lo}..{hi - 1}, "
             f"early = 0..{lo - 1}, late = {hi}..{steps - 1} (steps with a full history)", "",
             "| k | g | out mid (a) | out mid (b) | b/a | exit mid (a) | exit mid (b) | "
             "out early (a) | out early (b) | out late (a) | out late (b) | b/a late |",
             "|---|---|" + "---|" * 10]
    for k in orders:
        for g in gaps:
            cell = {}
            for region, inside in regions.items():
                for way in "ab":
                    sel = [r for r in rows if r["k"] == k and r["g"] == g and r["way"] == way
                           and inside(r["t"])]
                    cell[f"out_{region}_{way}"] = median(r["out"] for r in sel)
                    cell[f"exit_{region}_{way}"] = median(r["exit"] for r in sel)
            summary[f"k{k}_g{g}"] = cell
            c = cell
            lines.append(
                f"| {k} | {g} | {fmt(c['out_mid_a'])} | {fmt(c['out_mid_b'])} | "
                f"{c['out_mid_b'] / c['out_mid_a']:.2f} | {fmt(c['exit_mid_a'])} | "
                f"{fmt(c['exit_mid_b'])} | {fmt(c['out_early_a'])} | {fmt(c['out_early_b'])} | "
                f"{fmt(c['out_late_a'])} | {fmt(c['out_late_b'])} | "
                f"{c['out_late_b'] / c['out_late_a']:.2f} |")
    return "\n".join(lines), summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", choices=list(FAMILIES), default=list(FAMILIES))
    ap.add_argument("--steps", nargs="+", type=int, default=[30, 50])
    ap.add_argument("--prompts", type=int, default=4, help="first N evaluation prompts, seeds 0..N-1")
    ap.add_argument("--gaps", nargs="+", type=int, default=[1, 2, 3, 4, 5, 6])
    ap.add_argument("--orders", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--every", nargs="+", type=int, default=[2, 3, 4],
                    help="closed loop: one computed step every N after warm-up")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tail", type=int, default=2)
    ap.add_argument("--cogvideox-guidance", type=float, default=FAMILIES["tiny-cogvideox"].guidance)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--closed-only", action="store_true", help="skip the open-loop tables")
    ap.add_argument("--json", type=Path, help="also write every number here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    FAMILIES["tiny-cogvideox"].guidance = args.cogvideox_guidance
    prompts = tv.evaluation_prompts(args.prompts)
    results: dict = {}
    closed_lines = ["| model | steps | every | served | k | PSNR (a) Y | PSNR (b) X+R | (b)-(a) "
                    "| clips (b) better |", "|---|---|---|---|---|---|---|---|---|"]
    for name in args.models:
        family = FAMILIES[name]
        loaded = family.load()
        for steps in args.steps:
            start = time.perf_counter()
            traj = uncached(family, loaded, prompts, steps)
            rows, summary = [], {}
            if not args.closed_only:
                rows = open_loop(family, loaded[0], traj, args.gaps, args.orders)
                table, summary = summarise_open(rows, steps, args.gaps, args.orders)
                print(f"\n### {name}, {steps} steps, guidance {family.guidance}\n\n{table}\n",
                      flush=True)
            closed = []
            for every in args.every:
                compute = schedule(steps, every, args.warmup, args.tail)
                served = 1 - sum(compute) / steps
                for k in args.orders:
                    clips = {way: closed_loop(family, loaded, prompts, steps, compute, k, way)
                             for way in "ab"}
                    db = {way: psnr(clip, traj.clip) for way, clip in clips.items()}
                    per_clip = {way: [psnr(c, r) for c, r in zip(clip, traj.clip)]
                                for way, clip in clips.items()}
                    wins = sum(b > a for a, b in zip(per_clip["a"], per_clip["b"]))
                    closed.append(dict(every=every, served=served, k=k, psnr_a=db["a"],
                                       psnr_b=db["b"], per_clip=per_clip))
                    closed_lines.append(f"| {name} | {steps} | {every} | {served:.0%} | {k} | "
                                        f"{db['a']:.2f} | {db['b']:.2f} | {db['b'] - db['a']:+.2f} | "
                                        f"{wins}/{len(prompts)} |")
            results[f"{name}/{steps}"] = dict(open_rows=rows, open_summary=summary, closed=closed)
            print(f"({name}, {steps} steps: {time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\n### closed loop: final clip PSNR vs uncached (warm-up {args.warmup}, "
          f"tail {args.tail})\n\n" + "\n".join(closed_lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
