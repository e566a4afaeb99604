"""GPU acceptance check: the CUDA-graph lowering and the TensorRT engine against the torch path.

On a machine with an NVIDIA GPU (and TensorRT >= 10 for the engine check) this runs one
denoising loop per method on a small diffusers DiT with random weights and compares each
with ``torch.compile(backend="foresight", options={"lowering": "inductor"})``:

* ``lowering="cudagraphs"``: same reuse decisions, final latent within --tolerance;
* TensorRT: ``export_onnx`` -> ``export_tensorrt`` -> ``TrtEngine``: same decisions,
  final latent within --trt-tolerance (TensorRT may use TF32 for float32 layers);

then times them (median of --repeats generations, interleaved) against the uncached model.

    python examples/gpu_check.py                       # Wan, 4 blocks, 20 steps
    python examples/gpu_check.py --model cogvideox --trt-precision fp16 --trt-tolerance 5e-2

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

    seconds: list = dataclasses.field(default_factory=list)


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

    cpu_dit = models.FACTORIES[args.model](layers=args.layers)
    dit = dataclasses.replace(cpu_dit, model=copy.deepcopy(cpu_dit.model).to(device),
                              text=cpu_dit.text.to(device))
    options = {"policy": "foresight", "warmup": 3, "recompute_every": 2,
               "threshold": args.threshold, "strict": True}
    print(f"{args.model}: {args.layers} blocks, {args.steps} steps, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}")

    def compiled(name: str, **extra) -> Result:
        # No torch._dynamo.reset() between methods: each keeps its compiled code for timing.
        fn = torch.compile(copy.deepcopy(dit.model), backend="foresight",
                           options={**options, **extra})
        start = time.perf_counter()
        final = denoise(fn, dit, args.steps, device)
        print(f"  {name}: first generation (with compile) {time.perf_counter() - start:.1f} s")
        mask = foresight_compile.stats(fn).mask

        def run():
            foresight_compile.reset(fn)
            return denoise(fn, dit, args.steps, device)
        return Result(name, final, mask, run)

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

    print("checks against the reference:")
    compare(results[2], args.tolerance)

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
        trt_result = Result(f"TensorRT ({args.trt_precision})", final, engine.stats().mask, run_trt)
        results.append(trt_result)
        compare(trt_result, args.trt_tolerance)

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
