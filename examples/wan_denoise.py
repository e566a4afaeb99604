"""50-step denoising with backend="foresight" vs plain Inductor, on a Wan transformer.

The policies: ``budget`` (the default: every block computes or every block is served a
forecast, while a measured error budget allows), ``static`` and ``foresight`` (the
Foresight paper's settings, serving copies), ``none`` (reuse off: the overhead).

--model tiny-video (default): the trained tiny video DiT shipped with the package (8 Wan
blocks, pixel space, 4 prompted clips), so PSNR/SSIM are those of the generated frames and
the prompt-following check (colour / direction, tiny_video.evaluate_samples) shows whether
reuse changed what was drawn. --model wan-deep: a 24-block Wan with random weights.

Everything is measured in this one process, runs interleaved, median of --repeats
generations after a warm-up: end-to-end speedup vs torch.compile(backend="inductor"),
reused fraction, relative error, PSNR and SSIM of the final output vs the uncached run,
cache bytes, and the seconds of the first call (trace + compile) of both.

    python examples/wan_denoise.py                          # trained tiny video DiT, 50 steps
    python examples/wan_denoise.py --model wan-deep         # 24 random-weight blocks
    python examples/wan_denoise.py --steps 20 --repeats 3   # a quick look
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from tqdm import tqdm

import foresight_compile
from foresight_compile import models
from foresight_compile.bench.metrics import psnr, ssim


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny-video", "wan-deep"], default="tiny-video")
    ap.add_argument("--layers", type=int, default=24, help="blocks of --model wan-deep")
    ap.add_argument("--prompts", type=int, default=4, help="clips of --model tiny-video")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--policies", default="none,budget,static,foresight",
                    help="comma-separated policies, with options as in `foresight-compile bench`: "
                    "none,budget(tolerance=0.2),static,foresight(threshold=16,reuse=residual),"
                    "profiling; budget (the default) takes its own defaults")
    ap.add_argument("--threshold", type=float, default=0.5, help="foresight's lambda")
    ap.add_argument("--warmup", type=int, default=8, help="static/foresight/profiling warmup")
    ap.add_argument("--recompute-every", type=int, default=2, help="static/foresight")
    ap.add_argument("--reuse-maps", metavar="DIR",
                    help="write the reuse map PNG (and JSON) of each policy into DIR")
    ap.add_argument("--warm-inductor-cache", action="store_true",
                    help="keep Inductor's on-disk caches (default: cold compiles, the honest figure)")
    args = ap.parse_args()
    if not args.warm_inductor_cache:
        torch._inductor.config.fx_graph_cache = False
        torch._inductor.config.autotune_local_cache = False
    torch.set_num_threads(max(1, torch.get_num_threads()))

    if args.model == "tiny-video":
        dit = models.tiny_video_workload(prompts=args.prompts)
    else:
        dit = models.wan(layers=args.layers, deep=True)
    params = sum(p.numel() for p in dit.model.parameters())
    print(f"{args.model}: {len(dit.model.blocks)} Wan blocks, {params / 1e6:.2f} M parameters, "
          f"{'trained' if dit.prompts else 'random weights'}, output {dit.latent_shape}, "
          f"{args.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads")

    from foresight_compile.bench.methods import parse_methods

    methods = {"inductor": torch.compile(copy.deepcopy(dit.model), backend="inductor")}
    defaults = {"warmup": args.warmup, "recompute_every": args.recompute_every,
                "threshold": args.threshold}
    for spec in parse_methods(args.policies):
        paper = spec.kind in ("static", "foresight", "profiling")  # the papers' knobs
        options = {**{k: v for k, v in defaults.items() if paper}, **dict(spec.options)}
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
    def prompt_check(frames) -> str:
        if not dit.prompts:
            return ""
        from foresight_compile.models.tiny_video import evaluate_samples
        report = evaluate_samples(frames, dit.prompts)
        return f"{report.colour_accuracy:>8.0%}{report.direction_accuracy:>8.0%}"

    check_head = f"{'colour':>8}{'direct.':>8}" if dit.prompts else ""
    print(f"\n{'method':<32}{'s/gen':>7}{'speedup':>9}{'reused':>8}{'rel.err':>10}{'PSNR dB':>9}"
          f"{'SSIM':>7}{check_head}{'cache MiB':>10}{'1st call s':>11}{'compile s':>10}")
    for name in methods:
        line = f"{name:<32}{median[name]:>7.2f}{median['inductor'] / median[name]:>8.2f}x"
        if name == "inductor":
            print(f"{line}{'-':>8}{'-':>10}{'-':>9}{'-':>7}{prompt_check(finals[name])}{'-':>10}"
                  f"{first_call[name]:>11.1f}{'-':>10}")
            continue
        s = foresight_compile.stats(methods[name])
        err = ((finals[name] - ref).norm() / ref.norm()).item()
        print(f"{line}{s.reused_fraction:>8.1%}{err:>10.2e}{psnr(finals[name], ref):>9.1f}"
              f"{ssim(finals[name], ref):>7.3f}{prompt_check(finals[name])}"
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
    print("\nspeedup: median time of inductor / median time of the method, same process, interleaved;")
    print("PSNR/SSIM: final output vs the inductor (uncached) one, peak = the reference's range.")
    print("`foresight-compile bench --workload tiny-video` adds the peers and the speedup ceiling.")


if __name__ == "__main__":
    main()
