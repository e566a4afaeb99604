"""What does a served step really cost? The ``budget`` policy's estimate against the truth.

For each trained model and step count, one generation under ``budget`` (eager lowering,
``generation(num_steps)``) runs beside the uncached model. At every step:

* ``est``: what the policy estimated, at the end of the previous step, that serving this
  step would cost (recorded from ``BudgetReuse.observe``), and ``acc``, the run's
  accumulated estimate with it (the value compared with the step's budget,
  ``BudgetReuse.tolerance_at``);
* ``local``: at a served step, the relative L2 error of the served prediction against what
  the uncached model computes on the same latent, ``|F - Y| / |Y|``;
* ``injected``: that error as it enters the latent, ``|dt (F - Y)|`` relative to the RMS of
  the uncached final latent (``dt`` the step's sigma difference);
* ``propagated``: the same injection carried to the end by the uncached dynamics,
  ``|Phi_{t+1}(z_{t+1}) - Phi_{t+1}(z_t + dt Y_t)|`` relative to the same RMS, where ``Phi``
  runs the remaining steps uncached and ``z`` is the cached run's latent. The propagated
  terms telescope: they sum (as vectors) to the final error exactly.

    python examples/estimate_vs_truth.py                                 # both models, 30 and 50
    python examples/estimate_vs_truth.py --models tiny-video --steps 30 --tolerance 1.0
    python examples/estimate_vs_truth.py --json examples/output/estimate_vs_truth.json

Writes a scatter plot (estimate vs propagated truth, coloured by position in the schedule)
to ``examples/output/estimate_vs_truth.png`` and prints, per run, the served steps.
Costs one uncached tail per served step: ~2-4 CPU-minutes per run on the tiny models.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import foresight_compile  # noqa: E402
from foresight_compile import models  # noqa: E402
from foresight_compile.bench.metrics import psnr  # noqa: E402
from foresight_compile.runtime.policies import budget  # noqa: E402

HERE = Path(__file__).resolve().parent


class EstimateRecorder:
    """Records, per decided step, what ``BudgetReuse.observe`` estimated: the step's own
    estimate, the run's accumulated one (compared with the step's budget), the forecast's error
    rate and the latent's pace."""

    def __init__(self) -> None:
        self.rows: dict[int, dict] = {}
        self._original = budget.BudgetReuse.observe

    def __enter__(self):
        recorder, original = self, self._original

        def observe(policy, step, warmup, state, history=None, total=None):
            original(policy, step, warmup, state, history, total)
            target = step + policy.lookahead
            aux = state.aux
            recorder.rows[target] = {"est": float(aux[budget._EST + target % 2]),
                                     "accumulated": float(aux[budget._TMP]),
                                     "rate": float(aux[budget._RATE]),
                                     "rho": float(aux[budget._RHO])}
        budget.BudgetReuse.observe = observe
        return self

    def __exit__(self, *exc) -> None:
        budget.BudgetReuse.observe = self._original


def _sigmas(dit, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    import diffusers
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**dit.scheduler_config)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps, scheduler.sigmas


def _predict(model, dit, x, t):
    return dit.prediction(model(**dit.inputs(x, t.expand(x.shape[0])))).float()


def _tail(dit, x, start: int, timesteps, sigmas) -> torch.Tensor:
    """The uncached dynamics from step ``start`` (latent ``x``) to the end."""
    for i in range(start, len(timesteps)):
        x = x + (sigmas[i + 1] - sigmas[i]) * _predict(dit.model, dit, x, timesteps[i])
    return x


def measure(name: str, steps: int, options: dict, seed: int = 0) -> dict:
    dit = models.FACTORIES[name](prompts=4)
    timesteps, sigmas = _sigmas(dit, steps)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(dit.latent_shape, generator=g)
    with torch.no_grad():
        reference = _tail(dit, x0, 0, timesteps, sigmas)
        rms = reference.square().mean().sqrt().item()
        torch._dynamo.reset()
        fast = torch.compile(dit.model, backend="foresight",
                             options={"lowering": "eager", **options})
        rows, z = [], x0
        with EstimateRecorder() as recorder, foresight_compile.generation(num_steps=steps):
            for i, t in enumerate(timesteps):
                served = _predict(fast, dit, z, t)
                truth = _predict(dit.model, dit, z, t)
                dt = (sigmas[i + 1] - sigmas[i]).item()
                z_next = z + dt * served
                rows.append({"step": i, "sigma": sigmas[i].item(), "dt": dt,
                             "local": ((served - truth).norm() / truth.norm()).item(),
                             "injected": abs(dt) * (served - truth).square().mean().sqrt().item() / rms,
                             "z": z, "z_next": z_next, "truth_next": z + dt * truth})
                z = z_next
        mask = [all(m) for m in foresight_compile.stats(fast).mask]
        final = z
        terms = []
        for row, is_served in zip(rows, mask):
            row["served"] = is_served
            row.update(recorder.rows.get(row["step"], {}))
            if is_served:
                i = row["step"]
                a = _tail(dit, row["z_next"], i + 1, timesteps, sigmas)
                b = _tail(dit, row["truth_next"], i + 1, timesteps, sigmas)
                row["propagated"] = (a - b).square().mean().sqrt().item() / rms
                terms.append((i, (a - b) / rms))
            for key in ("z", "z_next", "truth_next"):
                del row[key]
        # How the served steps' errors add up: within a run of consecutive served steps
        # (one extrapolation) and across runs.
        runs: list[list] = []
        for i, term in terms:
            if runs and runs[-1][-1][0] == i - 1:
                runs[-1].append((i, term))
            else:
                runs.append([(i, term)])
        rms_of = lambda v: v.square().mean().sqrt().item()  # noqa: E731
        run_sums = [sum(t for _, t in run) for run in runs]
        addition = {"final": rms_of((final - reference) / rms),
                    "sum_of_terms": sum(rms_of(t) for _, t in terms),
                    "quadrature_of_terms": math.sqrt(sum(rms_of(t) ** 2 for _, t in terms)),
                    "sum_of_runs": sum(rms_of(r) for r in run_sums),
                    "quadrature_of_runs": math.sqrt(sum(rms_of(r) ** 2 for r in run_sums)),
                    "runs": [[run[0][0], run[-1][0], rms_of(r), sum(rms_of(t) for _, t in run)]
                             for run, r in zip(runs, run_sums)]}
    return {"model": name, "steps": steps, "options": options,
            "psnr": psnr(final, reference), "reused": sum(mask) / len(mask), "rows": rows,
            "addition": addition}


