"""Export a deeper Wan (24 blocks) to ONNX (one If per block) and time onnxruntime engines:
the reuse controller's "foresight" policy (one engine per --thresholds value) against
"none" (every block computed: the uncached engine), 50-step denoising, every engine on the
same exported model. On random weights the paper's lambda = 0.5 may reuse nothing; a large
lambda shows what reuse buys when it happens.

Measured in this one process, generations interleaved, the median of --repeats after one
warm-up generation each. Also prints the reused fraction, the error of the final latent
against the uncached engine, the cache bytes and the export / session-build seconds.

    python examples/onnx_engine.py                                    # 24 blocks, 50 steps
    python examples/onnx_engine.py --layers 4 --steps 20 --repeats 3  # a quick look
"""
from __future__ import annotations

import argparse
import math
import pathlib
import statistics
import tempfile
import time

import torch

import foresight_compile
from foresight_compile import models
from foresight_compile.runtime import OrtEngine


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (x - ref).double().square().mean().item()
    peak = (ref.max() - ref.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--thresholds", default="0.5,50",
                    help="comma-separated Foresight lambdas, one engine each")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--recompute-every", type=int, default=2)
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="directory for the .onnx, its weights and manifest (default: a temp dir)")
    args = ap.parse_args()
    if args.repeats < 3:
        ap.error("--repeats must be >= 3 (the figure is a median)")

    dit = models.wan(layers=args.layers, deep=True)
    params = sum(p.numel() for p in dit.model.parameters())
    print(f"Wan: {args.layers} blocks, {params / 1e6:.2f} M parameters, latent {dit.latent_shape}, "
          f"{args.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads")

    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or pathlib.Path(tmp)
        start = time.perf_counter()
        exported = foresight_compile.export_onnx(
            dit.model, dit.inputs(torch.randn(dit.latent_shape), torch.tensor([999.0])),
            out / "wan.onnx", policy="foresight", warmup=args.warmup,
            recompute_every=args.recompute_every)
        print(f"{exported}  ({time.perf_counter() - start:.1f} s)")
        engines = {"ort none": OrtEngine(exported.onnx_path, policy="none")}
        for threshold in (float(t) for t in args.thresholds.split(",")):
            engines[f"ort foresight λ={threshold:g}"] = OrtEngine(exported.onnx_path,
                                                                  threshold=threshold)
        for name, engine in engines.items():
            print(f"  {name}: session built in {engine.build_seconds:.1f} s")

        times: dict[str, list[float]] = {name: [] for name in engines}
        finals: dict[str, torch.Tensor] = {}
        for repeat in range(args.repeats + 1):  # the first generation of each is a warm-up
            for name, engine in engines.items():
                engine.reset(clear_stats=True)
                start = time.perf_counter()
                finals[name] = models.denoise(engine, dit, args.steps, seed=0)
                times[name].append(time.perf_counter() - start)
            print(f"  generation {repeat}: " + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()))
        median = {name: statistics.median(t[1:]) for name, t in times.items()}

    ref = finals["ort none"]
    print(f"\n{'engine':<24}{'s/gen':>8}{'speedup':>9}{'reused':>8}{'rel.err':>10}{'PSNR dB':>9}"
          f"{'cache MiB':>11}")
    for name, engine in engines.items():
        s = engine.stats()
        err = ((finals[name] - ref).norm() / ref.norm()).item()
        print(f"{name:<24}{median[name]:>8.2f}{median['ort none'] / median[name]:>8.2f}x"
              f"{s.reused_fraction:>8.1%}{err:>10.2e}{psnr(finals[name], ref):>9.1f}"
              f"{s.cache_bytes / 2**20:>11.2f}")
    print(f"(median of {args.repeats} interleaved generations after one warm-up each; policy "
          f"foresight: warmup {args.warmup}, recompute_every {args.recompute_every})")


if __name__ == "__main__":
    main()
