"""Write the measured part of a benchmark's results page from its cell results.

    python scripts/results_doc.py results/openkbp --doc docs/results/openkbp.md --model resunet.openkbp

Reads every cell under ``FOLDER/cells`` (several folders merge, as ``fseft benchmark --merge``
does) and replaces the text between ``<!-- measured:start -->`` and ``<!-- measured:end -->`` in
``--doc`` (created with just that section when missing), so the hand-written reading around it
stays. The section holds: what was run (cells per row and seed, machine, summed cell wall time),
the paper-style tables (Dice, HD95, NSD per task group, mean ± std over seeds, with cost columns;
one Dice table per task), the transductive rows against their plain spatial adapter per task and
k, and the measured cost of every row.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fseft.benchmark import load_protocol, shipped_protocols
from fseft.benchmark.cells import CellResult
from fseft.benchmark.runner import in_protocol_order, read_cells
from fseft.benchmark.tables import markdown, mean_std
from fseft.io_utils import write_text_atomic
from fseft.models.bundled_models import recipe
from fseft.report.groups import cell_mean, format_bytes

START, END = "<!-- measured:start -->", "<!-- measured:end -->"


def run_facts(cells: Sequence[CellResult]) -> str:
    """Cells per row and seed, machines, summed cell wall time."""
    rows: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for c in cells:
        rows[c.cell.label][c.cell.seed] += 1
    seeds = sorted({c.cell.seed for c in cells})
    lines = [
        "| row | " + " | ".join(f"cells, seed {s}" for s in seeds) + " |",
        "|---|" + "---:|" * len(seeds),
    ]
    for label, by_seed in rows.items():
        lines.append(f"| {label} | " + " | ".join(str(by_seed.get(s, 0)) for s in seeds) + " |")
    machines = sorted({c.cost.machine for c in cells if c.cost.machine})
    total = sum(c.cost.cell_wall_s for c in cells)
    return "\n".join(
        [f"{len(cells)} cells; machine: {'; '.join(machines) or 'unrecorded'}; summed cell wall time "
         f"{total / 3600:.2f} h (one thread per cell).", "", *lines]
    )  # fmt: skip


def transductive_table(cells: Sequence[CellResult]) -> str:
    """Dice of every transductive row next to the plain row of the same method, per task and k; the
    difference is paired: over the seeds that both rows have (a partial run has more of one)."""
    by: dict[tuple[str, str, int], dict[int, float]] = defaultdict(dict)
    plain_of: dict[str, str] = {}
    for c in cells:
        if c.cell.all_train:
            continue
        by[(c.cell.label, c.cell.task, c.cell.k)][c.cell.seed] = cell_mean(c, "dice")
        if c.transductive:
            plain_of[c.cell.label] = c.cell.label.split(" +TI")[0]
    if not plain_of:
        return ""
    tx_rows = list(plain_of)
    plain = next(iter(plain_of.values()))
    tasks = list(dict.fromkeys(c.cell.task for c in sorted(cells, key=lambda c: c.cell.task_index)))
    keys = sorted(
        {(t, k) for (label, t, k) in by if label in plain_of}, key=lambda x: (tasks.index(x[0]), x[1])
    )
    heads = [plain] + [f"{r} (Δ)" for r in tx_rows]
    lines = ["| task | k | " + " | ".join(heads) + " |", "|---|---:|" + "---:|" * len(heads)]
    for task, k in keys:
        base = by.get((plain, task, k), {})
        row = [mean_std(list(base.values()))]
        for r in tx_rows:
            mine = by.get((r, task, k), {})
            paired = [mine[s] - base[s] for s in mine.keys() & base.keys()]
            text = mean_std(list(mine.values()))
            row.append(f"{text} ({np.mean(paired):+.3f})" if paired else text)
        lines.append(f"| {task} | {k} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n\nΔ: the transductive row minus the plain one, averaged over the seeds both have."


def cost_table(cells: Sequence[CellResult]) -> str:
    """Measured cost per row: cells, mean adaptation and cell wall time, total hours, size."""
    rows: dict[str, list[CellResult]] = defaultdict(list)
    for c in sorted(cells, key=lambda c: c.cell.method_index):
        rows[c.cell.label].append(c)
    lines = [
        "| row | cells | trainable params | adapter size | adapt s / cell | cell s / cell | total h |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, mine in rows.items():
        adapt = np.mean([c.cost.adapt_wall_s for c in mine])
        wall = [c.cost.cell_wall_s for c in mine]
        params = int(np.mean([c.cost.trainable_params for c in mine]))
        size = format_bytes(float(np.mean([c.cost.adapter_bytes for c in mine])))
        lines.append(f"| {label} | {len(mine)} | {params:,} | {size} | {adapt:.1f} | {np.mean(wall):.1f} | "
                     f"{sum(wall) / 3600:.2f} |")  # fmt: skip
    return "\n".join(lines)


def measured_section(cells: Sequence[CellResult], model: str | None) -> str:
    cells = sorted(cells, key=lambda d: (d.cell.method_index, d.cell.task_index))  # rows in protocol order
    parts = [START, "## What was run", run_facts(cells)]
    if model:
        info = recipe(model)
        parts.append(f"Foundation model: `{model}` (sha256 `{info['sha256'][:16]}…`, trained at commit "
                     f"`{info['commit'][:10]}`).")  # fmt: skip
    tables = markdown(cells, ("dice", "hd95", "nsd"))
    parts += ["## Tables", re.sub(r"^## ", "### ", tables.strip(), flags=re.M)]
    tx = transductive_table(cells)
    if tx:
        parts += ["## The transductive constraint, per task and k (Dice, mean ± std over seeds)", tx]
    parts += ["## Measured cost per row", cost_table(cells), END]
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folders", nargs="+", type=Path, help="benchmark output folders (each with cells/)")
    parser.add_argument("--doc", type=Path, required=True, help="the Markdown page to update")
    parser.add_argument("--model", help="foundation model name to cite (its sha256 from the zoo)")
    args = parser.parse_args()
    cells = read_cells(args.folders)
    names = {d.config.get("protocol") for d in cells}
    if len(names) == 1 and (name := names.pop()) in shipped_protocols():  # rows in its current order
        cells = in_protocol_order(cells, load_protocol(name))
    section = measured_section(cells, args.model)
    text = args.doc.read_text(encoding="utf-8") if args.doc.is_file() else f"{START}\n{END}\n"
    if START not in text or END not in text:
        raise SystemExit(f"{args.doc}: no {START} ... {END} section to replace")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.doc, head + section + tail)
    print(f"updated {args.doc}")


if __name__ == "__main__":
    main()
