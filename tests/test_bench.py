"""bench and check: numbers come from real runs; gates catch disabled or stale reuse."""
import dataclasses
import json

import pytest
import torch

from foresight_compile.bench import BenchReport, check_report, run_bench
from foresight_compile.bench.check import ThresholdsError, load_thresholds
from foresight_compile.bench.methods import MethodSpec, parse_methods
from foresight_compile.cli import main
from foresight_compile.runtime.policies import register_policy
from foresight_compile.runtime.policies.basic import StaticReuse

STEPS = 12


def _ours_census(cache_bytes, blocks, graphs=1, branches=1):
    """The census's bounds for one of ours: ``stats().cache_bytes`` plus its fixed bookkeeping,
    which does not scale with the activations: the stats ring of each compiled graph
    (``HISTORY_ROWS`` rows of a float64 timestep and float32 change and threshold per block)
    and, per branch, < 256 bytes per block (the policy's row of 16 float32, the forecast
    weights' row of 16 float32 on the device and on the host, the decision masks) + 256."""
    from foresight_compile.runtime.history import HISTORY_ROWS
    low = cache_bytes + graphs * HISTORY_ROWS * (8 + 8 * blocks)
    return low, low + branches * (256 * blocks + 256)


@register_policy("stale_TESTING_ONLY")
class StaleCacheTESTING_ONLY(StaticReuse):
    """Serves step 0's cache for the rest of the generation: what a stale-cache bug does."""

    def computes_all(self, step, warmup, total=None, run=0):
        return step == 0


@pytest.fixture(scope="module")
def report():
    torch._dynamo.reset()
    methods = [MethodSpec("eager"), MethodSpec("none", (("lowering", "eager"),)),
               MethodSpec("static", (("lowering", "eager"), ("warmup", 2), ("recompute_every", 3))),
               MethodSpec("budget", (("lowering", "eager"),)),
               MethodSpec("fbc", (("threshold", 0.5),))]
    rep = run_bench("wan", methods, steps=STEPS, repeats=1, progress=False)
    yield rep
    torch._dynamo.reset()


pytestmark = pytest.mark.shared_dynamo


def test_method_that_skips_nothing_reports_zero_skipped_and_exact_output(report):
    none = report.method("none(lowering=eager)")
    assert none.skipped == 0.0 and none.psnr == float("inf")
    low, high = _ours_census(0, blocks=2)  # no cache: the bookkeeping only
    assert low <= none.cache_bytes <= high
    eager = report.method("eager")
    assert eager.skipped == 0.0 and eager.cache_bytes == 0  # the uncached model keeps nothing more


def test_static_reuse_is_measured_from_the_work_done(report):
    static = report.method("static(lowering=eager,warmup=2,recompute_every=3)")
    # steps 0,1 warm up; then compute every 3rd step: 2, 5, 8, 11 -> 6 of 12 steps reused
    assert static.skipped == pytest.approx(6 / 12)
    assert 10 < static.psnr < float("inf") and 0 < static.ssim <= 1
    low, high = _ours_census(2 * 512 * 24 * 4, blocks=2)  # 2 blocks x 512 tokens x width 24
    assert low <= static.cache_bytes <= high
    assert static.ceiling >= 1.0


def test_peer_runs_through_its_public_api(report):
    fbc = report.method("fbc(threshold=0.5)")
    assert fbc.error is None and fbc.seconds > 0 and fbc.skipped is not None
    # The hook really skipped work (a hook that did nothing would report 0 skipped and the
    # uncached output, PSNR infinite).
    assert fbc.skipped > 0 and fbc.psnr < float("inf")
    assert fbc.cache_bytes >= 512 * 24 * 4  # measured by the census, as ours: >= 1 activation
    gate = {"method": fbc.name, "max_cache_bytes": fbc.cache_bytes - 1}
    (failed,) = check_report(report, {"gate": [gate]}).failed
    assert f"cache_bytes {fbc.cache_bytes} > max_cache_bytes" in failed
    assert check_report(report, {"gate": [{**gate, "max_cache_bytes": fbc.cache_bytes}]}).ok


