#!/usr/bin/env bash
# Reproduces BENCHMARKS.md (run from anywhere; writes next to this script).
# The three trained models at 50 and 30 steps: ours at a sweep of the default policy's knobs
# (tolerance; max_run, the longest run of served steps), the older policies, and every eager
# peer at each of its own settings (--sweep-peers); one inductor baseline per table, runs
# interleaved. Peers under torch.compile and cache-dit get their own process (they change
# Dynamo or diffusers state process-wide) and are judged against our points of the first
# table (--ours-from). Measured with one thread per run on its own core:
#   OMP_NUM_THREADS=1 taskset -c 0 bash run.sh tiny-video tiny-video-hunyuan
#   OMP_NUM_THREADS=1 taskset -c 1 bash run.sh tiny-video-cogvideox cache-dit
# (no argument: every part, one after the other). Each table also runs our points once more
# under generation(num_steps) (the pipeline path): the "pipeline" column. The supplements
# ran the same way, one workload per core (2026-12-07): `conservative` and `bf16` (each
# loop's workloads split over the two cores) and `default30` (the 30-step default alone, 7
# repeats). Last regenerated 2026-12-07 12:37-14:19 for the budget policy's first-quarter
# rule (non-default points changed): core 0 `tiny-video conservative`, core 1
# `tiny-video-cogvideox tiny-video-hunyuan cache-dit`, then the tiny HunyuanVideo's
# `default30` on core 0; `bf16` and the tiny video DiT's `default30` measure only the default,
# whose decisions did not change, and were not rerun.
set -euo pipefail
cd "$(dirname "$0")"
FC=${FC:-foresight-compile}
REPEATS=${REPEATS:-3}
OURS="inductor,none,budget,budget(tolerance=0.02),budget(tolerance=0.05),budget(tolerance=0.1),budget(tolerance=0.2),budget(tolerance=1.0),budget(max_run=2),budget(max_run=3),budget(tolerance=1.0,max_run=5),budget(tolerance=1.0,max_run=8),budget(tolerance=10.0,max_run=16),budget(order=2,tolerance=0.05),budget(order=2,tolerance=0.2),foresight,static"
PEERS="taylorseer,magcache,fbc,pab"
CONSERVATIVE="inductor,none,budget(max_run=1),budget(tolerance=0.01),budget(tolerance=0.005),budget(order=2,tolerance=0.012),budget(warmup=0.6,max_run=1),budget(warmup=0.6,order=2,tolerance=0.05)"
trained() {  # $1: workload
  for steps in 50 30; do
    name=$1-$steps
    $FC bench --workload "$1" --steps "$steps" --repeats "$REPEATS" --sweep-peers \
      --methods "$OURS,$PEERS" \
      --json "$name.json" --markdown "$name.md" --plot "$name-pareto.png" | tee "$name.txt"
  done
  # The peers under torch.compile, swept, in their own process.
  $FC bench --workload "$1" --steps 50 --repeats "$REPEATS" --sweep-peers \
    --methods "inductor,taylorseer+compile,magcache+compile,fbc+compile" --ours-from "$1-50.json" \
    --json "$1-50-compiled-peers.json" --markdown "$1-50-compiled-peers.md" \
    --plot "$1-50-compiled-peers-pareto.png" | tee "$1-50-compiled-peers.txt"
}
cache_dit() {  # DBCache with its TaylorSeer calibrator, swept (pip install 'foresight-compile[peers]')
  for workload in tiny-video tiny-video-cogvideox tiny-video-hunyuan; do
    # its points of ours come from the main table, maybe still running in the other part
    while [ ! -s "$workload-50.json" ]; do sleep 30; done
    $FC bench --workload "$workload" --steps 50 --repeats "$REPEATS" --sweep-peers \
      --methods "inductor,cache-dit" --ours-from "$workload-50.json" \
      --json "$workload-50-cache-dit.json" --markdown "$workload-50-cache-dit.md" | tee "$workload-50-cache-dit.txt"
  done
}
conservative() {  # more faithful points of ours than the main table's, for the peer points
  # near exact (cache-dit and FirstBlockCache at their low thresholds): runs of one served
  # step, the tolerance near zero, and reuse only in the last 40% of the steps
  for workload in tiny-video-hunyuan tiny-video-cogvideox; do
    $FC bench --workload "$workload" --steps 50 --repeats "$REPEATS" \
      --methods "$CONSERVATIVE" \
      --json "$workload-50-conservative.json" --markdown "$workload-50-conservative.md" | tee "$workload-50-conservative.txt"
  done
}
bf16() {  # the default in bfloat16 (models cast; PSNR against the eager bfloat16 run)
  for workload in tiny-video tiny-video-cogvideox tiny-video-hunyuan; do
    $FC bench --workload "$workload" --steps 50 --repeats "$REPEATS" --dtype bfloat16 \
      --methods "inductor,none,budget" \
      --json "$workload-50-bf16.json" --markdown "$workload-50-bf16.md" | tee "$workload-50-bf16.txt"
  done
}
default30() {  # the default alone at 30 steps, more repeats (the two closest to 2.3x)
  for workload in tiny-video tiny-video-hunyuan; do
    $FC bench --workload "$workload" --steps 30 --repeats 7 --methods "inductor,none,budget" \
      --json "$workload-30-default-7-repeats.json" | tee "$workload-30-default-7-repeats.txt"
  done
}
for part in "${@}"; do
  case "$part" in
    default30) default30 ;;
    cache-dit) cache_dit ;;
    conservative) conservative ;;
    bf16) bf16 ;;
    *) trained "$part" ;;
  esac
done
if [ $# -eq 0 ]; then trained tiny-video; trained tiny-video-cogvideox; trained tiny-video-hunyuan; cache_dit; conservative; bf16; default30; fi