def summary(results: list[dict]) -> str:
    """Per run: how well the estimate ranks the served steps (the spread of
    log(propagated / est) over served steps with an estimate), how errors add within runs
    (|sum| over sum of |terms|) and across them (final over the runs' root-sum-square)."""
    lines = ["| model | steps | options | PSNR dB | served | median truth/est | spread (sd of log) "
             "| within runs: abs(sum)/sum(abs) | final / runs' RSS |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        pairs = [(row["propagated"], row["est"]) for row in r["rows"]
                 if row["served"] and row.get("est", 0) > 0 and "propagated" in row]
        logs = sorted(math.log(t / e) for t, e in pairs)
        mean = sum(logs) / len(logs)
        spread = math.sqrt(sum((v - mean) ** 2 for v in logs) / len(logs))
        a = r["addition"]
        lines.append(f"| {r['model']} | {r['steps']} | {r['options'] or 'default'} | {r['psnr']:.1f} | "
                     f"{r['reused']:.0%} | {math.exp(logs[len(logs) // 2]):.2f} | {spread:.2f} | "
                     f"{a['sum_of_runs'] / a['sum_of_terms']:.2f} | {a['final'] / a['quadrature_of_runs']:.2f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, r in zip(axes[0], results):
        served = [row for row in r["rows"] if row["served"] and "est" in row]
        sc = ax.scatter([row["est"] for row in served], [row["propagated"] for row in served],
                        c=[row["step"] / r["steps"] for row in served], cmap="viridis", s=18)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("estimate (est)")
        ax.set_ylabel("propagated error / RMS")
        ax.set_title(f"{r['model']} {r['steps']} steps\n{r['options']} {r['psnr']:.1f} dB", fontsize=8)
    fig.colorbar(sc, ax=axes[0].tolist(), label="position in the schedule")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-video", "tiny-video-cogvideox"],
                    help="trained workloads of models.FACTORIES (also tiny-video-hunyuan)")
    ap.add_argument("--steps", nargs="+", type=int, default=[30, 50])
    ap.add_argument("--tolerance", type=float, nargs="+", default=[None])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--summary-of", type=Path, help="print the summary table of a saved --json and exit")
    ap.add_argument("--plot", type=Path, default=HERE / "output" / "estimate_vs_truth.png")
    args = ap.parse_args()
    if args.summary_of:
        print(summary(json.loads(args.summary_of.read_text())))
        return
    torch.set_num_threads(args.threads)
    results = []
    for name in args.models:
        for steps in args.steps:
            for tol in args.tolerance:
                r = measure(name, steps, {} if tol is None else {"tolerance": tol})
                results.append(r)
                print(f"## {name}, {steps} steps, {r['options'] or 'default'}: "
                      f"{r['psnr']:.2f} dB, {r['reused']:.0%} served")
                a = r["addition"]
                print(f"final error / RMS {a['final']:.2e}; served steps' terms: sum {a['sum_of_terms']:.2e}, "
                      f"quadrature {a['quadrature_of_terms']:.2e}; per run (terms summed as vectors): "
                      f"sum {a['sum_of_runs']:.2e}, quadrature {a['quadrature_of_runs']:.2e}")
                print("runs (first, last, |sum|, sum of |terms|):",
                      " ".join(f"{f}-{l}:{v:.1e}/{w:.1e}" for f, l, v, w in a["runs"]))
                print("step sigma     dt   served  est      acc      local    injected propagated")
                for row in r["rows"]:
                    print(f"{row['step']:4d} {row['sigma']:.3f} {row['dt']:+.3f} {'S' if row['served'] else '.'} "
                          f"{row.get('est', math.nan):8.2e} {row.get('accumulated', math.nan):8.2e} "
                          f"{row['local']:8.2e} {row['injected']:8.2e} {row.get('propagated', math.nan):8.2e}")
    print(summary(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.plot)


if __name__ == "__main__":
    main()
