"""Run methods on one workload: interleaved, median of several generations, one process."""
from __future__ import annotations

import datetime
import re
import statistics
import time
from typing import Any

import torch
from tqdm import tqdm

from foresight_compile import models
from foresight_compile.bench import memory
from foresight_compile.bench.methods import MethodSpec
from foresight_compile.bench.metrics import ceiling, psnr, ssim
from foresight_compile.bench.report import BenchReport, MethodResult
from foresight_compile.bench.workloads import check_dtype, in_dtype, load_workload
from foresight_compile.errors import ForesightValueError

_ATTENTION_KERNEL = re.compile(r"_scaled_dot_product_\w*attention")


def _attention_calls(call, dit, steps: int, seed: int) -> int:
    """Attention kernels executed in one generation: the work a method really did."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        models.denoise(call, dit, steps, seed=seed)
    return sum(e.count for e in prof.key_averages() if _ATTENTION_KERNEL.search(e.key))


def _pipeline_path(res: MethodResult, p, dit, steps: int, seed: int, reference) -> None:
    """Ours timed in a bare loop (``reset`` between generations, the step count learned from
    the one before); a pipeline wraps each generation in ``generation(num_steps)``. Both
    must serve the same steps: one more generation each way, masks compared. (The timed
    rounds' masks are gone: every method here compiles the same module, and ``reset`` of
    one clears the ``stats`` of all.)"""
    import foresight_compile

    p.new_generation()
    models.denoise(p.call, dit, steps, seed=seed)
    loop = foresight_compile.stats(p.stats_target).mask
    p.new_generation()
    with foresight_compile.generation(num_steps=steps):
        out = models.denoise(p.call, dit, steps, seed=seed)
    res.pipeline_psnr = psnr(out, reference)
    res.pipeline_same_mask = foresight_compile.stats(p.stats_target).mask == loop


def _block_share(dit, seed: int, repeats: int = 5) -> float:
    """f = 1 - t(every block served from cache) / t(every block computed), with our executor."""
    import copy

    fn = torch.compile(copy.deepcopy(dit.model), backend="foresight",
                       options={"policy": "static", "warmup": 1, "recompute_every": 10**9})
    x = torch.randn(dit.latent_shape, generator=torch.Generator().manual_seed(seed))
    computed, reused = [], []
    with torch.no_grad():
        for t in (999.0, 998.0, 997.0):  # compile; steps 0-1 compute; from step 2 all reused
            fn(**dit.inputs(x, torch.tensor([t])))
        for r in range(repeats):
            import foresight_compile
            foresight_compile.reset(fn)
            start = time.perf_counter()
            fn(**dit.inputs(x, torch.tensor([900.0])))  # step 0: every block computes
            computed.append(time.perf_counter() - start)
            fn(**dit.inputs(x, torch.tensor([899.0])))  # step 1: computes (refresh)
            start = time.perf_counter()
            fn(**dit.inputs(x, torch.tensor([898.0])))  # step 2: every block reused
            reused.append(time.perf_counter() - start)
    return max(0.0, 1.0 - statistics.median(reused) / statistics.median(computed))


def run_bench(workload: Any, methods: list[MethodSpec], steps: int = 30, repeats: int = 5,
              seed: int = 0, progress: bool = True, name: str | None = None,
              dtype: str = "float32") -> BenchReport:
    """Run every method on ``workload``; see ``report.BenchReport`` for what is measured.
    ``dtype`` casts the model in place (``workloads.in_dtype``: as ``from_pretrained``
    loads it, the latent loop as the pipelines run it); the reference is then the eager run
    in that dtype, so PSNR shows what caching costs on top of the precision."""
    import diffusers

    check_dtype(dtype)  # before the workload loads
    kinds = {s.kind for s in methods}
    if "cache-dit" in kinds and kinds - {"cache-dit", "inductor", "eager"}:
        # cache-dit patches diffusers classes process-wide: every model compiled or run after
        # it in this process would run through its hooks, so it gets a process of its own.
        raise ForesightValueError(
            "cache-dit changes diffusers classes for the whole process; benchmark it in a "
            "separate run with only the baselines, e.g. --methods inductor,cache-dit,"
            "cache-dit+compile")
    if any(s.family == "peer" and s.compiled for s in methods) and any(
            s.family == "ours" for s in methods):
        # Measured: diffusers' hooks under torch.compile guard on per-instance forwards,
        # recompile per block until Dynamo's recompile limit, and leave the block code
        # marked so that our models compiled in the same process split into per-block
        # graphs. Mixed in one process, the figures of both would be wrong.
        raise ForesightValueError(
            "peers with +compile change Dynamo's state for the whole process; benchmark them "
            "in a separate run with only the baselines, e.g. --methods inductor,fbc+compile")
    dit = load_workload(workload) if isinstance(workload, str) else workload
    dit = in_dtype(dit, dtype)
    label = name or (workload if isinstance(workload, str) else type(workload).__name__)
    # Every method is a new backend on the same code object: give Dynamo room for all.
    limit = max(64, 4 * len(methods))
    # Cold compiles, as on a user's first run (and as examples/wan_denoise.py measures): with
    # Inductor's on-disk caches the baseline's compile seconds depend on what ran on this
    # machine before (measured on wan-ci: 21.1 s cold, 2.8 s warm; ours 4.3-4.7 s either
    # way), which made compile_ratio gates flip between runs.
    with torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=limit * 8), \
            torch._inductor.config.patch(fx_graph_cache=False, autotune_local_cache=False):
        return _run(dit, label, methods, steps, repeats, seed, progress, diffusers.__version__, dtype)


def _run(dit, label, methods, steps, repeats, seed, progress, diffusers_version, dtype) -> BenchReport:
    reference = models.denoise(dit.model, dit, steps, seed=seed)
    uncached_attention = _attention_calls(dit.model, dit, steps, seed)
    results = {s.name: MethodResult(s.name, s.kind, s.family, dict(s.options), s.compiled)
               for s in methods}
    prepared, outputs, times = {}, {}, {s.name: [] for s in methods}
    calibrate = lambda call: models.denoise(call, dit, steps, seed=seed)  # noqa: E731
    # Measured, and ours compiled, before any peer+compile: diffusers' hooks under
    # torch.compile make Dynamo skip the block forwards it traced, which would split the
    # graphs of any model compiled after them (a benchmark artefact, not a user's setup).
    block_share = _block_share(dit, seed)
    # The memory census (memory.py): what each method keeps alive between steps beyond the
    # uncached model, counted the same way for all, from just before it is prepared.
    uncached_held = memory.baseline(dit, steps, seed)
    order = sorted(methods, key=lambda s: (s.family == "peer", s.compiled))
    for spec in tqdm(order, desc="prepare + compile + census", disable=not progress):
        census = memory.Census()
        try:
            p = spec.prepare(dit.model, steps, calibrate)
            start = time.perf_counter()
            models.denoise(p.call, dit, 1, seed=seed)
            results[spec.name].compile_seconds = time.perf_counter() - start
            held = census.generation(p.call, dit, steps, seed, p.new_generation)
            results[spec.name].cache_bytes = memory.cache_bytes(held, uncached_held)
            prepared[spec.name] = p
        except Exception as e:  # a peer that cannot run on this model is reported, not fatal
            results[spec.name].error = f"{type(e).__name__}: {e}"[:300]
        finally:
            census.close()
    for r in tqdm(range(repeats + 1), desc="interleaved generations", disable=not progress):
        for name, p in prepared.items():
            p.new_generation()
            start = time.perf_counter()
            outputs[name] = models.denoise(p.call, dit, steps, seed=seed)
            if r:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    base = results.get("inductor")
    base_seconds = statistics.median(times["inductor"]) if "inductor" in prepared else None
    for name, p in tqdm(prepared.items(), desc="fidelity + work", disable=not progress):
        res = results[name]
        res.seconds = statistics.median(times[name])
        if base_seconds:
            res.speedup = base_seconds / res.seconds
        if base is not None and base.compile_seconds:
            res.compile_ratio = res.compile_seconds / base.compile_seconds
        res.psnr = psnr(outputs[name], reference)
        res.ssim = ssim(outputs[name], reference)
        if p.stats_target is not None:
            _pipeline_path(res, p, dit, steps, seed, reference)
        p.new_generation()
        done = _attention_calls(p.call, dit, steps, seed)
        res.skipped = max(0.0, 1.0 - done / uncached_attention) if uncached_attention else None
        if res.skipped is not None:
            res.ceiling = ceiling(block_share, res.skipped)
    return BenchReport(
        workload=label, steps=steps, repeats=repeats, seed=seed,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__, diffusers=diffusers_version, threads=torch.get_num_threads(),
        block_share=block_share, methods=list(results.values()), dtype=dtype)
