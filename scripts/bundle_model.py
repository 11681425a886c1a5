"""Install a pre-trained model as the bundled default, with its recipe recorded beside it.

    python scripts/bundle_model.py RUN_DIR/model.pt --synth-command "fseft synth DIR --seed 0"

Copies the model to ``src/fseft/models/bundled/unet-small.synth.pt`` and writes
``unet-small.synth.json``: the exact commands (synthetic data + ``fseft pretrain``, as recorded in
the model itself), seed, data config, validation Dice, versions and the file's sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import monai
import torch

from fseft import __version__
from fseft.models import DEFAULT_MODEL, safe_torch_load

BUNDLED = Path(__file__).resolve().parents[1] / "src" / "fseft" / "models" / "bundled"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path, help="model.pt written by fseft pretrain")
    parser.add_argument("--synth-command", required=True, help="the command that generated the training data")
    parser.add_argument("--name", default=DEFAULT_MODEL)
    args = parser.parse_args()
    checkpoint = safe_torch_load(args.model)
    extra = checkpoint["extra"]
    BUNDLED.mkdir(parents=True, exist_ok=True)
    target = BUNDLED / f"{args.name}.pt"
    shutil.copyfile(args.model, target)
    recipe = {
        "name": args.name,
        "description": "unet-small (width 8, 0.36 M parameters) pre-trained on the synthetic assembly's "
        "three source sites (partial labels); 4 mm spacing, 48^3 patches",
        "commands": [args.synth_command, extra["command"]],
        "seed": extra["seed"],
        "data": extra["data"],
        "datasets": extra["datasets"],
        "steps": extra["steps"],
        "validation_dice": extra.get("val_dice"),
        "structures": checkpoint["config"]["structures"],
        "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
        "versions": {"fseft": __version__, "torch": torch.__version__, "monai": monai.__version__},
    }
    (BUNDLED / f"{args.name}.json").write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    print(f"bundled {target} ({target.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
