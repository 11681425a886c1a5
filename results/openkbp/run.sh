#!/bin/bash
# The OpenKBP few-shot table (docs/results/openkbp.md), resumable: two runs of the grid, one core
# each, share results/openkbp: each claims a cell (a lock) while computing it, so they split the
# cells between them; a cell whose file exists is skipped. Then the page is rebuilt from every cell
# there. Run again after an interruption, in any session; commit cells/.
# Order: the grid's own, seed by seed (all of seed 0 first), so a partial table fills every row once.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 FSEFT_CACHE="${FSEFT_CACHE:-$PWD/runs/kbp-cache}"

for i in 1 2; do
  setsid taskset -c $((i - 1)) fseft benchmark openkbp --data-root ../shared/data/openkbp \
    --out results/openkbp >> "results/openkbp/run$i.log" 2>&1 &
done
wait
python scripts/results_doc.py results/openkbp --doc docs/results/openkbp.md --model resunet.openkbp
