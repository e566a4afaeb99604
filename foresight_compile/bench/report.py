"""The benchmark report: a dataclass with a stable JSON schema, a table, markdown, a plot.

JSON schema (``schema_version`` 1)::

    {"schema_version": 1, "workload": str, "steps": int, "repeats": int, "seed": int,
     "date": ISO-8601 str, "torch": str, "diffusers": str, "threads": int,
     "block_share": float,            # f: share of a step spent in blocks (measured)
     "dtype": str,                    # the model's precision (bench --dtype); absent: float32
     "methods": [{"name": str, "kind": str, "family": "baseline"|"ours"|"peer",
                  "options": {str: value}, "compiled": bool,
                  "seconds": float|null,          # median seconds per generation
                  "speedup": float|null,          # inductor seconds / seconds
                  "compile_seconds": float|null,  # first call: trace + compile + one step
                  "compile_ratio": float|null,    # compile_seconds / inductor's
                  "skipped": float|null,          # 1 - attention calls / uncached attention calls
                  "cache_bytes": int|null,        # tensors kept alive between steps beyond
                                                  # the uncached model's (memory.py census)
                  "psnr": float|null, "ssim": float|null,  # final latent vs uncached eager
                  "ceiling": float|null,          # 1 / (1 - block_share * skipped)
                  "pipeline_psnr": float|null,    # ours: the same generation inside
                                                  # generation(num_steps) (the pipeline path)
                  "pipeline_same_mask": bool|null,  # ours: both paths served the same steps
                  "error": str|null}],            # why a method did not run
     # derived from "methods" when written (ignored when read):
     "fronts": {"ours": [name, ...], "peer": [name, ...]},   # Pareto-optimal, fastest first
     "verdict": [{"peer": name, "peer_speedup": float, "peer_psnr": float,
                  "ours": name|null, "ours_speedup": float|null, "ours_psnr": float|null,
                  "ratio": float|null}]}        # ours_speedup / peer_speedup

``cache_bytes`` is measured the same way for every method, baselines, ours and peers
(``memory.py``): a census of live tensors between two denoising steps, minus the same census
of the uncached model. For ours it is ``stats().cache_bytes`` plus fixed bookkeeping (the
stats ring, per-block scalars). Tables and the plot show it in MiB.

The verdict answers, for every peer point: which of our points is the fastest with at least
the peer's PSNR, and how much faster (``ratio`` >= 1: the peer point is dominated). PSNR at
or above ``EXACT_PSNR`` counts as exact: a peer that reuses nothing is bitwise the eager
reference (inf dB), ours without reuse differs by Inductor's float rounding (~150 dB).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

SCHEMA_VERSION = 1
OTHER_RUN = "[other run]"  # marks our points read from another process's report
EXACT_PSNR = 100.0  # dB: at or above, the output counts as the reference (float rounding)


@dataclasses.dataclass
class MethodResult:
    name: str
    kind: str
    family: str
    options: dict[str, Any]
    compiled: bool
    seconds: float | None = None
    speedup: float | None = None
    compile_seconds: float | None = None
    compile_ratio: float | None = None
    skipped: float | None = None
    cache_bytes: int | None = None
    psnr: float | None = None
    ssim: float | None = None
    ceiling: float | None = None
    pipeline_psnr: float | None = None
    pipeline_same_mask: bool | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class VerdictRow:
    peer: str
    peer_speedup: float
    peer_psnr: float
    ours: str | None  # our fastest method with PSNR >= the peer's (None: none reaches it)
    ours_speedup: float | None
    ours_psnr: float | None

    @property
    def ratio(self) -> float | None:
        return None if self.ours_speedup is None else self.ours_speedup / self.peer_speedup

    @property
    def dominated(self) -> bool:
        return self.ratio is not None and self.ratio >= 1.0


def _measured(m: MethodResult) -> bool:
    return not m.error and m.speedup is not None and m.psnr is not None


def pareto_front(methods: list[MethodResult]) -> list[MethodResult]:
    """The methods no other one beats on both speedup and PSNR, fastest first."""
    points = sorted((m for m in methods if _measured(m)), key=lambda m: (-m.speedup, -m.psnr))
    front, best_psnr = [], -math.inf
    for m in points:
        if m.psnr > best_psnr:
            front.append(m)
            best_psnr = m.psnr
    return front


@dataclasses.dataclass
class BenchReport:
    workload: str
    steps: int
    repeats: int
    seed: int
    date: str
    torch: str
    diffusers: str
    threads: int
    block_share: float | None
    methods: list[MethodResult]
    schema_version: int = SCHEMA_VERSION
    dtype: str = "float32"  # the model's parameters and call inputs (workloads.in_dtype)

    def method(self, name: str) -> MethodResult:
        for m in self.methods:
            if m.name == name:
                return m
        raise KeyError(f"no method {name!r} in the report; present: {[m.name for m in self.methods]}")

    def front(self, family: str) -> list[MethodResult]:
        return pareto_front([m for m in self.methods if m.family == family])

    def require_run_of(self, workload: str, steps: int, dtype: str = "float32") -> None:
        """Raises ValueError unless this report ran ``workload`` at ``steps`` steps in ``dtype``."""
        for key, want in (("workload", workload), ("steps", steps), ("dtype", dtype)):
            if getattr(self, key) != want:
                raise ValueError(f"--ours-from: its {key} is {getattr(self, key)!r}, this run's is "
                                 f"{want!r}; pass a report of the same workload, steps and dtype")

    def with_ours_from(self, other: "BenchReport") -> "BenchReport":
        """This report with ``other``'s points of ours added (for the verdict and the plot):
        peers that must run in a process of their own (under ``torch.compile``, cache-dit)
        are judged against our points measured in another process. Speedups are each run's
        ratio to its own inductor baseline, so they compare across processes; the workload,
        the step count and the dtype must be the same."""
        other.require_run_of(self.workload, self.steps, self.dtype)
        names = {m.name for m in self.methods}
        added = [dataclasses.replace(m, name=f"{m.name} {OTHER_RUN}") for m in other.methods
                 if m.family == "ours" and m.name not in names]
        if not added:
            raise ValueError("--ours-from: the report holds none of our points to compare with")
        return dataclasses.replace(self, methods=self.methods + added)

    def verdict(self) -> list[VerdictRow]:
        """For every measured peer point, our fastest point with at least its PSNR."""
        ours = [m for m in self.methods if m.family == "ours" and _measured(m)]
        rows = []
        for peer in (m for m in self.methods if m.family == "peer" and _measured(m)):
            able = [m for m in ours if min(m.psnr, EXACT_PSNR) >= min(peer.psnr, EXACT_PSNR)]
            best = max(able, key=lambda m: m.speedup, default=None)
            rows.append(VerdictRow(peer.name, peer.speedup, peer.psnr,
                                   best and best.name, best and best.speedup, best and best.psnr))
        return rows

    def verdict_text(self, markdown: bool = False) -> str:
        rows = self.verdict()
        if not rows:
            return ""
        won = sum(r.dominated for r in rows)
        head = f"verdict: {won} of {len(rows)} peer points dominated by one of ours"
        if markdown:
            lines = [f"**{head}** (ours: the fastest of our points with PSNR >= the peer's)", "",
                     "| peer | speedup | PSNR dB | ours | speedup | PSNR dB | ratio |",
                     "|---|---:|---:|---|---:|---:|---:|"]
            for r in rows:
                lines.append(f"| {r.peer} | {r.peer_speedup:.2f}x | {_f(r.peer_psnr, '.1f')} | "
                             f"{r.ours or 'none reaches its PSNR'} | {_f(r.ours_speedup, '.2f', 'x')} | "
                             f"{_f(r.ours_psnr, '.1f')} | {_f(r.ratio, '.2f', 'x')} |")
            return "\n".join(lines) + "\n"
        lines = [head]
        for r in rows:
            mark = "won " if r.dominated else "LOST"
            lines.append(f"  {mark} {r.peer:<38} {r.peer_speedup:5.2f}x {_f(r.peer_psnr, '.1f'):>5} dB"
                         f"  <- {r.ours or 'none reaches its PSNR'} "
                         f"{_f(r.ours_speedup, '.2f', 'x')} {_f(r.ours_psnr, '.1f')} dB"
                         f" (ratio {_f(r.ratio, '.2f', 'x')})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["fronts"] = {f: [m.name for m in self.front(f)] for f in ("ours", "peer")}
        d["verdict"] = [{**dataclasses.asdict(r), "ratio": r.ratio} for r in self.verdict()]
        return _jsonable(d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "BenchReport":
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"bench JSON has schema_version {data.get('schema_version')!r}; "
                             f"this version reads {SCHEMA_VERSION}")
        fields = {f.name for f in dataclasses.fields(MethodResult)}
        methods = [MethodResult(**{k: (math.inf if v == "inf" else v) for k, v in m.items() if k in fields})
                   for m in data["methods"]]
        top = {f.name for f in dataclasses.fields(cls)} - {"methods"}
        return cls(methods=methods, **{k: v for k, v in data.items() if k in top})

    def table(self) -> str:
        head = (f"{'method':<34}{'s/gen':>7}{'speedup':>9}{'ceiling':>8}{'skipped':>8}"
                f"{'PSNR':>7}{'SSIM':>7}{'compile s':>10}{'cache MiB':>10}{'pipeline':>9}")
        lines = [f"{self.workload}: {self.steps} steps{self._dtype_note()}, median of {self.repeats}, "
                 f"block share f={_f(self.block_share, '.2f')}", head]
        for m in self.methods:
            if m.error:
                lines.append(f"{m.name:<34}  skipped: {m.error}")
                continue
            lines.append(
                f"{m.name:<34}{_f(m.seconds, '.2f'):>7}{_f(m.speedup, '.2f', 'x'):>9}"
                f"{_f(m.ceiling, '.2f', 'x'):>8}{_f(m.skipped, '.0%'):>8}{_f(m.psnr, '.1f'):>7}"
                f"{_f(m.ssim, '.3f'):>7}{_f(m.compile_seconds, '.1f'):>10}"
                f"{_f(_mib(m), '.2f'):>10}{_pipeline(m):>9}")
        for family in ("ours", "peer"):
            front = self.front(family)
            if front:
                lines.append(f"{family} front: " + ", ".join(
                    f"{m.name} {m.speedup:.2f}x/{_f(m.psnr, '.1f')}dB" for m in front))
        verdict = self.verdict_text()
        return "\n".join(lines + ([verdict] if verdict else []))

    def _dtype_note(self) -> str:
        return "" if self.dtype == "float32" else f", {self.dtype} (PSNR against the eager {self.dtype} run)"

    def markdown(self) -> str:
        rows = ["| method | s/gen | speedup | ceiling | skipped | PSNR dB | SSIM | compile s | cache MiB "
                "| pipeline path |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in self.methods:
            if m.error:
                rows.append(f"| {m.name} | skipped: {m.error} ||||||||| ")
                continue
            rows.append(
                f"| {m.name} | {_f(m.seconds, '.2f')} | {_f(m.speedup, '.2f', 'x')} | "
                f"{_f(m.ceiling, '.2f', 'x')} | {_f(m.skipped, '.0%')} | {_f(m.psnr, '.1f')} | "
                f"{_f(m.ssim, '.3f')} | {_f(m.compile_seconds, '.1f')} | "
                f"{_f(_mib(m), '.2f')} | {_pipeline(m)} |")
        return (f"**{self.workload}**, {self.steps} steps{self._dtype_note()}, median of {self.repeats} generations, "
                f"torch {self.torch}, diffusers {self.diffusers}, {self.threads} threads, "
                f"{self.date}; block share f = {_f(self.block_share, '.2f')}\n\n" + "\n".join(rows) + "\n"
                + ("\n" + self.verdict_text(markdown=True) if self.verdict() else ""))

    def pareto_plot(self, path: str) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
        colours = {"baseline": "tab:gray", "ours": "tab:blue", "peer": "tab:orange"}
        for m in self.methods:
            if not _measured(m):
                continue
            y = min(m.psnr, 100.0)  # identical output: plotted at the top, not at infinity
            ax.scatter(m.speedup, y, color=colours[m.family], s=18, alpha=0.7)
            ax.annotate(_point_label(m), (m.speedup, y), fontsize=5, xytext=(3, 3),
                        textcoords="offset points")
        for family, label in (("ours", "our front"), ("peer", "peers' front")):
            front = self.front(family)[::-1]  # slowest (most faithful) first
            if front:
                xs = [m.speedup for m in front]
                ys = [min(m.psnr, 100.0) for m in front]
                ax.step(xs, ys, where="post", color=colours[family], lw=1.2, label=label)
        ax.plot([], [], " ", label="[x MiB]: cache kept between steps")
        ax.legend(loc="lower left", fontsize=7)
        ax.axvline(1.0, color="k", lw=0.5)
        ax.set_xlabel("speedup vs torch.compile(inductor)")
        ax.set_ylabel("PSNR of final output vs uncached (dB, capped at 100)")
        ax.set_title(f"{self.workload}, {self.steps} steps (blue: ours, orange: peers)")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)


def _mib(m: MethodResult) -> float | None:
    return None if m.cache_bytes is None else m.cache_bytes / 2**20


def _pipeline(m: MethodResult) -> str:
    """Ours under ``generation(num_steps)``: its PSNR, ``=`` when it served the same steps as
    the bare loop (the timed path), ``!=`` when not; ``-`` for baselines and peers."""
    if m.pipeline_psnr is None:
        return "-"
    return f"{m.pipeline_psnr:.1f}{'=' if m.pipeline_same_mask else '!='}"


def _point_label(m: MethodResult) -> str:
    """A plotted point's name with its cache MiB (the legend explains the brackets)."""
    return m.name if m.cache_bytes is None else f"{m.name} [{_mib(m):.2f} MiB]"


def _f(value, spec: str, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec) + suffix


def _jsonable(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
