"""`foresight-compile bench` and `check`: speed and fidelity side by side, and CI gates."""
from foresight_compile.bench.check import CheckResult, check_report, load_thresholds
from foresight_compile.bench.report import BenchReport, MethodResult
from foresight_compile.bench.runner import run_bench

__all__ = ["run_bench", "BenchReport", "MethodResult", "check_report", "load_thresholds",
           "CheckResult"]
