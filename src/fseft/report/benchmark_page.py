"""The benchmark's HTML report as one page a newcomer can read top to bottom: what was run, one
table and one figure per task group (base and novel apart, with the cost columns), and one query
case drawn with the reference and every method's prediction at every ``k``.

Self-contained like :func:`fseft.report.build_report` (inline CSS, figures as PNG ``data:`` URIs).
Everything comes from the cell results (:class:`~fseft.benchmark.cells.CellResult`), the protocol
when given, and the query snapshots the runner kept (:mod:`fseft.report.snapshots`).
"""

from __future__ import annotations

import datetime
import html
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..adapt.trainer import AdaptTrainConfig
from ..data.synth import SynthConfig
from ..inference import PredictConfig
from ..io_utils import write_text_atomic
from ..models.hub import MODELS
from . import benchmark_figures as bf
from . import groups as g
from .html import _dice_class, _img, _page
from .snapshots import QuerySnapshot, load_snapshot

if TYPE_CHECKING:
    from ..benchmark.cells import CellResult

_LOWER_IS_BETTER = {"hd95_mm"}


def build_benchmark_report(
    cells: Sequence[CellResult],
    out: str | os.PathLike[str],
    *,
    protocol: Any = None,
    snapshots: str | os.PathLike[str] | None = None,
    files: Sequence[str] = (),
    title: str = "fseft benchmark",
) -> Path:
    """Write the benchmark's one-page report.

    Args:
        cells: Cell results (any order).
        out: The HTML file (replaced).
        protocol: The :class:`~fseft.benchmark.protocol.Protocol` (its description and data source
            are shown); None: what the cells record.
        snapshots: Folder of ``<cell id>.npz`` query snapshots (the grid of predictions).
        files: Names of the other outputs, listed at the end.
        title: Page title.

    Returns:
        The written path.
    """
    colors = bf.method_colors(g.method_labels(cells))
    summaries = [g.summarise_group(cells, group) for group in g.groups(cells)]
    meta = [("generated", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")), ("fseft", __version__),
            ("cells", str(len(cells)))]  # fmt: skip
    sections = [_run_section(cells, protocol, colors), _reading_section(cells)]
    sections += [_group_section(s, cells, colors) for s in summaries]
    folder = Path(snapshots) if snapshots is not None else None
    sections.append(_cases_section(cells, folder, colors))
    if files:
        sections.append(
            "<section><h2>Files</h2><p class='note'>Beside this page: "
            + ", ".join(f"<code>{html.escape(f)}</code>" for f in files)
            + ". The Markdown tables hold the same numbers; the CSVs every query case.</p></section>"
        )
    out = Path(out)
    write_text_atomic(out, _page(title, meta, sections))
    return out


def _swatch(label: str, colors: Mapping[str, str]) -> str:
    return (f"<span class='swatch' style='background:{colors.get(label, '#888')}'></span>"
            f"{html.escape(label)}")  # fmt: skip


def _facts(rows: Sequence[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th class='fact'>{html.escape(k)}</th><td class='fact'>{v}</td></tr>" for k, v in rows)
    return f"<table class='facts'><tbody>{body}</tbody></table>"


def _run_section(cells: Sequence[CellResult], protocol: Any, colors: Mapping[str, str]) -> str:
    first = min(cells, key=lambda d: (d.cell.task_index, d.cell.method_index))
    config = first.config
    facts: list[tuple[str, str]] = []
    if protocol is not None:
        facts.append(("Protocol", f"<b>{html.escape(protocol.name)}</b>: {html.escape(protocol.description.strip())}"))
        facts.append(("Data", _data_text(protocol)))
    facts.append(("Model", _model_text(str(config.get("model", "")))))
    tasks = {}
    for d in sorted(cells, key=lambda d: d.cell.task_index):
        task = d.config.get("task", {})
        tasks.setdefault(d.cell.task, (d.cell.group, task))
    facts.append(("Tasks", "<br>".join(
        f"{html.escape(name)} ({html.escape(group)}: {html.escape(', '.join(t.get('structures', [])))}): "
        f"support pool of {len(t.get('pool', []))} cases, {len(t.get('queries', []))} query cases "
        f"({html.escape(', '.join(t.get('queries', [])))})"
        for name, (group, t) in tasks.items()
    )))  # fmt: skip
    train = dict(protocol.train) if protocol is not None else {}
    facts.append(("Methods", "<br>".join(_method_text(label, cells, colors, train) for label in g.method_labels(cells))))
    ctx = g.context(cells)
    ks = sorted({d.cell.column for d in cells}, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0))
    facts.append(("Support sizes k", ", ".join(ks) + f"; seeds: {', '.join(map(str, ctx['seeds']))}"))
    facts.append(("Training", _overrides(config.get("train", {}), AdaptTrainConfig(), "the paper's")))
    facts.append(("Prediction", _overrides(config.get("predict", {}), PredictConfig(), "the default")))
    wall = ctx["cell_wall_s"]
    timed = (f"{wall:.0f} s for the {ctx['timed_cells']} cells (adaptation, prediction and scoring, summed), "
             if wall is not None else "")  # fmt: skip
    facts.append(("Wall time", f"{timed}of which adaptation {ctx['adapt_wall_s']:.0f} s"))
    facts.append(("Machine", html.escape("; ".join(ctx["machines"]) or ", ".join(ctx["devices"]))))
    return f"<section><h2>What was run</h2>{_facts(facts)}</section>"


def _data_text(protocol: Any) -> str:
    data = protocol.data
    if data.source != "synth":
        sources = [s.manifest or f"{s.images} + {s.labels}" for s in data.sources]
        return "cases from " + html.escape(", ".join(sources))
    synth = SynthConfig.from_preset(data.synth_preset, cases=data.synth_cases)
    described = []
    for site in synth.sites:
        spacing = "×".join(f"{v:g}" for v in site.spacing)
        described.append(f"<b>{html.escape(site.name)}</b> ({site.role}: {site.phase} phase, {spacing} mm, "
                         f"{site.axcodes}, noise {site.noise_hu:g} HU)")  # fmt: skip
    target = next(s for s in synth.sites if s.role == "target")
    return (
        f"synthetic multi-site abdominal CT ({html.escape(synth.preset)} preset, seed {data.synth_seed}, "
        f"{synth.cases} cases). The foundation model was pre-trained on the source sites' partial labels; "
        f"the few-shot cases come from the target site <b>{html.escape(target.name)}</b>, shifted in contrast "
        "phase, noise, voxel size and stored orientation. Sites: " + "; ".join(described) + "."
    )


def _model_text(model: str) -> str:
    description = MODELS.get(model).description if model in MODELS.names() else ""
    return f"<b>{html.escape(model)}</b>" + (f": {html.escape(description)}" if description else "")


def _method_text(label: str, cells: Sequence[CellResult], colors: Mapping[str, str], train: Mapping[str, Any]) -> str:
    """A row's method, decoder, learning rate and its own training overrides (beyond ``train``)."""
    d = next(d for d in cells if d.cell.label == label)
    lr = d.record.get("lr")
    parts = [f"method {d.method}", f"decoder {d.decoder}"]
    parts.append(f"lr {lr:g}" if isinstance(lr, int | float) else "trains nothing")
    parts += [f"{html.escape(k)} {_value(v)}" for k, v in d.config.get("train", {}).items() if train.get(k) != v]
    if d.transductive:
        parts.append("transductive")
    mine = [c for c in cells if c.cell.label == label]
    groups = sorted({c.cell.group for c in mine})
    where = [f"groups: {', '.join(groups)}"]
    around = [c for c in cells if c.cell.group in groups]  # a row may run on some tasks or k only
    tasks = ({c.cell.task for c in mine}, {c.cell.task for c in around})
    ks = tuple({c.cell.k for c in rows if not (c.cell.all_train or c.k_independent)} for rows in (mine, around))
    for name, (own, every) in (("tasks", tasks), ("k", ks)):
        if own and own != every:
            where.append(f"{name}: {', '.join(map(str, sorted(own)))}")
    return f"{_swatch(label, colors)} <span class='muted'>({', '.join(parts)}; {'; '.join(where)})</span>"


def _overrides(values: Mapping[str, Any], defaults: Any, whose: str) -> str:
    if not values:
        return f"{whose} defaults"
    return ", ".join(
        f"{html.escape(k)} {_value(v)}" + (f" ({whose}: {_value(getattr(defaults, k))})" if hasattr(defaults, k) else "")
        for k, v in values.items()
    )


def _value(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else html.escape(repr(value))


def _reading_section(cells: Sequence[CellResult]) -> str:
    predict = min(cells, key=lambda d: d.cell.method_index).config.get("predict", {})
    if predict.get("largest_cc"):
        post = ("Predictions keep only their <b>largest connected component</b> (the targets are single "
                "organs): without it, scattered false positives far from the organ dominate HD95.")  # fmt: skip
    else:
        post = ("Predictions are <b>not post-processed</b> (as in the paper): HD95 counts every scattered "
                "false positive, however small, so a large HD95 beside a good Dice means stray voxels far "
                "from the organ. For single-organ targets, <code>predict: {largest_cc: true}</code> in the "
                "protocol keeps the largest connected component.")  # fmt: skip
    return (
        "<section><h2>How to read this page</h2><ul class='note'>"
        "<li>Each <b>cell</b> adapts the foundation model to one task from <b>k</b> labelled support scans "
        "with one method and one seed, then segments the query cases and scores them.</li>"
        "<li><b>Base</b> structures were labelled during pre-training, <b>novel</b> ones never were: they are "
        "reported apart and never averaged together. A method not run on every task of a group has no "
        "row in that group (zero-shot has no output for a novel structure).</li>"
        "<li><b>Dice</b> and <b>NSD</b> (surface Dice at the protocol's tolerance): higher is better, 1 is "
        "perfect. <b>HD95</b> (mm): lower is better; undefined (left out) when a mask is empty. Values "
        "are means over query cases and the group's tasks, ± the standard deviation over seeds when "
        "there are several; the best value of each column is bold.</li>"
        "<li><b>Costs</b>: parameters that trained, size of the saved adapter, adaptation wall time and "
        "peak memory. Zero-shot trains nothing and stands for every k.</li>"
        f"<li>{post}</li>"
        "<li>Each method has one colour on every table and figure; the reference is yellow.</li></ul></section>"
    )


def _group_section(summary: g.GroupSummary, cells: Sequence[CellResult], colors: Mapping[str, str]) -> str:
    cols = summary.columns
    metric_heads = "".join(f"<th colspan='{len(cols)}'>{html.escape(t)}</th>" for _, t in g.GROUP_METRICS)
    adapt_head = f"adaptation time (k = {' / '.join(cols)})"
    cost_heads = "".join(f"<th rowspan='2'>{t}</th>" for t in
                         ("trainable parameters", "adapter size", adapt_head, "peak memory"))  # fmt: skip
    sub = "".join(f"<th>k = {html.escape(c)}</th>" for _ in g.GROUP_METRICS for c in cols)
    best = {}
    for key, _ in g.GROUP_METRICS:
        for c in cols:
            means = [r.scores[(key, c)].mean for r in summary.methods if r.scores[(key, c)].n]
            if means:
                best[(key, c)] = min(means) if key in _LOWER_IS_BETTER else max(means)
    body = []
    for row in summary.methods:
        tds = [f"<td class='name'>{_swatch(row.label, colors)}</td>"]
        for key, _ in g.GROUP_METRICS:
            for c in cols:
                stat = row.scores[(key, c)]
                cls = _dice_class(stat.mean) if key == "dice" and stat.n else ""
                text = stat.text(1 if key in _LOWER_IS_BETTER else 3)
                if stat.n and stat.mean == best.get((key, c)):
                    text = f"<b>{text}</b>"
                tds.append(f"<td class='{cls}'>{text}</td>")
        adapt = " / ".join(f"{row.adapt_s[c]:.1f}" if c in row.adapt_s else "–" for c in cols) + " s"
        tds += [f"<td>{row.trainable_params:,}</td>", f"<td>{g.format_bytes(row.adapter_bytes)}</td>", f"<td>{adapt}</td>",
                f"<td>{g.format_bytes(row.peak_memory_bytes)}</td>"]  # fmt: skip
        body.append(f"<tr>{''.join(tds)}</tr>")
    notes = []
    absent = [label for label in g.method_labels(cells) if label not in {r.label for r in summary.methods}]
    missing = [label for label in absent if label not in summary.incomplete]
    if missing:
        notes.append(f"Not run on this group: {html.escape(', '.join(missing))}.")
    if summary.incomplete:
        notes.append(html.escape(g.incomplete_note(summary.incomplete)) + ".")
    notes += [html.escape(g.partial_column_note(c, kept)) + "." for c, kept in summary.partial_columns().items()]
    memory = {r.memory_kind for r in summary.methods}
    notes.append("Peak memory: " + ", ".join(sorted(memory)) + " (the process's, so it includes the model and "
                 "the data), the largest over the method's cells of the group; the other costs are means over them.")  # fmt: skip
    png = bf.group_figure(summary.group, g.curves(summary),
                          {r.label: r.per_case for r in summary.methods}, cols, colors)  # fmt: skip
    title = f"{summary.group.capitalize()} structures ({', '.join(summary.tasks)})"
    return (
        f"<section><h2>{html.escape(title)}</h2>"
        f"<table><thead><tr><th rowspan='2'>Method</th>{metric_heads}{cost_heads}</tr><tr>{sub}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table><p class='note'>{' '.join(notes)}</p>"
        f"{_img(png, f'{summary.group}: Dice against k and per-case Dice')}</section>"
    )


def _cases_section(cells: Sequence[CellResult], folder: Path | None, colors: Mapping[str, str]) -> str:
    parts = []
    tasks = list(dict.fromkeys(d.cell.task for d in sorted(cells, key=lambda d: d.cell.task_index)))
    for task in tasks:
        mine = sorted((d for d in cells if d.cell.task == task and d.cell.seed == min(c.cell.seed for c in cells)),
                      key=lambda d: (d.cell.method_index, d.cell.all_train, d.cell.k))  # fmt: skip
        columns = [c for c in dict.fromkeys(d.cell.column for d in mine if not d.k_independent)] or [mine[0].cell.column]
        rows: dict[str, dict[str, tuple[QuerySnapshot, float | None]]] = {}
        for d in mine:
            path = folder / f"{d.cell_id}.npz" if folder is not None else None
            if path is None or not path.is_file():
                continue
            snap = load_snapshot(path)
            dice = [m.dice for m in d.metrics if m.case == snap.case and m.dice is not None]
            value = sum(dice) / len(dice) if dice else None
            for column in g.cell_columns(d, columns):
                rows.setdefault(d.cell.label, {})[column] = (snap, value)
        if not rows:
            continue
        case = next(s for by_col in rows.values() for s, _ in by_col.values()).case
        png = bf.snapshot_grid(rows, columns, colors)
        parts.append(f"<h3>{html.escape(task)}: query case {html.escape(case)}</h3>"
                     f"{_img(png, f'query case {case}: {task} predictions')}")  # fmt: skip
    if not parts:
        return ("<section><h2>One query case</h2><p class='note'>No query snapshots were kept for these "
                "cells (results computed by an older fseft).</p></section>")  # fmt: skip
    return (
        "<section><h2>One query case, every method</h2><p class='note'>The first query case of each task "
        "(first seed), axial and coronal slices through the centre of its reference, cropped around it; "
        "reference in yellow, each method's prediction in its colour, the case's Dice in the corner. "
        f"Radiological convention (patient's right on the left), soft-tissue window.</p>{''.join(parts)}</section>"
    )


__all__ = ["build_benchmark_report"]
