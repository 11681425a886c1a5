#!/usr/bin/env bash
# Pre-training of the bundled head-and-neck model resunet.openkbp (see README.md beside this file).
# Run from the repository root; pass --resume to continue from checkpoint.pt in this folder.
# Data: the OpenKBP folder (cases.csv, images/, labels/) at $OPENKBP (default ../shared/data/openkbp).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec fseft pretrain --assembly src/fseft/protocols/openkbp_assembly.yaml \
  --data-root "${OPENKBP:-../shared/data/openkbp}" --cache-dir "${FSEFT_CACHE:-../runs}/cache-kbp" \
  --model-arch resunet --feature-size 8 --spacing 4 4 3 --roi 64 64 64 --num-samples 1 --batch-size 2 \
  --no-spatial-augment --pos 3 --neg 1 --steps 12000 --lr 0.002 --warmup 200 --channels-last --seed 0 \
  --val-every 1000 --ckpt-every 100 --log-every 25 --out pretraining/openkbp-resunet8 "$@"
