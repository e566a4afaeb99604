"""Block reuse under diffusers' context parallelism (Ulysses), one process per rank.

    torchrun --nproc_per_node 2 examples/context_parallel.py              # CPU: gloo
    torchrun --nproc_per_node 2 examples/context_parallel.py --steps 30 --layers 8 --size 32

Every rank builds the same Wan transformer (random weights, ``--layers`` blocks), enables
Ulysses parallelism over all ranks (``enable_parallelism``), prepares it for tracing
(``foresight_compile.prepare_parallel``) and compiles it three ways: ``backend="foresight"``
with the default policy (reuse), with ``policy="none"`` (the same engine, no reuse) and plain
Inductor. Each ``--steps``-step generation is timed between barriers, interleaved, median of
``--repeats`` after a warm-up generation. Rank 0 prints the seconds per generation, the
speedup of reuse over the same parallel run without it, the served fraction, the relative
error against no reuse, and the per-step cost of the metric reduction (the controller's
``reduce``, one all-reduce of the metric rows over the blocks' group, timed alone).

On a CPU-only machine diffusers picks a rank's device as ``rank % device_count()``, and
``device_count()`` is 0 there: this script makes it 1 (CUDA machines use NCCL and one GPU
per rank, untouched).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist

import foresight_compile
from foresight_compile import models
from foresight_compile.program import programs_of


def timed(fn) -> float:
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--size", type=int, default=32, help="latent height and width")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--reduce-calls", type=int, default=1000)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.accelerator.device_count = lambda: 1
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if cuda else torch.device("cpu")

    from diffusers import ContextParallelConfig

    dits = {}
    for name in ("reuse", "none", "inductor"):
        dit = models.wan(layers=args.layers, deep=True, frames=args.frames, size=args.size)
        dit.model.to(device)
        dit.text = dit.text.to(device)
        dit.model.set_attention_backend("native")
        dit.model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        foresight_compile.prepare_parallel(dit.model)
        dits[name] = dit
    options = {"num_steps": args.steps}
    fast = {"reuse": torch.compile(dits["reuse"].model, backend="foresight",
                                       options=options),
            "none": torch.compile(dits["none"].model, backend="foresight",
                                  options={**options, "policy": "none"}),
            "inductor": torch.compile(dits["inductor"].model, backend="inductor")}
    outputs, times = {}, {name: [] for name in fast}
    for name, model in fast.items():  # warm-up: trace, compile
        first = timed(lambda: models.denoise(model, dits[name], args.steps))
        if rank == 0:
            print(f"{name}: first generation (trace + compile) {first:.1f} s", flush=True)
    for _ in range(args.repeats):
        for name, model in fast.items():
            def run(name=name, model=model):
                outputs[name] = models.denoise(model, dits[name], args.steps)
            times[name].append(timed(run))
    stats = foresight_compile.stats(fast["reuse"])
    served = sum(map(sum, stats.mask[-args.steps:])) / (args.steps * len(stats.blocks))
    rel = float((outputs["reuse"] - outputs["none"]).norm() / outputs["none"].norm())

    # The reduction alone, as the controller calls it once per step (both ranks in step).
    (program,) = programs_of(dits["reuse"].model)
    (state,) = program.controller.live_states()
    reduce, per_call = program.controller.reduce, []
    for _ in range(args.reduce_calls):
        dist.barrier()
        start = time.perf_counter()
        reduce(state.policy_state)
        per_call.append(time.perf_counter() - start)
    if rank == 0:
        med = {name: statistics.median(t) for name, t in times.items()}
        shape = (1, 4, args.frames, args.size, args.size)
        print(f"Wan, {args.layers} blocks, latent {shape}, {world} ranks (Ulysses {world}), "
              f"{args.steps} steps, {torch.get_num_threads()} threads per rank, "
              f"torch {torch.__version__}, {'NCCL' if cuda else 'gloo'}")
        print(f"blocks found: {program.block_paths}")
        for name in fast:
            print(f"  {name:9s} {med[name]:.3f} s per generation (median of {args.repeats})")
        print(f"speedup of reuse vs the same {world}-rank run without reuse: "
              f"{med['none'] / med['reuse']:.2f}x (vs plain Inductor: "
              f"{med['inductor'] / med['reuse']:.2f}x); served {served:.0%} of block "
              f"evaluations; rel. err vs no reuse {rel:.2e}")
        per_call.sort()
        print(f"metric reduction per step: median {1e6 * statistics.median(per_call):.0f} us, "
              f"p10 {1e6 * per_call[len(per_call) // 10]:.0f} us, p90 "
              f"{1e6 * per_call[9 * len(per_call) // 10]:.0f} us ({args.reduce_calls} calls); "
              f"{100 * statistics.median(per_call) * args.steps / med['reuse']:.1f}% of a "
              f"reuse generation")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
