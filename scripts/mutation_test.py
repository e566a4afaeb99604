"""Mutation testing of the runtime core with cosmic-ray: how many planted faults the tests kill.

For each module, cosmic-ray (https://github.com/sixty-north/cosmic-ray) plants one mutation
at a time in the file on disk (an operator swapped, a constant changed, a condition negated,
a statement removed), runs that module's fast test subset, and restores the file. A mutant
is *killed* when the tests fail (or time out), *survives* when they pass. The score is
killed / (killed + survived); mutants that break the import count as killed.

    pip install -e '.[test,mutation]'            # cosmic-ray
    python scripts/mutation_test.py                            # every module below
    python scripts/mutation_test.py runtime/staging.py --workers 2
    python scripts/mutation_test.py --report-only              # scores of the last sessions

Sessions are kept in ``.mutation/<module>.sqlite`` (resumable: an interrupted run goes on
where it stopped). The surviving mutants are printed as diffs at the end: kill each with a
test, or argue it is equivalent. Not part of the default test suite: one mutant costs one
pytest start (~5-20 s on a CPU), a module a few hundred mutants.

The file under test is edited in place: run it on a clean checkout nobody else is editing.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
# cosmic-ray's commands from the running interpreter's environment (a venv need not be on PATH)
COSMIC_RAY = str(pathlib.Path(sys.executable).parent / "cosmic-ray")
PYTEST = (f"{sys.executable} -m pytest -x -q -p no:logging -p no:cacheprovider "
          "-p no:randomly --no-header")
# module -> the fast tests that exercise it (the property suite is the slow net behind them)
MODULES: dict[str, list[str]] = {
    "runtime/staging.py": ["tests/test_staging.py"],
    "runtime/context.py": ["tests/test_reuse.py", "tests/test_concurrency.py"],
    "runtime/frames.py": ["tests/test_reuse.py", "tests/test_concurrency.py"],
    "runtime/history.py": ["tests/test_reuse.py", "tests/test_reuse_map.py"],
    "runtime/buffers.py": ["tests/test_cache_memory.py", "tests/test_safety.py"],
    "runtime/cache_history.py": ["tests/test_forecast.py::test_lagrange_weights_use_the_real_distances_and_drop_order_without_history",
                                 "tests/test_policies.py", "tests/test_safety.py"],
    "runtime/state.py": ["tests/test_reuse.py", "tests/test_safety.py"],
    "runtime/controller.py": ["tests/test_reuse.py", "tests/test_safety.py",
                              "tests/test_generation_length.py"],
    "runtime/policies/budget.py": ["tests/test_policies.py"],
}


def _config(module: str, tests: list[str], timeout: float, workers: int) -> str:
    command = f"{PYTEST} {' '.join(tests)}"
    distributor = ('name = "local"' if workers <= 1 else
                   'name = "http"\n[cosmic-ray.distributor.http]\nworker-urls = [' +
                   ", ".join(f'"http://localhost:{9876 + i}"' for i in range(workers)) + "]")
    return (f'[cosmic-ray]\nmodule-path = "{module}"\ntimeout = {timeout}\n'
            f'excluded-modules = []\ntest-command = "{command}"\n\n'
            f'[cosmic-ray.distributor]\n{distributor}\n')


def _score(session: pathlib.Path) -> tuple[int, int, int, list[str]]:
    """(killed, survived, pending, diffs of the survivors) of one session."""
    dump = subprocess.run([COSMIC_RAY, "dump", str(session)], capture_output=True,
                          text=True, check=True).stdout
    killed = survived = pending = 0
    diffs = []
    for line in dump.splitlines():
        item, result = json.loads(line)
        if result is None:
            pending += 1
        elif result.get("test_outcome") == "survived":
            survived += 1
            diffs.append(result.get("diff") or str(item))
        else:  # killed, or incompetent (the mutant does not even import): a fault caught
            killed += 1
    return killed, survived, pending, diffs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", default=list(MODULES), choices=list(MODULES),
                        metavar="MODULE", help=f"default: {', '.join(MODULES)}")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if shutil.which(COSMIC_RAY) is None:
        print("cosmic-ray is not installed: pip install -e '.[mutation]'")
        return 2
    os.chdir(ROOT)
    out = ROOT / ".mutation"
    out.mkdir(exist_ok=True)
    rows = []
    for module in args.modules:
        name = module.replace("/", ".").removesuffix(".py")
        config, session = out / f"{name}.toml", out / f"{name}.sqlite"
        if not args.report_only:
            config.write_text(_config(module, MODULES[module], args.timeout, args.workers))
            if not session.exists():
                subprocess.run([COSMIC_RAY, "init", str(config), str(session)], check=True)
            workers = [subprocess.Popen([COSMIC_RAY, "http-worker", "--port", str(9876 + i)])
                       for i in range(args.workers if args.workers > 1 else 0)]
            try:
                subprocess.run([COSMIC_RAY, "exec", str(config), str(session)], check=True)
            finally:
                for w in workers:
                    w.terminate()
            # cosmic-ray restores each file after its mutant; make sure nothing is left over
            subprocess.run(["git", "diff", "--exit-code", "--stat", module], check=True)
        if not session.exists():
            continue
        killed, survived, pending, diffs = _score(session)
        rows.append((module, killed, survived, pending))
        for diff in diffs:
            print(f"--- surviving mutant in {module}:\n{diff}")
    print("\n| module | mutants | killed | survived | not run | score |\n|---|---:|---:|---:|---:|---:|")
    for module, killed, survived, pending in rows:
        done = killed + survived
        score = f"{100 * killed / done:.0f}%" if done else "-"
        print(f"| `{module}` | {done + pending} | {killed} | {survived} | {pending} | {score} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
