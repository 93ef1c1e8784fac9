#!/usr/bin/env bash
# Data parallel scaling on one machine: `runtime bench` (the engine benchmark's shape by default)
# as 1 process x 1 thread with the global batch, against N processes x 1 thread each with their
# share of it, alternating, best of ROUNDS. Prints tokens/s of each and the ratio.
# Usage: scripts/bench_ddp.sh [N] [ROUNDS] [extra bench arguments...]
# Needs a build with the `mpi` feature: cargo build --release --features mpi
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-2}
rounds=${2:-3}
shift $(( $# > 2 ? 2 : $# )) || true
bin=target/release/runtime
batch=8
# tokens/s, peak RSS (whole run; timed steps alone), and the weights, gradients and moments held
tps() { python3 -c 'import json,sys; r=json.load(sys.stdin); print(r["tokens_per_second"], "%.0f/%.0f" % (r["peak_rss_mib"], r["steps_peak_rss_mib"] or float("nan")), "%.1f" % r["state_mib"])'; }
best1=0; bestn=0
for r in $(seq "$rounds"); do
    read -r one rss1 st1 < <(RAYON_NUM_THREADS=1 "$bin" bench --batch "$batch" --json "$@" 2>/dev/null | tps)
    read -r many rssn stn < <(RAYON_NUM_THREADS=1 mpirun -np "$n" "$bin" bench --batch $((batch / n)) --json "$@" 2>/dev/null | tps)
    echo "round $r: 1 x 1 thread $one tokens/s (peak RSS run/steps $rss1 MiB, state $st1 MiB); $n x 1 thread $many tokens/s (rank 0: $rssn MiB, state $stn MiB)"
    best1=$(python3 -c "print(max($best1, $one))"); bestn=$(python3 -c "print(max($bestn, $many))")
done
python3 -c "print(f'best: 1 process {$best1:.0f} tokens/s, $n processes {$bestn:.0f} tokens/s, ratio {$bestn / $best1:.2f}x')"
