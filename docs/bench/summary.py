"""BENCHMARKS.md's summary table, from the reports ``run.sh`` writes next to this file.

    python docs/bench/summary.py            # prints the markdown table

One row per trained model and step count: how many peer points (eager, and under
``torch.compile`` / cache-dit in their own processes) one of our points dominates (ours of
the main table and of the conservative supplement, ``run.sh conservative``), the
default policy's point with its pipeline-path check, and our fastest points at >= 38 dB and
>= 50 dB.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from foresight_compile.bench.report import BenchReport

HERE = Path(__file__).resolve().parent
MODELS = {"tiny-video": "tiny video DiT (Wan, x0)",
          "tiny-video-cogvideox": "tiny CogVideoX (velocity)",
          "tiny-video-hunyuan": "tiny HunyuanVideo (dual + single stream, velocity)"}


def _load(name: str) -> BenchReport | None:
    path = HERE / f"{name}.json"
    return BenchReport.from_dict(json.loads(path.read_text())) if path.exists() else None


def _dominated(reports: list[BenchReport | None], extra: BenchReport | None = None) -> str:
    """Peer points dominated, judged against our points of each report and of ``extra`` (the
    conservative supplement, our near-exact points measured in a run of their own)."""
    if extra is not None:  # named apart from the "[other run]" points a report may hold
        extra = dataclasses.replace(extra, methods=[
            dataclasses.replace(m, name=f"{m.name} [conservative]") for m in extra.methods])
    reports = [rep if extra is None else rep.with_ours_from(extra) for rep in reports if rep is not None]
    rows = [r for rep in reports for r in rep.verdict()]
    return f"{sum(r.dominated for r in rows)} of {len(rows)}" if rows else "-"


def _fastest(report: BenchReport, floor: float) -> str:
    # ours' Pareto front runs fastest first with rising PSNR: its first point at the floor
    best = next((m for m in report.front("ours") if m.psnr >= floor), None)
    return f"`{best.name}` {best.speedup:.2f}x, {best.psnr:.1f} dB" if best else "-"


def summary() -> str:
    lines = ["| model, steps | eager peers dominated | compiled peers and cache-dit dominated "
             "| default policy (`budget`) | same under `generation()` | fastest at >= 38 dB "
             "| fastest at >= 50 dB |", "|---|---:|---:|---|---|---|---|"]
    for workload, label in MODELS.items():
        for steps in (50, 30):
            main = _load(f"{workload}-{steps}")
            if main is None:
                continue
            others = [_load(f"{workload}-{steps}-compiled-peers"), _load(f"{workload}-{steps}-cache-dit")]
            extra = _load(f"{workload}-{steps}-conservative")
            d = main.method("budget")
            same = "-"
            if d.pipeline_psnr is not None:
                served = "same" if d.pipeline_same_mask else "OTHER"
                same = f"{served} steps served, {d.pipeline_psnr:.1f} dB"
            lines.append(f"| {label}, {steps} | {_dominated([main], extra)} | {_dominated(others, extra)} | "
                         f"{d.speedup:.2f}x, {d.skipped:.0%} skipped, {d.psnr:.1f} dB, SSIM {d.ssim:.3f} | "
                         f"{same} | {_fastest(main, 38.0)} | {_fastest(main, 50.0)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(summary() + "\n")
