"""Write a bundled model's card: its recipe, cost, held-out accuracy and learning curve, as Markdown + PNG.

    python scripts/model_card.py resunet.openkbp --out docs/models

Reads ``src/fseft/models/bundled/NAME.json`` (written by ``scripts/bundle_model.py``) and writes
``OUT/NAME.md`` and ``OUT/NAME-learning-curve.png`` (mean and per-structure validation Dice against
training hours).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fseft.models.bundled_models import recipe  # noqa: E402


def plot_curve(curve: list[dict[str, Any]], path: Path, title: str) -> None:
    """Validation Dice (mean and per structure) against training hours."""
    hours = [p["elapsed_s"] / 3600 for p in curve]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in curve[-1]["val_dice"]:
        ax.plot(hours, [p["val_dice"].get(name) for p in curve], marker=".", lw=1, label=name)
    ax.plot(hours, [p["val_mean"] for p in curve], color="black", lw=2.5, marker="o", label="mean")
    ax.set(xlabel="training wall time (h)", ylabel="validation Dice (model grid)", title=title, ylim=(0, 1))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def card(name: str, info: dict[str, Any], figure: str | None) -> str:
    """The Markdown card."""
    wall = info.get("wall_time_s")
    lines = [
        f"# `{name}`",
        "",
        info.get("description", ""),
        "",
        f"- Structures: {', '.join(info['structures'])}",
        f"- Training: {info['steps']} steps" + (f", {wall / 3600:.2f} h wall time" if wall else "")
        + (f" on {info['machine']}" if info.get("machine") else ""),
        f"- Code: commit `{info.get('commit', 'unknown')}`; file sha256 `{info['sha256']}`",
        "- Commands:",
        "",
        *[f"  ```\n  {c}\n  ```" for c in info["commands"]],
        "",
    ]  # fmt: skip
    evaluation = info.get("evaluation")
    if evaluation:
        lines += [
            f"## Held-out accuracy ({evaluation['cases']} `{evaluation['split']}` cases, each on its own grid)",
            "",
            f"`{evaluation['command']}`: mean Dice {evaluation['mean_dice']:.3f}, "
            f"prediction {evaluation['predict_seconds_per_volume']} s per volume ({evaluation.get('machine', '')}).",
            "",
            "| structure | cases | Dice | HD95 (mm) | NSD (2 mm) |",
            "|---|---:|---:|---:|---:|",
            *[f"| {s} | {m['cases']} | {m['dice']:.3f} ± {m['dice_std']:.3f} | {m['hd95']:.1f} ± {m['hd95_std']:.1f} "
              f"| {m['nsd']:.3f} ± {m['nsd_std']:.3f} |" for s, m in evaluation["metrics"].items()],
            "",
        ]  # fmt: skip
    curve = info.get("learning_curve") or []
    if curve:
        names = list(curve[-1]["val_dice"])
        lines += [
            "## Learning curve (validation Dice on the model grid, during training)",
            "",
            "| step | hours | mean | " + " | ".join(names) + " |",
            "|---:|---:|---:|" + "---:|" * len(names),
            *[f"| {p['step']} | {p['elapsed_s'] / 3600:.2f} | {p['val_mean']:.3f} | "
              + " | ".join(f"{p['val_dice'].get(n, float('nan')):.3f}" for n in names) + " |" for p in curve],
            "",
        ]  # fmt: skip
        if figure:
            lines += [f"![learning curve]({figure})", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", help="bundled model name")
    parser.add_argument("--out", type=Path, default=Path("docs/models"))
    args = parser.parse_args()
    info = recipe(args.name)
    if not info:
        raise SystemExit(f"no bundled model {args.name!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    figure = None
    if info.get("learning_curve"):
        figure = f"{args.name}-learning-curve.png"
        plot_curve(info["learning_curve"], args.out / figure, args.name)
    (args.out / f"{args.name}.md").write_text(card(args.name, info, figure), encoding="utf-8")
    print(f"wrote {args.out / (args.name + '.md')}")


if __name__ == "__main__":
    main()
