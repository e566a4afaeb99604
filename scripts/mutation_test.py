"""Mutation testing of the runtime core with cosmic-ray: how many planted faults the tests kill.

For each module, cosmic-ray (https://github.com/sixty-north/cosmic-ray) plants one mutation
at a time in the file on disk (an operator swapped, a constant changed, a condition negated,
a decorator removed), runs that module's fast test subset (``MODULES``), and restores the
file. A mutant is *killed* when the tests fail (or time out), *survives* when they pass. The
score is killed / (killed + survived); mutants that break the import count as killed.
Mutants inside annotations are skipped before the run (every module has ``from __future__
import annotations``: an annotation is never evaluated, such a mutant cannot be killed) and
reported apart. ``docs/mutation.md`` has the last scores and the surviving mutants argued
equivalent.

    pip install -e '.[test,mutation]'            # cosmic-ray
    python scripts/mutation_test.py                            # every module below
    python scripts/mutation_test.py runtime/staging.py         # one module
    python scripts/mutation_test.py --rerun-survivors runtime/state.py   # after new tests
    python scripts/mutation_test.py --report-only              # scores of the last sessions

Sessions are kept in ``.mutation/<module>.sqlite`` (resumable: an interrupted run goes on
where it stopped; delete a session after editing its module, the mutants are positions in
the file). The surviving mutants are printed as diffs at the end: kill each with a test, or
argue it is equivalent. Not part of the default test suite.

Speed: a pytest start imports torch (~1.5 s of CPU, several seconds on a busy machine). The
script starts a fork server that imports torch, Dynamo and pytest once; each mutant's test
command forks it and runs pytest in the child, which imports the code under test (the
mutant) afresh: ~1-3 s per mutant with the subsets below (``--no-server``: one plain pytest
process per mutant). One mutant at a time: the file under test is edited in place, so run
it on a clean checkout nobody else is editing (or running tests in); for the same reason
there are no parallel workers (in one checkout they would plant mutants in the same file).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
# cosmic-ray's commands from the running interpreter's environment (a venv need not be on PATH)
COSMIC_RAY = str(pathlib.Path(sys.executable).parent / "cosmic-ray")
# -n 0: one process (pyproject's addopts would start pytest-xdist workers per mutant)
PYTEST_ARGS = ["-x", "-q", "-n", "0", "-p", "no:logging", "-p", "no:cacheprovider",
               "-p", "no:randomly", "--no-header"]
SOCKET = ROOT / ".mutation" / "pytest.sock"
UNITS = "tests/test_runtime_units.py"  # direct unit tests of the runtime core (< 1 s)
CONTROLLER = "tests/test_controller_units.py"  # the controller driven by hand (< 1 s)
# test_safety's controller tests without the Inductor fallback one (~9 s): eager lowerings,
# or the controller driven by hand
SAFETY = [f"tests/test_safety.py::test_{name}" for name in (
    "shape_change_mid_generation_starts_fresh_and_matches_uncached",
    "new_generation_never_reuses_the_previous_generations_cache",
    "non_finite_block_outputs_are_never_served",
    "dtype_change_starts_a_new_generation_and_drops_the_cache",
    "repeated_timestep_is_a_new_cfg_branch_with_its_own_state",
    "reset_forces_a_new_generation", "cache_buffers_keep_their_address_across_steps",
    "named_branches_and_generation_context_replace_guessing",
    "generation_api_starts_fresh_generations",
    "residual_reuse_is_exact_when_the_residual_is_constant",
    "lookahead_two_decides_each_step_from_the_metrics_two_steps_back",
    "lookahead_two_never_serves_a_non_finite_output", "lookahead_accepts_one_or_two_only")]
# module -> the fast tests that exercise it, a few seconds per mutant through the fork server
# (the property suite, tests/test_controller_properties.py, is the slow net behind them)
MODULES: dict[str, list[str]] = {
    "runtime/staging.py": [UNITS, "tests/test_staging.py"],
    "runtime/context.py": [UNITS, CONTROLLER] + SAFETY,
    "runtime/frames.py": [UNITS, CONTROLLER] + SAFETY,
    "runtime/state.py": [UNITS, CONTROLLER] + SAFETY,
    "runtime/history.py": [UNITS, CONTROLLER] + SAFETY,
    "runtime/buffers.py": [UNITS, CONTROLLER] + SAFETY,
    "runtime/cache_history.py": [
        UNITS, "tests/test_staging.py",
        "tests/test_forecast.py::test_lagrange_weights_use_the_real_distances_and_drop_order_without_history",
        "tests/test_policies.py"] + SAFETY,
    "runtime/controller.py": [
        UNITS, CONTROLLER,
        "tests/test_generation_length.py::test_the_length_read_off_the_timesteps_is_never_long_over_the_last_steps",
    ] + SAFETY,
    "runtime/policies/budget.py": ["tests/test_policies.py", "tests/test_budget_units.py"],
}
# Mutants no test can kill, skipped before the run: inside an annotation (every module has
# ``from __future__ import annotations``: annotations are never evaluated).
SKIP_REASON = "equivalent: annotation (never evaluated, `from __future__ import annotations`)"


# -- the pytest fork server ------------------------------------------------------------------
# A pytest start imports torch (~1.5 s of CPU, ~5 s on a busy machine) before any test runs.
# The server imports torch, Dynamo and pytest once; each mutant's test command connects and
# the server forks a child that runs pytest on the files as they are on disk (nothing of
# foresight_compile is imported before the fork, so the child imports the mutant).

def _serve(timeout: float) -> None:
    sys.dont_write_bytecode = True  # as cosmic-ray: a mutant must never leave a .pyc behind
    import numpy  # noqa: F401
    import pytest
    import torch
    import torch._dynamo  # noqa: F401  (conftest resets Dynamo around most tests)
    leaked = [m for m in sys.modules if m.split(".")[0] in ("foresight_compile", "runtime")]
    assert not leaked, f"the server must not import the code under test: {leaked}"
    SOCKET.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(SOCKET))
    server.listen(1)
    while True:
        conn, _ = server.accept()
        with conn:
            request = json.loads(conn.makefile().readline())
            pid = os.fork()
            if pid == 0:  # the child: one pytest run, then exit without cleanup
                server.close()
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                os.chdir(request["cwd"])
                os._exit(int(pytest.main(request["args"])))
            deadline = time.monotonic() + timeout
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    rc = os.waitstatus_to_exitcode(status)
                    break
                if time.monotonic() > deadline:  # a mutant that loops: killed
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    rc = 124
                    break
                time.sleep(0.01)
            conn.sendall(f"{rc}\n".encode())


def _run_tests(tests: list[str]) -> int:
    """The test command of one mutant: through the server when it runs, else a plain pytest."""
    args = PYTEST_ARGS + tests
    try:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(SOCKET))
    except OSError:
        return subprocess.run([sys.executable, "-m", "pytest", *args]).returncode
    with client:
        client.sendall((json.dumps({"args": args, "cwd": os.getcwd()}) + "\n").encode())
        reply = client.makefile().readline().strip()
    return int(reply) if reply else 1


# -- sessions ---------------------------------------------------------------------------------

def _config(module: str, tests: list[str], timeout: float) -> str:
    command = f"{sys.executable} {pathlib.Path(__file__).resolve()} --run-tests {' '.join(tests)}"
    return (f'[cosmic-ray]\nmodule-path = "{module}"\ntimeout = {timeout}\n'
            f'excluded-modules = []\ntest-command = "{command}"\n\n'
            f'[cosmic-ray.distributor]\nname = "local"\n')


def _annotation_spans(module: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    tree = ast.parse((ROOT / module).read_text())
    spans = []
    for node in ast.walk(tree):
        found = []
        if isinstance(node, ast.arg) and node.annotation is not None:
            found.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            found.append(node.returns)
        elif isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
        spans += [((a.lineno, a.col_offset), (a.end_lineno, a.end_col_offset)) for a in found]
    return spans


def _skip_annotations(module: str, session: pathlib.Path) -> int:
    """Mark the mutants inside annotations skipped (equivalent); returns how many."""
    from cosmic_ray.work_db import use_db
    from cosmic_ray.work_item import WorkerOutcome, WorkResult
    spans = _annotation_spans(module)
    skipped = 0
    with use_db(str(session)) as db:
        for item in db.work_items:
            m = item.mutations[0]
            start, end = tuple(m.start_pos), tuple(m.end_pos)
            if any(a <= start and end <= b for a, b in spans):
                db.set_result(item.job_id, WorkResult(worker_outcome=WorkerOutcome.SKIPPED,
                                                      output=SKIP_REASON))
                skipped += 1
    return skipped


def _forget_survivors(session: pathlib.Path) -> int:
    """Clear the results of the surviving mutants: the next ``exec`` runs them again."""
    import sqlite3
    with sqlite3.connect(session) as db:
        return db.execute("DELETE FROM work_results WHERE test_outcome = 'SURVIVED' "
                          "AND worker_outcome != 'SKIPPED'").rowcount


def _score(session: pathlib.Path) -> tuple[int, int, int, int, list[str]]:
    """(killed, survived, skipped, pending, diffs of the survivors) of one session."""
    dump = subprocess.run([COSMIC_RAY, "dump", str(session)], capture_output=True,
                          text=True, check=True).stdout
    killed = survived = skipped = pending = 0
    diffs = []
    for line in dump.splitlines():
        item, result = json.loads(line)
        if result is None:
            pending += 1
        elif result.get("worker_outcome") == "skipped":
            skipped += 1
        elif result.get("test_outcome") == "survived":
            survived += 1
            m = item["mutations"][0]
            diffs.append(f"[{item['job_id']}] line {m['start_pos'][0]} {m['operator_name']}\n"
                         + (result.get("diff") or ""))
        else:  # killed, or incompetent (the mutant does not even import): a fault caught
            killed += 1
    return killed, survived, skipped, pending, diffs


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--run-tests":
        return _run_tests(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # (no ``choices``: argparse checks an empty or default list against them as one value)
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"default: {', '.join(MODULES)}")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per mutant")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="run the surviving mutants of the sessions again (after new tests)")
    parser.add_argument("--no-server", action="store_true",
                        help="one plain pytest process per mutant (no fork server)")
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f"unknown module(s) {', '.join(unknown)}; choose from {', '.join(MODULES)}")
    args.modules = args.modules or list(MODULES)
    if shutil.which(COSMIC_RAY) is None:
        print("cosmic-ray is not installed: pip install -e '.[test,mutation]'")
        return 2
    os.chdir(ROOT)
    out = ROOT / ".mutation"
    out.mkdir(exist_ok=True)
    server = None
    if not (args.report_only or args.no_server):
        server = subprocess.Popen([sys.executable, __file__, "--serve", str(args.timeout)])
        while not SOCKET.exists() and server.poll() is None:
            time.sleep(0.1)
    rows = []
    try:
        for module in args.modules:
            name = module.replace("/", ".").removesuffix(".py")
            config, session = out / f"{name}.toml", out / f"{name}.sqlite"
            if not args.report_only:
                # cosmic-ray's own timeout backs the server's (a server that hangs)
                config.write_text(_config(module, MODULES[module], args.timeout + 30))
                if not session.exists():
                    subprocess.run([COSMIC_RAY, "init", str(config), str(session)], check=True)
                    print(f"{module}: {_skip_annotations(module, session)} mutants in annotations skipped")
                elif args.rerun_survivors:
                    print(f"{module}: {_forget_survivors(session)} survivors to run again")
                subprocess.run([COSMIC_RAY, "exec", str(config), str(session)], check=True)
                # cosmic-ray restores each file after its mutant; make sure nothing is left over
                subprocess.run(["git", "diff", "--exit-code", "--stat", module], check=True)
            if not session.exists():
                continue
            killed, survived, skipped, pending, diffs = _score(session)
            rows.append((module, killed, survived, skipped, pending))
            for diff in diffs:
                print(f"--- surviving mutant in {module}: {diff}")
    finally:
        if server is not None:
            server.terminate()
            server.wait()
            SOCKET.unlink(missing_ok=True)
    print("\n| module | mutants | skipped (annotations) | killed | survived | not run | score |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for module, killed, survived, skipped, pending in rows:
        done = killed + survived
        score = f"{100 * killed / done:.0f}%" if done else "-"
        print(f"| `{module}` | {done + skipped + pending} | {skipped} | {killed} | {survived} | "
              f"{pending} | {score} |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        _serve(float(sys.argv[2]))
    sys.exit(main())
