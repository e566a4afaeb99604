#!/usr/bin/env bash
# Reproduces BENCHMARKS.md. Three processes per workload: ours with the baselines and the
# eager peers; the peers under torch.compile; cache-dit (each changes Dynamo or diffusers
# state process-wide, see BENCHMARKS.md). Every table has its own in-process inductor baseline.
set -euo pipefail
cd "$(dirname "$0")"
FC=${FC:-foresight-compile}
STEPS=${STEPS:-50}
REPEATS=${REPEATS:-5}
for W in wan-deep cogvideox; do
  $FC bench --workload $W --steps $STEPS --repeats $REPEATS \
    --methods "inductor,eager,none,static,static(reuse=residual),foresight(threshold=0.5),foresight(threshold=4),foresight(threshold=16),foresight(threshold=64),foresight(threshold=16,reuse=residual),fbc(threshold=0.05),fbc(threshold=0.2),fbc(threshold=0.5),pab,taylorseer,magcache,magcache(threshold=0.2)" \
    --json $W.json --markdown $W.md --plot $W-pareto.png
  $FC bench --workload $W --steps $STEPS --repeats $REPEATS \
    --methods "inductor,fbc+compile(threshold=0.2),pab+compile,taylorseer+compile,magcache+compile" \
    --json $W-compiled-peers.json --markdown $W-compiled-peers.md
  $FC bench --workload $W --steps $STEPS --repeats $REPEATS \
    --methods "inductor,cache-dit,cache-dit(threshold=0.3),cache-dit+compile(threshold=0.3)" \
    --json $W-cache-dit.json --markdown $W-cache-dit.md
done
