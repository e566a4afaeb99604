"""`foresight-compile check`: gates on a benchmark report, for CI.

Thresholds file (TOML)::

    [bench]                       # what to run when no --results file is given
    workload = "wan-ci"
    steps = 30
    repeats = 5
    methods = "inductor,none,static"
    dtype = "float32"             # optional: bfloat16 / float16 cast the model (bench --dtype)

    [[gate]]                      # one per (workload, method); workload optional
    method = "static"
    workload = "wan-ci"
    min_speedup = 1.1             # vs inductor, same process
    min_psnr = 40.0               # dB, final output vs uncached
    min_ssim = 0.99
    min_skipped = 0.2             # fraction of attention work skipped
    max_skipped = 1.0
    max_compile_ratio = 1.5       # compile seconds / inductor's
    max_cache_bytes = 50_000_000  # held between steps beyond the uncached model (bench/memory.py)

    [reference]                   # optional: a previous `bench --json` and the allowed regression
    results = "previous.json"     # relative to the thresholds file
    max_speedup_drop = 0.15       # relative
    max_psnr_drop = 1.0           # dB

Every key is checked: an unknown key is bad input (exit code 2), as is a gate naming a
method that is not in the report.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from typing import Any

from foresight_compile.bench.report import BenchReport

_GATE_BOUNDS = {
    "min_speedup": ("speedup", min), "min_psnr": ("psnr", min), "min_ssim": ("ssim", min),
    "min_skipped": ("skipped", min), "max_skipped": ("skipped", max),
    "max_compile_ratio": ("compile_ratio", max), "max_cache_bytes": ("cache_bytes", max),
}
_GATE_KEYS = {"method", "workload", *_GATE_BOUNDS}
_BENCH_KEYS = {"workload", "steps", "repeats", "methods", "seed", "sweep", "dtype"}
_REFERENCE_KEYS = {"results", "max_speedup_drop", "max_psnr_drop"}
_TOP_KEYS = {"bench", "gate", "reference"}


class ThresholdsError(ValueError):
    """The thresholds file is missing, unreadable or has unknown keys (exit code 2)."""


@dataclasses.dataclass
class CheckResult:
    passed: list[str]
    failed: list[str]

    @property
    def ok(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        lines = [f"check: {len(self.passed)} passed, {len(self.failed)} failed"]
        lines += [f"  FAIL {f}" for f in self.failed]
        lines += [f"  ok   {p}" for p in self.passed]
        return "\n".join(lines)


def load_thresholds(path: str) -> dict:
    if not os.path.exists(path):
        raise ThresholdsError(f"thresholds file {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ThresholdsError(f"thresholds file {path!r} is not valid TOML: {e}") from None
    _known(data, _TOP_KEYS, "top level")
    _known(data.get("bench", {}), _BENCH_KEYS, "[bench]")
    _known(data.get("reference", {}), _REFERENCE_KEYS, "[reference]")
    gates = data.get("gate", [])
    if not isinstance(gates, list):
        raise ThresholdsError("'gate' must be an array of tables: write [[gate]]")
    for i, gate in enumerate(gates):
        _known(gate, _GATE_KEYS, f"[[gate]] #{i + 1}")
        if "method" not in gate:
            raise ThresholdsError(f"[[gate]] #{i + 1} has no 'method'")
    if "reference" in data and "results" in data["reference"]:
        ref = data["reference"]["results"]
        data["reference"]["results"] = os.path.join(os.path.dirname(os.path.abspath(path)), ref)
    return data


def _known(table: Any, keys: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise ThresholdsError(f"{where} must be a table")
    for key in table:
        if key not in keys:
            raise ThresholdsError(f"unknown key {key!r} in {where}; accepted: {', '.join(sorted(keys))}")


def check_report(report: BenchReport, thresholds: dict) -> CheckResult:
    passed, failed = [], []
    names = [m.name for m in report.methods]
    for gate in thresholds.get("gate", []):
        if gate.get("workload", report.workload) != report.workload:
            continue
        if gate["method"] not in names:
            raise ThresholdsError(f"gate names method {gate['method']!r}, which the report does "
                                  f"not have; present: {', '.join(names)}")
        m = report.method(gate["method"])
        for key, (field, kind) in _GATE_BOUNDS.items():
            if key not in gate:
                continue
            limit, value = gate[key], getattr(m, field)
            label = f"{report.workload}/{m.name}: {field} {_fmt(value)} "
            if m.error or value is None:
                failed.append(label + f"not measured ({m.error or 'no value'}), gate {key} = {limit}")
            elif (value < limit) if kind is min else (value > limit):
                miss = limit - value if kind is min else value - limit
                failed.append(label + f"{'<' if kind is min else '>'} {key} {limit} (by {_fmt(miss)})")
            else:
                passed.append(label + f"{'>=' if kind is min else '<='} {limit}")
    reference = thresholds.get("reference")
    if reference and "results" in reference:
        _check_reference(report, reference, passed, failed)
    return CheckResult(passed, failed)


def _check_reference(report: BenchReport, reference: dict, passed: list, failed: list) -> None:
    path = reference["results"]
    try:
        with open(path) as f:
            previous = BenchReport.from_dict(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ThresholdsError(f"reference results {path!r} cannot be read: {e}") from None
    if previous.dtype != report.dtype:  # their PSNRs are against different eager runs
        raise ThresholdsError(f"reference results {path!r} ran in {previous.dtype}, this report in "
                              f"{report.dtype}; compare reports of the same dtype")
    before = {m.name: m for m in previous.methods}
    for m in report.methods:
        old = before.get(m.name)
        if old is None or m.error or old.error:
            continue
        if "max_speedup_drop" in reference and m.speedup and old.speedup:
            drop = 1 - m.speedup / old.speedup
            (failed if drop > reference["max_speedup_drop"] else passed).append(
                f"{m.name}: speedup {m.speedup:.2f}x vs reference {old.speedup:.2f}x "
                f"(drop {drop:.1%}, allowed {reference['max_speedup_drop']:.0%})")
        if "max_psnr_drop" in reference and m.psnr is not None and old.psnr is not None \
                and not math.isinf(old.psnr):
            drop = old.psnr - m.psnr
            (failed if drop > reference["max_psnr_drop"] else passed).append(
                f"{m.name}: PSNR {m.psnr:.1f} dB vs reference {old.psnr:.1f} dB "
                f"(drop {drop:.2f} dB, allowed {reference['max_psnr_drop']} dB)")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4g}"
    return str(value)
