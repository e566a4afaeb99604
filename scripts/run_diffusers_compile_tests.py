"""Run diffusers' own torch.compile tests with backend="inductor" and with backend="foresight".

diffusers' ``TorchCompileTesterMixin`` tests (``tests/models/transformers/
test_models_transformer_*.py``: recompilation and graph breaks with ``fullgraph=True``,
``compile_repeated_blocks``, group offloading, ``dynamic=True`` over several sizes) are run
twice per family, each family in its own pytest process: once as they are (Inductor), once
with ``torch.compile``'s default backend swapped for ``"foresight"`` (default options). The
result is a Markdown table: family, test, Inductor's result, ours, and what our backend did
(block programs built, or the fallback warning's reason).

Getting diffusers' tests (only ``tests/`` is used; the installed diffusers is the one
tested: a checkout's ``src/`` would shadow it, so point at a copy without it)::

    git clone --depth 1 --branch v0.42.0 https://github.com/huggingface/diffusers /tmp/diffusers
    python scripts/run_diffusers_compile_tests.py /tmp/diffusers/tests

or, from a bare snapshot (the ``fetch`` of github:huggingface/diffusers)::

    mkdir -p /tmp/dt && git --git-dir=<snapshot> archive HEAD tests | tar -x -C /tmp/dt
    python scripts/run_diffusers_compile_tests.py /tmp/dt/tests --families krea2 flux

Options: ``--families`` (default: every file that uses ``TorchCompileTesterMixin``),
``--out`` (the Markdown file), ``--timeout`` (seconds per family and backend),
``--with-aot`` (``test_compile_works_with_aot`` exports with ``torch.export`` and AOTInductor,
never ``torch.compile``: the same for both backends, so left out by default).

On a machine without an accelerator, diffusers skips these tests
(``@require_accelerator``); this script lifts that skip (``--keep-accelerator-skip`` keeps
it), so they run on the CPU. Not part of the package's test suite: it is slow (every test
compiles a model with Inductor).

The same file is the pytest plugin of the runs (``-p run_diffusers_compile_tests``, with
``FORESIGHT_DIFFUSERS_BACKEND`` and ``FORESIGHT_DIFFUSERS_RESULTS`` set by the driver).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import pathlib
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

ACCELERATOR_SKIP = "requires a hardware accelerator"
BACKEND_ENV = "FORESIGHT_DIFFUSERS_BACKEND"
RESULTS_ENV = "FORESIGHT_DIFFUSERS_RESULTS"
KEEP_SKIP_ENV = "FORESIGHT_DIFFUSERS_KEEP_SKIP"

# ---------------------------------------------------------------------------------------
# The pytest plugin (imported by pytest inside each run).
# ---------------------------------------------------------------------------------------
_RECORDS: dict[str, dict] = {}
_CURRENT: dict = {}


def _plugin_active() -> bool:
    return os.environ.get(RESULTS_ENV) is not None


def pytest_configure(config):
    if not _plugin_active():
        return
    backend = os.environ.get(BACKEND_ENV, "inductor")
    if backend == "inductor":
        return
    import torch

    original = torch.compile

    def compile_with_our_backend(*args, **kwargs):
        # nn.Module.compile and diffusers' compile_repeated_blocks call torch.compile too.
        kwargs.setdefault("backend", backend)
        return original(*args, **kwargs)

    compile_with_our_backend.__wrapped__ = original
    torch.compile = compile_with_our_backend
    from foresight_compile import program

    built = program.ForesightProgram.__init__

    def counting_init(self, *args, **kwargs):
        built(self, *args, **kwargs)
        _CURRENT["programs"] = _CURRENT.get("programs", 0) + 1
        _CURRENT.setdefault("blocks", len(self.block_paths))

    program.ForesightProgram.__init__ = counting_init
    recorded = program.record_fallback

    def noting_fallback(example_inputs, reason, policy):
        # Counted here, not from the warning: pytest reports a test's warnings only after
        # its teardown, and a warning filter may hide them.
        _CURRENT.setdefault("fallbacks", []).append(reason)
        return recorded(example_inputs, reason, policy)

    program.record_fallback = noting_fallback


def pytest_collection_modifyitems(session, config, items):
    if not _plugin_active() or os.environ.get(KEEP_SKIP_ENV):
        return
    for item in items:
        for node in item.listchain():
            node.own_markers[:] = [
                m for m in node.own_markers
                if not (m.name == "skipif" and ACCELERATOR_SKIP in str(m.kwargs.get("reason", "")))]
        cls = getattr(item, "cls", None)
        if cls is not None:  # class marks are read from the class (and its bases) too
            for klass in cls.__mro__:
                marks = klass.__dict__.get("pytestmark")
                if isinstance(marks, list):
                    marks[:] = [m for m in marks if not (
                        m.name == "skipif" and ACCELERATOR_SKIP in str(m.kwargs.get("reason", "")))]


def pytest_runtest_setup(item):
    if _plugin_active():
        _CURRENT.clear()


def pytest_runtest_logreport(report):
    if not _plugin_active():
        return
    record = _RECORDS.setdefault(report.nodeid, {"outcome": "passed"})
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        record.update(outcome="skipped", detail=reason.removeprefix("Skipped: "))
    elif report.failed:
        message = getattr(report.longrepr, "reprcrash", None)
        text = message.message if message is not None else str(report.longrepr)
        record.update(outcome="failed" if report.when == "call" else "error",
                      detail=text.strip().splitlines()[0][:300] if text.strip() else "")
    if report.when == "teardown":
        record.update(programs=_CURRENT.get("programs", 0), blocks=_CURRENT.get("blocks"),
                      fallbacks=_CURRENT.get("fallbacks", []))


def pytest_sessionfinish(session, exitstatus):
    if _plugin_active():
        pathlib.Path(os.environ[RESULTS_ENV]).write_text(json.dumps(_RECORDS, indent=1))


# ---------------------------------------------------------------------------------------
# The driver.
# ---------------------------------------------------------------------------------------
_CHILDREN: set = set()


def _stop_children(signum=None, frame=None) -> None:
    """A stopped driver stops its pytest processes (each by its own id)."""
    for proc in list(_CHILDREN):
        if proc.poll() is None:
            proc.kill()
    if signum is not None:
        os._exit(128 + signum)


def families(tests_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    found = {}
    for path in sorted((tests_dir / "models" / "transformers").glob("test_models_transformer_*.py")):
        if "TorchCompileTesterMixin" in path.read_text():
            found[path.stem.removeprefix("test_models_transformer_")] = path
    return found


def run_family(path: pathlib.Path, tests_dir: pathlib.Path, backend: str, args) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        results = f.name
    env = {**os.environ, BACKEND_ENV: backend, RESULTS_ENV: results,
           "PYTHONPATH": os.pathsep.join([str(pathlib.Path(__file__).resolve().parent),
                                          os.environ.get("PYTHONPATH", "")])}
    if args.keep_accelerator_skip:
        env[KEEP_SKIP_ENV] = "1"
    select = "compile" if args.with_aot else "compile and not aot"
    command = [sys.executable, "-m", "pytest", "-p", "run_diffusers_compile_tests",
               "-p", "no:cacheprovider", "-q", "--tb=line", "-k", select,
               str(path.relative_to(tests_dir.parent))]
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=tests_dir.parent, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _CHILDREN.add(proc)
    try:
        out, _ = proc.communicate(timeout=args.timeout)
        tail = out.strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        tail = [f"timed out after {args.timeout} s"]
    finally:
        _CHILDREN.discard(proc)
    seconds = time.perf_counter() - start
    try:
        records = json.loads(pathlib.Path(results).read_text())
    except (OSError, json.JSONDecodeError):
        records = {}
    pathlib.Path(results).unlink(missing_ok=True)
    if not records:
        records = {path.name: {"outcome": "error", "detail": " / ".join(tail)[:300]}}
    print(f"  {backend:9s} {seconds:6.0f} s  " + ", ".join(
        f"{k.rsplit('::', 1)[-1]}={v['outcome']}" for k, v in records.items()), flush=True)
    return records


def _cell(record: dict | None) -> str:
    if record is None:
        return "not run"
    outcome = record["outcome"]
    if outcome in ("skipped", "failed", "error") and record.get("detail"):
        return f"{outcome}: {_escape(record['detail'])[:160]}"
    return outcome


def _what_we_did(record: dict | None) -> str:
    if record is None or record["outcome"] == "skipped":
        return ""
    parts = []
    if record.get("programs"):
        parts.append(f"{record['programs']} block program(s), {record['blocks']} blocks")
    for reason in dict.fromkeys(record.get("fallbacks", [])):
        parts.append(f"fallback: {_escape(reason)[:160]}")
    return "; ".join(parts) or "no graph reached the backend"


def _escape(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("|", "\\|")


def table(results: dict[str, dict[str, dict]]) -> str:
    """One row per test that ran under at least one backend; tests skipped under both
    (``-k compile`` also selects variants such as attention backends and LoRA hotswapping)
    are counted per family in the last row of that family, with their skip reasons."""
    lines = ["| family | test | inductor | foresight | foresight did |", "|---|---|---|---|---|"]
    for family, by_backend in results.items():
        tests = list(dict.fromkeys([*by_backend.get("inductor", {}), *by_backend.get("foresight", {})]))
        skipped, reasons = 0, {}
        for test in tests:
            ind = by_backend.get("inductor", {}).get(test)
            ours = by_backend.get("foresight", {}).get(test)
            if all(r is not None and r["outcome"] == "skipped" for r in (ind, ours)):
                skipped += 1
                reasons[_escape(ind.get("detail", ""))[:80]] = None
                continue
            name = "::".join(test.split("::")[-2:])  # Class::test (a file may hold two configs)
            lines.append(f"| {family} | `{name}` | {_cell(ind)} | {_cell(ours)} | {_what_we_did(ours)} |")
        if skipped:
            lines.append(f"| {family} | {skipped} other test(s) matching `compile` | skipped | skipped "
                         f"| skip reasons: {'; '.join(reasons)} |")
    return "\n".join(lines)


def summary(results: dict[str, dict[str, dict]]) -> str:
    both = ind_only = ours_only = 0
    for by_backend in results.values():
        for test, ind in by_backend.get("inductor", {}).items():
            ours = by_backend.get("foresight", {}).get(test, {"outcome": "not run"})
            i, o = ind["outcome"] == "passed", ours["outcome"] == "passed"
            both += i and o
            ind_only += i and not o
            ours_only += o and not i
    return (f"Tests passing under both backends: {both}; under Inductor only: {ind_only}; "
            f"under foresight only: {ours_only}.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tests_dir", type=pathlib.Path, help="diffusers' tests/ directory")
    parser.add_argument("--families", nargs="*", help="e.g. krea2 flux wan (default: all)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("docs/diffusers_compile_tests.md"))
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--with-aot", action="store_true")
    parser.add_argument("--keep-accelerator-skip", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="families run at once")
    parser.add_argument("--results-json", type=pathlib.Path,
                        help="raw results, rewritten after every family; families already in "
                             "it are not run again (resume a stopped run)")
    parser.add_argument("--table-only", action="store_true",
                        help="write the table from --results-json, run nothing")
    args = parser.parse_args(argv)
    if args.table_only and args.results_json is None:
        parser.error("--table-only needs --results-json")
    signal.signal(signal.SIGTERM, _stop_children)
    signal.signal(signal.SIGINT, _stop_children)
    tests_dir = args.tests_dir.resolve()
    known = families(tests_dir)
    chosen = args.families or list(known)
    unknown = [f for f in chosen if f not in known]
    if unknown:
        parser.error(f"no compile tests for {unknown}; known: {', '.join(known)}")
    results: dict[str, dict[str, dict]] = {}
    if args.results_json is not None and args.results_json.exists():
        results = {f: r for f, r in json.loads(args.results_json.read_text()).items()
                   if f in chosen}
    start = time.perf_counter()
    lock = threading.Lock()
    if args.table_only:
        write(args, {f: results[f] for f in chosen if f in results}, chosen, known, None)
        return 0

    def one(family: str) -> None:
        print(family, flush=True)
        done = {b: run_family(known[family], tests_dir, b, args)
                for b in ("inductor", "foresight")}
        with lock:  # the table is rewritten after every family: a stopped run keeps its rows
            results[family] = done
            ordered = {f: results[f] for f in chosen if f in results}
            write(args, ordered, chosen, known, time.perf_counter() - start)
            if args.results_json is not None:
                args.results_json.write_text(json.dumps(ordered, indent=1))

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(one, [f for f in chosen if f not in results]))
    print(summary(results))
    return 0


def write(args, results, chosen, known, seconds) -> None:
    import diffusers
    import torch

    command = "python scripts/run_diffusers_compile_tests.py <diffusers>/tests"
    if args.families:
        command += " --families " + " ".join(args.families)
    if args.with_aot:
        command += " --with-aot"
    skipped = [f for f in known if f not in results]
    text = f"""# diffusers' own torch.compile tests: Inductor vs foresight

Generated by `scripts/run_diffusers_compile_tests.py` on {datetime.date.today().isoformat()}:

    {command}

torch {torch.__version__}, diffusers {diffusers.__version__} (installed; the tests come from
the directory given), Python {platform.python_version()}, {platform.machine()} CPU
({'accelerator skip kept' if args.keep_accelerator_skip else "diffusers' accelerator-only skip lifted: run on the CPU"}).
Each family runs in its own pytest process per backend, `-k "{'compile' if args.with_aot else 'compile and not aot'}"`;
"foresight" swaps `torch.compile`'s default backend for `"foresight"` (default options).
Families run: {len(results)} of {len(known)} with compile tests{f" ({seconds / 60:.0f} min)" if seconds else ""}.
{('Not run: ' + ', '.join(skipped) + '.') if skipped else ''}

{summary(results)}

{table(results)}
"""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
