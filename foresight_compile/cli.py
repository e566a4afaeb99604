"""The `foresight-compile` command: `bench` and `check`."""
from __future__ import annotations

import argparse
import json
import sys

from foresight_compile.errors import ForesightValueError


def _sweep(items: list[str]) -> dict[str, list]:
    from foresight_compile.bench.methods import parse_value

    sweep = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ForesightValueError(f"--sweep {item!r}: write KEY=V1,V2,... (e.g. threshold=0.1,0.5)")
        sweep[key.strip()] = [parse_value(v) for v in values.split(",")]
    return sweep


def _bench(args) -> int:
    from foresight_compile.bench import BenchReport, run_bench
    from foresight_compile.bench.methods import parse_methods, sweep_peers
    from foresight_compile.bench.workloads import check_dtype

    check_dtype(args.dtype)  # before anything is read or loaded
    methods = parse_methods(args.methods, _sweep(args.sweep))
    if args.sweep_peers:
        methods = sweep_peers(methods)
    if args.ours_from:  # read first: a wrong file fails before the long run
        with open(args.ours_from) as f:
            ours = BenchReport.from_dict(json.load(f))
        ours.require_run_of(args.workload, args.steps, args.dtype)
    report = run_bench(args.workload, methods, steps=args.steps, repeats=args.repeats, seed=args.seed,
                       dtype=args.dtype)
    if args.ours_from:
        report = report.with_ours_from(ours)
    print(report.table())
    if args.json:
        with open(args.json, "w") as f:
            f.write(report.to_json())
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown())
    if args.plot:
        report.pareto_plot(args.plot)
    return 0


def _check(args) -> int:
    from foresight_compile.bench import BenchReport, check_report, load_thresholds, run_bench
    from foresight_compile.bench.methods import parse_methods

    thresholds = load_thresholds(args.thresholds)
    if args.results:
        try:
            with open(args.results) as f:
                report = BenchReport.from_dict(json.load(f))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ForesightValueError(f"results file {args.results!r} cannot be read: {e}") from None
        want = thresholds.get("bench", {}).get("dtype")
        if want is not None and want != report.dtype:
            raise ForesightValueError(f"results file {args.results!r} ran in {report.dtype}; the "
                                      f"thresholds' [bench] table says dtype = {want!r}")
    else:
        bench = thresholds.get("bench")
        if not bench or "workload" not in bench or "methods" not in bench:
            raise ForesightValueError(
                "no --results given and the thresholds file has no [bench] table with "
                "'workload' and 'methods'")
        methods = parse_methods(bench["methods"], bench.get("sweep"))
        report = run_bench(bench["workload"], methods, steps=bench.get("steps", 30),
                           repeats=bench.get("repeats", 5), seed=bench.get("seed", 0),
                           dtype=bench.get("dtype", "float32"))
        print(report.table())
        if args.json:
            with open(args.json, "w") as f:
                f.write(report.to_json())
    result = check_report(report, thresholds)
    print(result)
    return 0 if result.ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="foresight-compile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="speed and fidelity of methods side by side")
    b.add_argument("--workload", default="wan", help="built-in name or module:factory")
    b.add_argument("--methods", default="inductor,eager,none,budget,static,foresight,fbc,pab,"
                   "taylorseer,magcache",
                   help="comma-separated; options as NAME(key=value,...); peers as NAME+compile; "
                   "cache-dit patches diffusers process-wide: run it alone with the baselines")
    b.add_argument("--steps", type=int, default=30)
    b.add_argument("--repeats", type=int, default=5)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2")
    b.add_argument("--sweep-peers", action="store_true",
                   help="run every peer given without options at each of its own settings "
                   "(TaylorSeer interval x order, MagCache/FBC/cache-dit thresholds) and print "
                   "both Pareto fronts and, per peer point, our fastest point at its PSNR")
    b.add_argument("--ours-from", metavar="JSON",
                   help="a `bench --json` report of the same workload, steps and dtype: its points of "
                   "ours join the verdict and the plot (for peers that need their own process: "
                   "NAME+compile, cache-dit)")
    b.add_argument("--dtype", default="float32",
                   help="float32, bfloat16 or float16: the model cast as from_pretrained(torch_dtype=...) loads "
                   "it, its call inputs and the latent between steps in that dtype (as diffusers' "
                   "pipelines run it); PSNR is then against the eager run in that dtype")
    b.add_argument("--json")
    b.add_argument("--markdown")
    b.add_argument("--plot", help="Pareto plot PNG: speedup vs PSNR")
    c = sub.add_parser("check", help="gate a benchmark against thresholds (exit 0 ok, 1 fail, 2 bad input)")
    c.add_argument("--thresholds", required=True, help="TOML file")
    c.add_argument("--results", help="a `bench --json` file; without it the [bench] table runs")
    c.add_argument("--json", help="write the report `check` ran")
    args = parser.parse_args(argv)
    try:
        return _bench(args) if args.command == "bench" else _check(args)
    except ValueError as e:  # bad input: name it, exit 2
        print(f"foresight-compile {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
