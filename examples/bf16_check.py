"""The default policy in bfloat16 on the three trained models: speed and fidelity.

Each model is cast to bfloat16 (as users run it); PSNR is against the eager bfloat16 run
without reuse (so ``inductor`` shows what compile rounding alone costs). Speed: median time
of ``torch.compile(backend="inductor")`` over the method's, same process, interleaved, after
a warm-up round; the first call (compile) is not timed.

    python examples/bf16_check.py                       # 50 steps, 3 repeats, 1 thread
    python examples/bf16_check.py --steps 30 --models tiny-video
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import foresight_compile  # noqa: E402
from foresight_compile import models  # noqa: E402
from foresight_compile.bench.metrics import psnr  # noqa: E402


def in_bfloat16(dit):
    """The workload with its model and text states in bfloat16; the latent stays float32 in
    the loop (as diffusers pipelines keep their scheduler's math), cast at the call."""
    dit.model.to(torch.bfloat16)
    inputs, prediction = dit.inputs, dit.prediction

    def cast_inputs(x, t):
        return {k: (v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point()
                    and k != "timestep" else v) for k, v in inputs(x, t).items()}
    dit.inputs = cast_inputs
    dit.prediction = lambda out: prediction(out).float()
    return dit


def measure(name: str, steps: int, repeats: int) -> str:
    dit = in_bfloat16(models.FACTORIES[name](prompts=4))
    reference = models.denoise(dit.model, dit, steps)
    torch._dynamo.reset()
    calls = {"inductor": torch.compile(dit.model, backend="inductor"),
             "budget": torch.compile(dit.model, backend="foresight")}
    times = {k: [] for k in calls}
    outputs = {}
    for round_ in range(repeats + 1):
        for k, fn in calls.items():
            start = time.perf_counter()
            with foresight_compile.generation(num_steps=steps):
                outputs[k] = models.denoise(fn, dit, steps)
            if round_:
                times[k].append(time.perf_counter() - start)
    base = statistics.median(times["inductor"])
    served = foresight_compile.stats(calls["budget"]).reused_fraction
    torch._dynamo.reset()
    return (f"{name}, {steps} steps, bfloat16: inductor {base:.2f} s/gen at "
            f"{psnr(outputs['inductor'], reference):.1f} dB (compile rounding); budget "
            f"{base / statistics.median(times['budget']):.2f}x, {served:.0%} served, "
            f"{psnr(outputs['budget'], reference):.1f} dB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-video", "tiny-video-cogvideox", "tiny-video-hunyuan"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models:
        print(measure(name, args.steps, args.repeats), flush=True)


if __name__ == "__main__":
    main()