def test_census_counts_new_storages_once_and_nothing_alive_before():
    from foresight_compile.bench import memory

    old = torch.zeros(1000)
    with memory.Census() as census:
        old.add_(1)  # written, not new
        new = torch.zeros(250)
        views = [new.view(25, 10), new[5:]]  # the same storage
        assert census.new_bytes() == 250 * 4
        del new, views
        assert census.new_bytes() == 0
    assert memory.census_steps(30) == (2, 15, 28) and memory.census_steps(1) == (0,)
    assert memory.cache_bytes([10, 30, 20], [5, 5, 6]) == 25


def test_memory_census_of_ours_agrees_with_stats_and_sees_a_peers_cache():
    """One census for everyone: for ours it finds ``stats().cache_bytes`` (cache buffers and
    latent probe) plus the fixed bookkeeping, whatever the policy; for a peer it finds what
    its hooks keep (FirstBlockCache: the first block's output and residual, the tail's
    residual)."""
    import foresight_compile
    from foresight_compile import models
    from foresight_compile.bench import memory

    torch._dynamo.reset()
    dit, steps = models.wan(layers=3), 6
    activation = 512 * 24 * 4  # (1, 512 tokens, width 24) float32
    uncached = memory.baseline(dit, steps)
    assert len(uncached) == len(memory.census_steps(steps)) == 3
    measured = {}
    for spec in (MethodSpec("static", (("lowering", "eager"), ("warmup", 1), ("recompute_every", 2))),
                 MethodSpec("budget", (("lowering", "eager"),)), MethodSpec("fbc", (("threshold", 0.5),))):
        with memory.Census() as census:
            p = spec.prepare(dit.model, steps)
            models.denoise(p.call, dit, 1)  # the compile, as the runner does
            held = census.generation(p.call, dit, steps, 0, p.new_generation)
        measured[spec.kind] = memory.cache_bytes(held, uncached)
        if p.stats_target is not None:
            reported = foresight_compile.stats(p.stats_target).cache_bytes
            low, high = _ours_census(reported, blocks=3)
            assert low <= measured[spec.kind] <= high, (spec.name, measured[spec.kind], reported)
    torch._dynamo.reset()
    assert measured["static"] >= 3 * activation  # every block's output
    assert activation <= measured["budget"] < measured["static"]  # the region exit only
    assert activation <= measured["fbc"] <= 4 * activation


def test_report_json_schema_is_stable(report, tmp_path):
    data = json.loads(report.to_json())
    assert data["schema_version"] == 1
    assert set(data) == {"schema_version", "workload", "steps", "repeats", "seed", "date", "torch",
                         "diffusers", "threads", "block_share", "dtype", "methods", "fronts", "verdict"}
    assert data["dtype"] == "float32"
    assert set(data["fronts"]) == {"ours", "peer"}  # derived: written, ignored when read
    assert set(data["methods"][0]) == {"name", "kind", "family", "options", "compiled", "seconds",
                                       "speedup", "compile_seconds", "compile_ratio", "skipped",
                                       "cache_bytes", "psnr", "ssim", "ceiling", "pipeline_psnr",
                                       "pipeline_same_mask", "error"}
    again = BenchReport.from_dict(data)
    assert [m.name for m in again.methods] == [m.name for m in report.methods]
    fbc = report.method("fbc(threshold=0.5)")  # cache MiB of a peer in both tables
    assert f"{fbc.cache_bytes / 2**20:.2f} |" in report.markdown()
    (row,) = [line for line in report.table().splitlines() if line.startswith(fbc.name)]
    assert row.split()[-2:] == [f"{fbc.cache_bytes / 2**20:.2f}", "-"]  # no pipeline path: a peer
    path = tmp_path / "pareto.png"
    report.pareto_plot(str(path))
    assert path.stat().st_size > 5000


def test_ours_are_also_run_on_the_pipeline_path_and_serve_the_same_steps(report):
    """The timed bare loop (step count learned from the generation before) and a pipeline's
    ``generation(num_steps)`` serve the same steps, so the table's speed holds for both."""
    for name in ("budget(lowering=eager)", "static(lowering=eager,warmup=2,recompute_every=3)"):
        m = report.method(name)
        assert m.skipped > 0.2 and m.pipeline_same_mask is True, name
        assert m.pipeline_psnr == pytest.approx(m.psnr, abs=1e-3), name
        (row,) = [line for line in report.table().splitlines() if line.startswith(name)]
        assert row.split()[-1] == f"{m.pipeline_psnr:.1f}="
    for name in ("eager", "fbc(threshold=0.5)"):
        assert report.method(name).pipeline_psnr is None
    budget = report.method("budget(lowering=eager)")
    other = dataclasses.replace(report, methods=[dataclasses.replace(budget, pipeline_same_mask=False)])
    assert other.table().splitlines()[2].split()[-1] == f"{budget.pipeline_psnr:.1f}!="


