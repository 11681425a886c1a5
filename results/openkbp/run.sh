#!/bin/bash
# The OpenKBP few-shot table (docs/results/openkbp.md), resumable: two shards, one core each, write
# their cells to results/openkbp/cells (a cell whose file exists is skipped), then the page is
# rebuilt from every cell there. Run again after an interruption, in any session; commit cells/.
# Order: the novel tasks' first seed (they answer most of the paper's questions), then the first
# seed of every task, then everything.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 FSEFT_CACHE="${FSEFT_CACHE:-$PWD/runs/kbp-cache}"

shards() {  # run the selection given as arguments in two shards, one core each, and wait for both
  for i in 1 2; do
    setsid taskset -c $((i - 1)) fseft benchmark openkbp --data-root ../shared/data/openkbp \
      --out results/openkbp --shard "$i/2" "$@" >> "results/openkbp/shard$i.log" 2>&1 &
  done
  wait
}

shards --task larynx --task esophagus --task ptv70 --seed 0
shards --seed 0
shards
python scripts/results_doc.py results/openkbp --doc docs/results/openkbp.md --model resunet.openkbp
