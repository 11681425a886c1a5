#!/bin/bash
# The OpenKBP few-shot table (docs/results/openkbp.md), resumable: two runs of the grid, one core
# each, share results/openkbp: each claims a cell (a lock) while computing it, so they split the
# cells between them; a cell whose file exists is skipped. Then the page is rebuilt from every cell
# there. Run again after an interruption, in any session; commit cells/.
# Order: the novel tasks' first seed (they answer most of the paper's questions), then the first
# seed of every task, then everything.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 FSEFT_CACHE="${FSEFT_CACHE:-$PWD/runs/kbp-cache}"

runs() {  # two runs of the selection given as arguments, one core each, and wait for both
  for i in 1 2; do
    setsid taskset -c $((i - 1)) fseft benchmark openkbp --data-root ../shared/data/openkbp \
      --out results/openkbp "$@" >> "results/openkbp/run$i.log" 2>&1 &
  done
  wait
}

runs --task larynx --task esophagus --task ptv70 --seed 0
runs --seed 0
runs
python scripts/results_doc.py results/openkbp --doc docs/results/openkbp.md --model resunet.openkbp