def test_stale_cache_drops_psnr_below_the_gate_and_disabled_reuse_fails_skipped():
    torch._dynamo.reset()
    gates = {"gate": [{"method": "static(lowering=eager)", "min_psnr": 45.0, "min_skipped": 0.1},
                      {"method": "stale_TESTING_ONLY(lowering=eager)", "min_psnr": 45.0}]}
    good = run_bench("wan", [MethodSpec("static", (("lowering", "eager"),)),
                             MethodSpec("stale_TESTING_ONLY", (("lowering", "eager"),))],
                     steps=STEPS, repeats=1, progress=False)
    result = check_report(good, gates)
    assert [f for f in result.failed if "stale" in f] and not [f for f in result.failed if "static(" in f]
    # reuse disabled: the static policy never reuses
    torch._dynamo.reset()
    original = StaticReuse.computes_all
    StaticReuse.computes_all = lambda self, step, warmup, total=None, run=0: True
    try:
        disabled = run_bench("wan", [MethodSpec("static", (("lowering", "eager"),))],
                             steps=STEPS, repeats=1, progress=False)
    finally:
        StaticReuse.computes_all = original
    failed = check_report(disabled, {"gate": gates["gate"][:1]}).failed
    assert any("skipped 0 < min_skipped" in f for f in failed)


def _report_file(tmp_path, speedup=1.3, psnr=45.0):
    data = {"schema_version": 1, "workload": "wan-ci", "steps": 30, "repeats": 5, "seed": 0,
            "date": "2026-11-22", "torch": "2.13.0", "diffusers": "0.42.1", "threads": 2,
            "block_share": 0.9, "methods": [
                {"name": "static", "kind": "static", "family": "ours", "options": {}, "compiled": False,
                 "seconds": 1.0, "speedup": speedup, "compile_seconds": 5.0, "compile_ratio": 0.2,
                 "skipped": 0.4, "cache_bytes": 1000, "psnr": psnr, "ssim": 0.99, "ceiling": 1.5,
                 "error": None}]}
    path = tmp_path / f"r{speedup}.json"
    path.write_text(json.dumps(data))
    return path


def _thresholds(tmp_path, text):
    path = tmp_path / "t.toml"
    path.write_text(text)
    return str(path)


