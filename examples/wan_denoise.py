"""50-step denoising of a deeper Wan (24 blocks) with backend="foresight" vs plain Inductor.

Everything is measured in this one process, runs interleaved, median of --repeats
generations after a warm-up: end-to-end speedup vs torch.compile(backend="inductor"),
reused fraction, relative error and PSNR of the final latent vs the uncached run, cache
bytes, and the seconds of the first call (trace + compile) of both.

    python examples/wan_denoise.py                      # 24 blocks, 50 steps, 5 repeats
    python examples/wan_denoise.py --layers 4 --steps 20 --repeats 2    # a quick look
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time

import torch
from tqdm import tqdm

import foresight_compile
from foresight_compile import models


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (x - ref).double().square().mean().item()
    peak = (ref.max() - ref.min()).item()
    return math.inf if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policies", default="none,static,foresight",
                    help="comma-separated policies, with options as in `foresight-compile bench`: "
                    "none,static,foresight(threshold=16,reuse=residual),profiling")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--recompute-every", type=int, default=2)
    ap.add_argument("--reuse-maps", metavar="DIR",
                    help="write the reuse map PNG (and JSON) of each policy into DIR")
    ap.add_argument("--warm-inductor-cache", action="store_true",
                    help="keep Inductor's on-disk caches (default: cold compiles, the honest figure)")
    args = ap.parse_args()
    if not args.warm_inductor_cache:
        torch._inductor.config.fx_graph_cache = False
        torch._inductor.config.autotune_local_cache = False
    torch.set_num_threads(max(1, torch.get_num_threads()))

    dit = models.wan(layers=args.layers, deep=True)
    params = sum(p.numel() for p in dit.model.parameters())
    print(f"Wan: {args.layers} blocks, {params / 1e6:.2f} M parameters, latent {dit.latent_shape}, "
          f"{args.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads")

    from foresight_compile.bench.methods import parse_methods

    methods = {"inductor": torch.compile(copy.deepcopy(dit.model), backend="inductor")}
    defaults = {"warmup": args.warmup, "recompute_every": args.recompute_every,
                "threshold": args.threshold}
    for spec in parse_methods(args.policies):
        options = {**{k: v for k, v in defaults.items() if spec.kind != "none"}, **dict(spec.options)}
        if spec.kind == "profiling":
            options.pop("threshold", None)
            options.pop("recompute_every", None)
            options["profile"] = foresight_compile.profile_blocks(
                dit.model, lambda m: models.denoise(m, dit, args.steps))
            print(f"  profile: foreground blocks {sum(options['profile'].foreground)} of "
                  f"{len(options['profile'].foreground)}")
        methods[spec.name] = torch.compile(copy.deepcopy(dit.model), backend="foresight",
                                           options={"policy": spec.kind, **options})

    first_call, finals = {}, {}
    for name, fn in methods.items():
        start = time.perf_counter()
        models.denoise(fn, dit, 1)  # the loop's own call: trace + compile happen here
        first_call[name] = time.perf_counter() - start
        print(f"  first call of {name}: {first_call[name]:.1f} s")

    times = {name: [] for name in methods}
    for _ in tqdm(range(args.repeats + 1), desc="interleaved generations"):
        for name, fn in methods.items():
            if name != "inductor":
                foresight_compile.reset(fn, clear_stats=True)
            start = time.perf_counter()
            finals[name] = models.denoise(fn, dit, args.steps, seed=0)
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t[1:]) for name, t in times.items()}  # first: warm-up

    ref = finals["inductor"]
    print(f"\n{'method':<40}{'s/gen':>8}{'speedup':>9}{'reused':>8}{'rel.err':>10}{'PSNR dB':>9}"
          f"{'cache MiB':>10}{'1st call s':>11}{'compile s':>10}")
    for name in methods:
        line = f"{name:<40}{median[name]:>8.2f}{median['inductor'] / median[name]:>8.2f}x"
        if name == "inductor":
            print(f"{line}{'-':>8}{'-':>10}{'-':>9}{'-':>10}{first_call[name]:>11.1f}{'-':>10}")
            continue
        s = foresight_compile.stats(methods[name])
        err = ((finals[name] - ref).norm() / ref.norm()).item()
        print(f"{line}{s.reused_fraction:>8.1%}{err:>10.2e}{psnr(finals[name], ref):>9.1f}"
              f"{s.cache_bytes / 2**20:>10.2f}{first_call[name]:>11.1f}{s.compile_seconds:>10.1f}")
    if args.reuse_maps:
        import os
        os.makedirs(args.reuse_maps, exist_ok=True)
        for name in methods:
            if name != "inductor":
                stem = os.path.join(args.reuse_maps, "reuse_map_" + name.replace("(", "_")
                                    .replace(")", "").replace(",", "_").replace("=", ""))
                s = foresight_compile.stats(methods[name])
                s.plot(stem + ".png")
                with open(stem + ".json", "w") as f:
                    f.write(s.to_json())
                print(f"  reuse map: {stem}.png")
    print("\nspeedup: median time of inductor / median time of the method, same process, interleaved.")
    print("random weights: block outputs drift more each step than a trained model's, so Foresight's")
    print("adaptive thresholds rarely allow reuse here; `foresight-compile bench` adds the ceiling.")


if __name__ == "__main__":
    main()
