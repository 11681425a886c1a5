"""Ship a pre-trained model inside the package, with its recipe and measurements recorded beside it.

    python scripts/bundle_model.py runs/fm_synth4/model.pt --name unet-small.synth \
        --description "..." --data-command "fseft synth /work/runs/synth --seed 0"
    python scripts/bundle_model.py pretraining/openkbp-resunet8/model.pt --name resunet.openkbp \
        --description "..." --eval runs/eval-openkbp/summary.json

Copies the model to ``src/fseft/models/bundled/NAME.pt`` and writes ``NAME.json``: the exact
commands (data + ``fseft pretrain``, as recorded in the model itself), seed, data, steps, training
wall time and machine, the commit the code was at, the validation Dice per structure and the
learning curve from the run's ``train_log.jsonl``, the held-out evaluation written by
``scripts/evaluate_model.py`` (``--eval``), versions and the file's sha256. ``fseft zoo info NAME``
shows it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import monai
import torch

from fseft import __version__
from fseft.models import safe_torch_load
from fseft.runtime import machine

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "src" / "fseft" / "models" / "bundled"


def learning_curve(log: Path) -> list[dict[str, Any]]:
    """The validation records of a ``train_log.jsonl``: step, training seconds, mean and per-structure Dice."""
    if not log.is_file():
        return []
    curve = []
    for line in log.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "val_dice" in record:
            curve.append({k: record.get(k) for k in ("step", "elapsed_s", "val_mean", "val_dice")})
    return curve


def commit() -> str:
    """The repository's HEAD commit (``+dirty`` when tracked files differ from it)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "src"], cwd=REPO).returncode != 0
    return head.stdout.strip() + ("+dirty" if dirty else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="model.pt written by fseft pretrain")
    parser.add_argument("--name", required=True, help="registry name, e.g. resunet.openkbp")
    parser.add_argument("--description", required=True, help="one line for listings")
    parser.add_argument("--data-command", action="append", default=[], help="a command that made the training data")
    parser.add_argument("--eval", type=Path, help="summary.json of scripts/evaluate_model.py")
    parser.add_argument("--log", type=Path, help="train_log.jsonl (default: beside the model)")
    args = parser.parse_args()
    checkpoint = safe_torch_load(args.model)
    extra = checkpoint["extra"]
    BUNDLED.mkdir(parents=True, exist_ok=True)
    target = BUNDLED / f"{args.name}.pt"
    shutil.copyfile(args.model, target)
    wall = extra.get("elapsed_s")
    recipe = {
        "name": args.name,
        "description": args.description,
        "commands": [*args.data_command, extra["command"]],
        "seed": extra["seed"],
        "data": extra["data"],
        "datasets": extra["datasets"],
        "steps": extra["steps"],
        "wall_time_s": None if wall is None else round(wall),
        "machine": machine(),
        "commit": commit(),
        "validation_dice": extra.get("val_dice"),
        "learning_curve": learning_curve(args.log or args.model.with_name("train_log.jsonl")),
        "evaluation": json.loads(args.eval.read_text(encoding="utf-8")) if args.eval else None,
        "structures": checkpoint["config"]["structures"],
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "versions": {"fseft": __version__, "torch": torch.__version__, "monai": monai.__version__},
    }
    (BUNDLED / f"{args.name}.json").write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    print(f"bundled {target} ({target.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