def test_check_exit_codes_pass_fail_and_bad_input(tmp_path, capsys):
    gates = '[[gate]]\nmethod = "static"\nmin_speedup = 1.2\nmin_psnr = 40\n'
    assert main(["check", "--thresholds", _thresholds(tmp_path, gates),
                 "--results", str(_report_file(tmp_path))]) == 0
    assert main(["check", "--thresholds", _thresholds(tmp_path, gates),
                 "--results", str(_report_file(tmp_path, speedup=1.05))]) == 1
    out = capsys.readouterr().out
    assert "speedup 1.05 < min_speedup 1.2 (by 0.15)" in out
    assert main(["check", "--thresholds", str(tmp_path / "missing.toml"),
                 "--results", str(_report_file(tmp_path))]) == 2
    assert main(["check", "--thresholds", _thresholds(tmp_path, '[[gate]]\nmethod = "static"\nmin_sped = 1\n'),
                 "--results", str(_report_file(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "unknown key 'min_sped'" in err


def test_check_against_a_reference_report(tmp_path):
    ref = _report_file(tmp_path, speedup=1.5)
    text = f'[reference]\nresults = "{ref.name}"\nmax_speedup_drop = 0.1\nmax_psnr_drop = 1.0\n'
    thresholds = load_thresholds(_thresholds(tmp_path, text))
    now = BenchReport.from_dict(json.loads(_report_file(tmp_path, speedup=1.2, psnr=44.5).read_text()))
    result = check_report(now, thresholds)
    assert any("drop 20.0%" in f for f in result.failed)
    assert any("PSNR" in p for p in result.passed)


def test_gate_for_a_missing_method_is_bad_input(tmp_path):
    rep = BenchReport.from_dict(json.loads(_report_file(tmp_path).read_text()))
    with pytest.raises(ThresholdsError, match="'foresight'"):
        check_report(rep, {"gate": [{"method": "foresight", "min_psnr": 1}]})


def test_method_parsing_and_sweep():
    specs = parse_methods("inductor,foresight(threshold=0.5),fbc+compile", {"threshold": [0.1, 1.0]})
    assert [s.name for s in specs] == ["inductor", "foresight(threshold=0.1)", "foresight(threshold=1.0)",
                                       "fbc+compile(threshold=0.1)", "fbc+compile(threshold=1.0)"]
    with pytest.raises(ValueError, match="unknown method 'turbo'"):
        parse_methods("turbo")
    with pytest.raises(ValueError, match="no selected method takes 'threshold'"):
        parse_methods("static", {"threshold": [1.0]})


def test_cache_dit_must_run_in_its_own_process():
    with pytest.raises(ValueError, match="separate run"):
        run_bench("wan", parse_methods("inductor,static,cache-dit"), steps=2, repeats=1, progress=False)


def test_compiled_peers_must_not_share_a_process_with_ours():
    with pytest.raises(ValueError, match="separate run"):
        run_bench("wan", parse_methods("inductor,static,fbc+compile"), steps=2, repeats=1, progress=False)


def test_a_users_module_factory_workload_runs_and_bad_specs_are_named():
    from foresight_compile.bench.workloads import load_workload
    report = run_bench("toy:toy_workload",
                       [MethodSpec("static", (("lowering", "eager"), ("warmup", 2), ("recompute_every", 2)))],
                       steps=10, repeats=1, progress=False)
    # steps 0-1 warm up; compute on 2, 4, 6, 8: steps 3, 5, 7, 9 reuse every block
    assert report.workload == "toy:toy_workload"
    low, high = _ours_census(3 * 4 * 8 * 4, blocks=3)
    assert report.methods[0].error is None and low <= report.methods[0].cache_bytes <= high
    assert 0 < report.methods[0].ssim <= 1
    with pytest.raises(ValueError, match="cannot load 'nope'"):
        load_workload("toy:nope")
    with pytest.raises(ValueError, match="unknown workload 'wan-huge'"):
        load_workload("wan-huge")


def _result(name, family, speedup, psnr, error=None):
    from foresight_compile.bench.report import MethodResult
    return MethodResult(name, name.split("(")[0], family, {}, False, speedup=speedup, psnr=psnr,
                        error=error)


def test_fronts_and_verdict_name_our_fastest_point_at_each_peers_psnr():
    methods = [_result("inductor", "baseline", 1.0, 150.0),
               _result("a", "ours", 3.0, 38.0), _result("b", "ours", 2.0, 50.0),
               _result("c", "ours", 1.5, 45.0),  # dominated by b
               _result("p1", "peer", 2.5, 37.0), _result("p2", "peer", 2.2, 49.0),
               _result("p3", "peer", 1.2, 60.0), _result("p4", "peer", 9.0, 10.0, error="boom")]
    report = BenchReport("w", 50, 5, 0, "d", "t", "d", 2, 0.9, methods)
    assert [m.name for m in report.front("ours")] == ["a", "b"]
    assert [m.name for m in report.front("peer")] == ["p1", "p2", "p3"]
    rows = {r.peer: r for r in report.verdict()}
    assert set(rows) == {"p1", "p2", "p3"}  # the failed peer point is not judged
    assert (rows["p1"].ours, rows["p1"].ratio) == ("a", pytest.approx(3.0 / 2.5))
    assert (rows["p2"].ours, rows["p2"].dominated) == ("b", False)  # 2.0x < 2.2x
    assert rows["p3"].ours is None and not rows["p3"].dominated
    data = report.to_dict()
    assert data["fronts"] == {"ours": ["a", "b"], "peer": ["p1", "p2", "p3"]}
    assert [v["ours"] for v in data["verdict"]] == ["a", "b", None]
    assert "1 of 3 peer points dominated" in report.table()
    assert BenchReport.from_dict(json.loads(report.to_json())).methods[1].name == "a"


def test_sweep_peers_expands_each_peer_over_its_own_knobs():
    from foresight_compile.bench.methods import PEER_SWEEPS, sweep_peers
    specs = sweep_peers(parse_methods("inductor,static,taylorseer,magcache,fbc(threshold=0.1)"))
    names = [s.name for s in specs]
    assert names[:2] == ["inductor", "static"] and "fbc(threshold=0.1)" in names
    taylor = [s for s in specs if s.kind == "taylorseer"]
    assert len(taylor) == len(PEER_SWEEPS["taylorseer"]) >= 3
    assert {dict(s.options)["max_order"] for s in taylor} == {1, 2}
    assert len([s for s in specs if s.kind == "magcache"]) >= 3


def test_a_peer_point_that_reuses_nothing_is_matched_by_our_exact_point():
    methods = [_result("none", "ours", 0.97, 147.0), _result("fbc(threshold=0.01)", "peer", 0.8,
                                                             float("inf"))]
    (row,) = BenchReport("w", 50, 5, 0, "d", "t", "d", 2, 0.9, methods).verdict()
    assert row.ours == "none" and row.dominated


def test_peers_of_their_own_process_are_judged_against_our_points_from_another_run(tmp_path):
    from foresight_compile.bench import BenchReport
    from foresight_compile.cli import main

    def report(methods, steps=50):
        return BenchReport("tiny-video", steps, 3, 0, "d", "t", "d", 1, 0.9, methods)

    ours = report([_result("inductor", "baseline", 1.0, 150.0), _result("a", "ours", 3.0, 40.0),
                   _result("b", "ours", 2.0, 50.0)])
    compiled = report([_result("inductor", "baseline", 1.0, 150.0),
                       _result("p+compile", "peer", 2.5, 45.0), _result("q+compile", "peer", 3.5, 39.0)])
    assert [r.ours for r in compiled.verdict()] == [None, None]  # alone: nothing to compare with
    joined = compiled.with_ours_from(ours)
    rows = {r.peer: r for r in joined.verdict()}
    assert rows["p+compile"].ours == "b [other run]" and not rows["p+compile"].dominated
    assert rows["q+compile"].ours == "a [other run]" and rows["q+compile"].ratio == pytest.approx(3.0 / 3.5)
    assert "b [other run]" in joined.table()
    with pytest.raises(ValueError, match="steps is 30"):
        compiled.with_ours_from(report(ours.methods, steps=30))
    with pytest.raises(ValueError, match="none of our points"):
        compiled.with_ours_from(compiled)
    # The CLI reads the file before the long run: a wrong one fails at once (exit 2).
    path = tmp_path / "ours.json"
    path.write_text(report(ours.methods, steps=30).to_json())
    assert main(["bench", "--workload", "tiny-video", "--steps", "50", "--methods", "inductor",
                 "--ours-from", str(path)]) == 2


def test_dtype_casts_the_model_and_measures_fidelity_against_the_eager_run_in_that_dtype(capsys, tmp_path):
    from foresight_compile import models

    torch._dynamo.reset()
    dit = models.wan(layers=2)
    dit.model.norm_out.float()  # kept modules are set to float32, whatever they held
    dit.model.condition_embedder.time_embedder.to(torch.float16)
    methods = [MethodSpec("eager"), MethodSpec("budget", (("lowering", "eager"),))]
    rep = run_bench(dit, methods, steps=8, repeats=1, progress=False, dtype="bfloat16")
    torch._dynamo.reset()
    assert rep.dtype == "bfloat16"
    # as from_pretrained(torch_dtype=torch.bfloat16) loads it: Wan's norms, time embedder and
    # modulation tables (its _keep_in_fp32_modules) float32, the rest bfloat16
    kept = {n: p.dtype for n, p in dit.model.named_parameters()}
    assert kept["scale_shift_table"] == torch.float32
    assert kept["condition_embedder.time_embedder.linear_1.weight"] == torch.float32
    assert kept["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert kept["proj_out.weight"] == torch.bfloat16
    # The workload object itself is not rewritten: its inputs stay float32, the wrapper's not.
    from foresight_compile.bench.workloads import in_dtype
    x = torch.randn(dit.latent_shape)
    assert dit.inputs(x, torch.tensor([999.0]))["hidden_states"].dtype == torch.float32
    cast = in_dtype(dit, "bfloat16")
    call = cast.inputs(x, torch.tensor([999.0]))
    assert call["hidden_states"].dtype == torch.bfloat16 and call["timestep"].dtype == torch.float32
    assert cast.latent_shape == dit.latent_shape
    half = in_dtype(models.wan(layers=2), "float16")  # float16: the same rule
    kept16 = {n: p.dtype for n, p in half.model.named_parameters()}
    assert kept16["blocks.0.ffn.net.0.proj.weight"] == torch.float16
    assert kept16["blocks.0.scale_shift_table"] == torch.float32
    assert half.inputs(x, torch.tensor([999.0]))["encoder_hidden_states"].dtype == torch.float16
    # The reference is the eager bf16 run: eager is exact against it (against the float32
    # run a bf16 model reads ~40 dB), and ours is measured, not exact.
    assert rep.method("eager").psnr >= 100.0
    ours = rep.method("budget(lowering=eager)")
    assert ours.skipped > 0 and 20.0 < ours.psnr < 100.0
    assert "bfloat16" in rep.table() and "bfloat16" in rep.markdown()
    assert BenchReport.from_dict(json.loads(rep.to_json())).dtype == "bfloat16"
    # A bf16 model run as float32 would be labelled float32: refused, naming what to pass.
    with pytest.raises(ValueError, match="holds bfloat16 weights; pass its dtype"):
        run_bench(dit, methods, steps=2, repeats=1, progress=False)
    # Joining points of ours from another run, or gating against a reference, needs the same
    # dtype; old reports read float32.
    as_float32 = dataclasses.replace(rep, dtype="float32")
    with pytest.raises(ValueError, match="dtype is 'float32'"):
        rep.with_ours_from(as_float32)
    old = json.loads(as_float32.to_json())
    del old["dtype"]
    assert BenchReport.from_dict(old).dtype == "float32"
    (tmp_path / "ref.json").write_text(as_float32.to_json())
    with pytest.raises(ThresholdsError, match="ran in float32, this report in bfloat16"):
        check_report(rep, {"reference": {"results": str(tmp_path / "ref.json"), "max_psnr_drop": 1.0}})
    # Bad input: named, with what is accepted, before anything else is read or loaded.
    with pytest.raises(ValueError, match="float64.*accepted: float32, bfloat16, float16"):
        run_bench("wan", methods, steps=2, repeats=1, progress=False, dtype="float64")
    assert main(["bench", "--workload", "wan", "--methods", "eager", "--dtype", "half",
                 "--ours-from", str(tmp_path / "ref.json")]) == 2
    assert "dtype 'half' is not supported" in capsys.readouterr().err


def test_every_ci_gate_file_is_valid_and_run_by_ci():
    from pathlib import Path

    from foresight_compile.bench.workloads import DTYPES, BUILTIN

    ci = Path(__file__).resolve().parents[1] / ".ci"
    files = sorted(ci.glob("thresholds*.toml"))
    assert len(files) >= 5
    for path in files:
        data = load_thresholds(str(path))  # unknown keys, bad gates: ThresholdsError
        bench = data["bench"]
        assert bench["workload"] in BUILTIN and bench.get("dtype", "float32") in DTYPES, path.name
        parse_methods(bench["methods"], bench.get("sweep"))
        gated = {g["method"] for g in data["gate"]}
        assert gated <= {s.name for s in parse_methods(bench["methods"])}, path.name
        assert f"--thresholds .ci/{path.name} " in (ci / "run").read_text(), path.name


def test_cache_dit_adapts_a_subclass_of_a_transformer_it_knows_by_its_base_class():
    pytest.importorskip("cache_dit")
    from foresight_compile.bench.methods import _cache_dit_target
    from foresight_compile import models
    from foresight_compile.models.tiny_video import TinyVideoTransformer, transformer_config

    wan = models.wan(layers=2).model
    assert _cache_dit_target(wan) is wan  # known by name: cache-dit resolves it itself
    tiny = TinyVideoTransformer(**{**transformer_config(), "num_layers": 2})
    adapter = _cache_dit_target(tiny)  # refused by name; its base, WanTransformer3DModel, is known
    assert adapter is not tiny and adapter.transformer is tiny and adapter.blocks is tiny.blocks
