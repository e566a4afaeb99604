"""Generate clips with a shipped tiny video DiT and check them against their prompts.

    python examples/sample_tiny_dit.py                       # 8 prompts -> examples/output/tiny_dit_samples.png
    python examples/sample_tiny_dit.py --prompt "red circle moving right fast" --gif out.gif
    python examples/sample_tiny_dit.py --evaluate 32         # the acceptance figures (32 prompts, 30 steps)
    python examples/sample_tiny_dit.py --backend foresight --options '{"policy": "foresight"}'
    python examples/sample_tiny_dit.py --model cogvideox --evaluate 32   # the second model
    python examples/sample_tiny_dit.py --model hunyuan --evaluate 32     # the third

Prompts read "COLOUR SHAPE moving DIRECTION SPEED" (colours: red green blue yellow magenta
cyan; shapes: circle square triangle; directions: right left up down; speeds: slow fast),
two objects joined by " and ". Sample i starts from the noise of seed i (+ --seed).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from foresight_compile.models import tiny_cogvideox as tc  # noqa: E402
from foresight_compile.models import tiny_hunyuan as th  # noqa: E402
from foresight_compile.models import tiny_video as tv  # noqa: E402

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["wan", "cogvideox", "hunyuan"], default="wan",
                    help="the tiny video DiT (Wan, predicts x0), the tiny CogVideoX or the tiny "
                         "HunyuanVideo (both velocity)")
    ap.add_argument("--prompt", action="append", help="repeatable; default: evaluation prompts")
    ap.add_argument("--evaluate", type=int, default=8, metavar="N",
                    help="without --prompt: sample the first N evaluation prompts and check them")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    ap.add_argument("--backend", choices=["eager", "inductor", "foresight"], default="eager")
    ap.add_argument("--options", default="{}", help="JSON options for backend=foresight")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="PNG strip (default: examples/output/"
                    "tiny_dit_samples.png, or tiny_<model>_samples.png for --model cogvideox/hunyuan)")
    ap.add_argument("--rows", type=int, default=8, help="clips shown in the PNG strip")
    ap.add_argument("--gif", type=Path, help="also write an animated GIF of the shown clips")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    load, sample = {"wan": (tv.load_tiny_video_dit, tv.sample),
                    "cogvideox": (tc.load_tiny_cogvideox, tc.sample),
                    "hunyuan": (th.load_tiny_hunyuan, th.sample)}[args.model]
    transformer, encoder, scheduler_config = load()
    model = transformer
    if args.backend != "eager":
        options = json.loads(args.options) if args.backend == "foresight" else None
        model = torch.compile(transformer, backend=args.backend, options=options)
    prompts = (tv.as_prompts(args.prompt) if args.prompt else tv.evaluation_prompts(args.evaluate))
    seeds = [args.seed + i for i in range(len(prompts))]

    start = time.perf_counter()
    frames = sample(model, encoder, scheduler_config, prompts, steps=args.steps, seeds=seeds,
                       guidance_scale=args.guidance)
    print(f"{len(prompts)} clips, {args.steps} steps, backend {args.backend}: "
          f"{time.perf_counter() - start:.1f} s")
    report = tv.evaluate_samples(frames, prompts)
    for i, s in enumerate(report.samples):
        v = "-" if s.velocity is None else f"({s.velocity[0]:+.2f}, {s.velocity[1]:+.2f}) px/frame"
        print(f"  {i:2d} {s.prompt:<38} found {str(s.colour):<8} {v:<24} colour "
              f"{'ok' if s.colour_ok else 'WRONG'}, direction {'ok' if s.direction_ok else 'WRONG'}, "
              f"speed {'ok' if s.speed_ok else 'WRONG'}")
    print(report)
    if args.backend == "foresight":
        import foresight_compile
        print(foresight_compile.stats(model))

    if args.out is None:
        args.out = ROOT / "output" / ("tiny_dit_samples.png" if args.model == "wan"
                                      else f"tiny_{args.model}_samples.png")
    shown = slice(0, args.rows)
    tv.save_strip(frames[shown], args.out, [p.text for p in prompts[shown]])
    print(f"frame strip: {args.out}")
    if args.gif:
        tv.save_gif(frames[shown], args.gif)
        print(f"gif: {args.gif}")


if __name__ == "__main__":
    main()
