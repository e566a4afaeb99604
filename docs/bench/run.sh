#!/usr/bin/env bash
# Reproduces BENCHMARKS.md (run from anywhere; writes next to this script).
# Ours and the eager peers share a process; peers under torch.compile and cache-dit each
# get their own (they change Dynamo or diffusers state process-wide: see BENCHMARKS.md).
# Every table has its own in-process inductor baseline.
set -euo pipefail
cd "$(dirname "$0")"
FC=${FC:-foresight-compile}
# The trained tiny video DiT: the fidelity figures that mean something.
$FC bench --workload tiny-video --steps 50 --repeats 5 \
  --methods "inductor,eager,none,static,static(reuse=residual),static(warmup=4,recompute_every=4),foresight(threshold=0.5),foresight(threshold=2),foresight(threshold=8),foresight(threshold=0.5,reuse=residual),profiling,fbc(threshold=0.05),fbc(threshold=0.2),pab,taylorseer,magcache" \
  --json tiny-video.json --markdown tiny-video.md --plot tiny-video-pareto.png
$FC bench --workload wan-deep --steps 50 --repeats 5 \
  --methods "inductor,eager,none,static,static(reuse=residual),foresight(threshold=0.5),foresight(threshold=4),foresight(threshold=16),foresight(threshold=64),foresight(threshold=16,reuse=residual),fbc(threshold=0.05),fbc(threshold=0.2),fbc(threshold=0.5),pab,taylorseer,magcache,magcache(threshold=0.2)" \
  --json wan-deep.json --markdown wan-deep.md --plot wan-deep-pareto.png
$FC bench --workload wan-deep --steps 50 --repeats 5 \
  --methods "inductor,fbc+compile(threshold=0.2),pab+compile,taylorseer+compile,magcache+compile" \
  --json wan-deep-compiled-peers.json --markdown wan-deep-compiled-peers.md
$FC bench --workload wan-deep --steps 50 --repeats 5 \
  --methods "inductor,static(warmup=4,recompute_every=4),static(warmup=4,recompute_every=8),static(warmup=2,recompute_every=16),static(warmup=4,recompute_every=8,reuse=residual),foresight(warmup=4,recompute_every=4,threshold=64),foresight(warmup=4,recompute_every=8,threshold=64),fbc(threshold=0.2),taylorseer,magcache" \
  --json wan-deep-aggressive.json --markdown wan-deep-aggressive.md --plot wan-deep-aggressive-pareto.png
$FC bench --workload cogvideox --steps 50 --repeats 5 \
  --methods "inductor,eager,none,static,static(reuse=residual),foresight(threshold=0.5),foresight(threshold=16),foresight(threshold=16,reuse=residual),static(warmup=4,recompute_every=8),fbc(threshold=0.05),fbc(threshold=0.2),pab,taylorseer,magcache" \
  --json cogvideox.json --markdown cogvideox.md --plot cogvideox-pareto.png
$FC bench --workload cogvideox --steps 50 --repeats 5 \
  --methods "inductor,fbc+compile(threshold=0.2),pab+compile,taylorseer+compile,magcache+compile" \
  --json cogvideox-compiled-peers.json --markdown cogvideox-compiled-peers.md
# cache-dit (pip install 'foresight-compile[peers]'): its own process.
$FC bench --workload wan --steps 12 --repeats 3 \
  --methods "inductor,cache-dit,cache-dit(threshold=0.3),cache-dit+compile(threshold=0.3)" \
  --json wan-cache-dit.json --markdown wan-cache-dit.md
