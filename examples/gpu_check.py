"""GPU acceptance check: the CUDA-graph lowering and the TensorRT engine against the torch path.

On a machine with an NVIDIA GPU (and TensorRT >= 10 for the engine check) this runs one
denoising loop per method on a small diffusers DiT with random weights and compares each
with ``torch.compile(backend="foresight", options={"lowering": "inductor"})``:

* ``lowering="cudagraphs"``: same reuse decisions, final latent within --tolerance;
* TensorRT: ``export_onnx`` -> ``export_tensorrt`` -> ``TrtEngine``: same decisions,
  final latent within --trt-tolerance (TensorRT may use TF32 for float32 layers);

and checks that each holds the cache bytes ``foresight_compile.plan_cache`` planned on the CPU
model (``stats().cache_bytes``; the TensorRT engine at fp32); then times them (median of --repeats generations, interleaved) against the uncached model.

    python examples/gpu_check.py                       # Wan, 4 blocks, 20 steps
    python examples/gpu_check.py --model cogvideox --trt-precision fp16 --trt-tolerance 5e-2
    python examples/gpu_check.py --matrix              # TensorRT on every exportable family

``--matrix`` runs the export matrix of ``tests/test_export_matrix.py`` through TensorRT: for
each family of ``foresight_compile.models.families``, export (default policy), build, run
``TrtEngine`` with reuse off (equal to the torch output) and with the default policy (the
torch path's decisions), and prints one line per family.

Exit status: 0 every check ran and passed; 1 a check failed; 2 a check could not run here
(no CUDA, or no TensorRT without --skip-tensorrt), with a message saying what is missing.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import pathlib
import statistics
import sys
import tempfile
import time

import torch

import foresight_compile
from foresight_compile import models

CANNOT_RUN = 2


def denoise(model, dit: models.SmallDiT, steps: int, device: torch.device) -> torch.Tensor:
    """``models.denoise`` with the latent, text and timesteps on ``device``."""
    import diffusers
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    x = torch.randn(dit.latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = model(**dit.inputs(x, t.to(device).expand(x.shape[0])))
            x = scheduler.step(dit.prediction(out), t, x).prev_sample
    torch.cuda.synchronize(device)
    return x


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@dataclasses.dataclass
class Result:
    name: str
    final: torch.Tensor
    mask: list
    run: object  # callable running one generation
    cache_bytes: int = 0  # stats().cache_bytes after the first generation

    seconds: list = dataclasses.field(default_factory=list)


def policy_options(args) -> dict:
    if args.policy == "foresight":  # large lambda: random weights really reuse blocks
        return {"policy": "foresight", "warmup": 3, "recompute_every": 2,
                "threshold": args.threshold, "strict": True}
    return {"policy": args.policy, "tolerance": 1.0, "strict": True}


class OnDevice:
    """A ``families.Family`` whose model and call arguments live on ``device``."""

    def __init__(self, family, device: torch.device) -> None:
        self.family, self.device = family, device
        self.model = copy.deepcopy(family.model).to(device)
        self.latent_shape, self.scheduler_config = family.latent_shape, family.scheduler_config

    def inputs(self, latents, timestep) -> dict:
        kwargs = self.family.inputs(latents.cpu(), timestep.cpu())
        return torch.utils._pytree.tree_map(
            lambda v: v.to(self.device) if isinstance(v, torch.Tensor) else v, kwargs)

    def prediction(self, out):
        return self.family.prediction(out)


def trt_matrix(args, device: torch.device) -> int:
    """TensorRT over every family: reuse off equals torch, the default policy decides alike."""
    from foresight_compile.models.families import FAMILIES
    from foresight_compile.runtime.engines.tensorrt import TrtEngine

    failures = []
    options = policy_options(args)
    settings = {k: v for k, v in options.items() if k not in ("policy", "strict")}
    for name, factory in FAMILIES.items():
        family = factory()
        on_device = OnDevice(family, device)
        capture = torch._dynamo.config.patch(capture_dynamic_output_shape_ops=name == "mochi")
        try:
            with tempfile.TemporaryDirectory() as tmp, capture:
                onnx_path = pathlib.Path(tmp) / f"{name}.onnx"
                foresight_compile.export_onnx(family.model, family.example, onnx_path,
                                              policy=options["policy"], **settings)
                engine_path = foresight_compile.export_tensorrt(
                    onnx_path, pathlib.Path(tmp) / f"{name}.plan",
                    precision=None if args.trt_precision == "fp32" else args.trt_precision)
                line = []
                for policy in ("none", options["policy"]):
                    torch._dynamo.reset()
                    fn = torch.compile(on_device.model, backend="foresight",
                                       options={**options, "policy": policy})
                    expected = denoise(fn, on_device, args.steps, device)
                    engine = TrtEngine(engine_path, policy=policy)
                    got = denoise(engine, on_device, args.steps, device)
                    same = engine.stats().mask == foresight_compile.stats(fn).mask
                    err = rel_err(got, expected)
                    ok = same and err <= args.trt_tolerance
                    line.append(f"{policy}: decisions {'same' if same else 'DIFFER'}, rel {err:.1e}")
                    if not ok:
                        failures.append(f"{name} ({policy})")
            print(f"  {name:<18} " + "; ".join(line))
        except Exception as e:  # one family's failure is reported, the matrix goes on
            failures.append(f"{name} ({type(e).__name__})")
            print(f"  {name:<18} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    if failures:
        print(f"gpu_check --matrix: FAILED: {', '.join(failures)}")
        return 1
    print("gpu_check --matrix: every family passed")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(models.FACTORIES), default="wan")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threshold", type=float, default=50.0,
                    help="Foresight lambda; large, so random weights really reuse blocks")
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--trt-precision", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--trt-tolerance", type=float, default=1e-2)
    ap.add_argument("--skip-tensorrt", action="store_true")
    ap.add_argument("--policy", default="budget", help="the reuse policy checked")
    ap.add_argument("--matrix", action="store_true",
                    help="TensorRT over every family of foresight_compile.models.families")
    args = ap.parse_args()

    if not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here (torch.cuda.is_available() is False): this "
              "check needs an NVIDIA GPU, a driver and a CUDA build of torch. Nothing was run.")
        return CANNOT_RUN
    device = torch.device("cuda")
    trt_missing = None
    if not args.skip_tensorrt:
        try:
            from foresight_compile.runtime.engines.tensorrt import import_tensorrt
            import_tensorrt()
        except ImportError as e:
            trt_missing = str(e)

    if args.matrix:
        if trt_missing is not None:
            print(f"gpu_check: --matrix needs TensorRT: {trt_missing}")
            return CANNOT_RUN
        return trt_matrix(args, device)
    cpu_dit = models.FACTORIES[args.model](layers=args.layers)
    dit = dataclasses.replace(cpu_dit, model=copy.deepcopy(cpu_dit.model).to(device),
                              text=cpu_dit.text.to(device))
    options = policy_options(args)
    print(f"{args.model}: {args.layers} blocks, {args.steps} steps, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")

    def compiled(name: str, **extra) -> Result:
        # No torch._dynamo.reset() between methods: each keeps its compiled code for timing.
        fn = torch.compile(copy.deepcopy(dit.model), backend="foresight",
                           options={**options, **extra})
        start = time.perf_counter()
        final = denoise(fn, dit, args.steps, device)
        print(f"  {name}: first generation (with compile) {time.perf_counter() - start:.1f} s")
        stats = foresight_compile.stats(fn)

        def run():
            foresight_compile.reset(fn)
            return denoise(fn, dit, args.steps, device)
        return Result(name, final, stats.mask, run, stats.cache_bytes)

    results = [compiled("torch inductor, policy none", policy="none"),
               compiled("torch inductor (reference)"),
               compiled("cudagraphs", lowering="cudagraphs")]
    reference = results[1]
    failures = []

    def compare(result: Result, tolerance: float) -> None:
        same = result.mask == reference.mask
        err = rel_err(result.final, reference.final)
        ok = same and err <= tolerance
        print(f"  {result.name}: decisions {'identical' if same else 'DIFFER'}, relative error "
              f"{err:.2e} (tolerance {tolerance:g}) -> {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(result.name)

    # The bytes the planner promises (shape-only, on the CPU model) are what every lowering and
    # engine then holds on the device: one branch (one call per step), no pool yet.
    plan = foresight_compile.plan_cache(
        cpu_dit.model, **cpu_dit.inputs(torch.randn(cpu_dit.latent_shape), torch.tensor([999.0])),
        options={k: v for k, v in options.items() if k != "strict"})

    def compare_bytes(result: Result, banks: int = 1) -> None:
        # an engine keeps two banks of the cache (reads one, writes the other), one probe
        planned = banks * (plan.bytes_per_branch - plan.probe_bytes) + plan.probe_bytes
        ok = result.cache_bytes == planned
        print(f"  {result.name}: cache {result.cache_bytes} bytes, planned {planned} -> "
              f"{'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(f"{result.name} (cache bytes)")

    print("checks against the reference:")
    compare(results[2], args.tolerance)
    for result in results[1:]:
        compare_bytes(result)

    if trt_missing is None and not args.skip_tensorrt:
        from foresight_compile.runtime.engines.tensorrt import TrtEngine
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = pathlib.Path(tmp) / f"{args.model}.onnx"
            start = time.perf_counter()
            foresight_compile.export_onnx(
                cpu_dit.model, cpu_dit.inputs(torch.randn(cpu_dit.latent_shape), torch.tensor([999.0])),
                onnx_path, **{k: v for k, v in options.items() if k != "strict"})
            engine_path = foresight_compile.export_tensorrt(
                onnx_path, pathlib.Path(tmp) / f"{args.model}.plan",
                precision=None if args.trt_precision == "fp32" else args.trt_precision)
            print(f"  TensorRT engine built in {time.perf_counter() - start:.1f} s (export + build)")
            engine = TrtEngine(engine_path)
        final = denoise(engine, dit, args.steps, device)

        def run_trt():
            engine.reset()
            return denoise(engine, dit, args.steps, device)
        engine_stats = engine.stats()
        trt_result = Result(f"TensorRT ({args.trt_precision})", final, engine_stats.mask, run_trt,
                            engine_stats.cache_bytes)
        results.append(trt_result)
        compare(trt_result, args.trt_tolerance)
        if args.trt_precision == "fp32":  # fp16/bf16 engines hold their caches narrower
            compare_bytes(trt_result, banks=2)

    print(f"timing, median of {args.repeats} interleaved generations:")
    for _ in range(args.repeats):
        for result in results:
            start = time.perf_counter()
            result.run()
            result.seconds.append(time.perf_counter() - start)
    base = statistics.median(results[0].seconds)
    for result in results:
        median = statistics.median(result.seconds)
        print(f"  {result.name:<32}{median:8.3f} s/gen {base / median:6.2f}x vs uncached")

    if failures:
        print(f"gpu_check: FAILED: {', '.join(failures)}")
        return 1
    if trt_missing is not None:
        print(f"gpu_check: the CUDA-graph check passed; the TensorRT check did not run: "
              f"{trt_missing} (or pass --skip-tensorrt)")
        return CANNOT_RUN
    print("gpu_check: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
