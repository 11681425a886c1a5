"""A self-contained HTML report: summary table, box plots, per-case overlays, Dice-vs-k curves.

Everything is inline (CSS in a ``<style>`` element, figures as base64 PNG ``data:`` URIs, no script),
so the single file can be mailed, archived or opened offline. Inputs are the folder written by
``fseft evaluate --out`` (``metrics_per_case.csv``, ``metrics_summary.csv``, ``metrics.json``), a
benchmark results CSV (columns ``method, k, seed, structure, dice``), and cases to draw.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from ..data.cases import LabelSource
from ..data.geometry import align_label
from ..data.image import Image
from ..data.io import read_image, read_label
from ..errors import ConfigError, DataError
from ..io_utils import write_text_atomic
from . import figures
from .overlays import OverlayCase

PER_CASE_CSV = "metrics_per_case.csv"
SUMMARY_CSV = "metrics_summary.csv"
METRICS_JSON = "metrics.json"
BENCHMARK_COLUMNS = ("method", "k", "seed", "structure", "dice")
#: Structures drawn per case at most (the first ones in label order).
MAX_STRUCTURES = 8
_SUMMARY_METRICS = (
    ("dice", "Dice"),
    ("nsd", "NSD"),
    ("hd95_mm", "HD95 (mm)"),
    ("abs_vol_err_ml", "|ΔV| (ml)"),
)


def build_report(
    evaluation_dir: str | os.PathLike[str] | None = None,
    benchmark_csv: str | os.PathLike[str] | None = None,
    overlays: Sequence[OverlayCase] = (),
    out: str | os.PathLike[str] = "report.html",
    *,
    title: str = "Segmentation report",
    overwrite: bool = False,
) -> Path:
    """Write the HTML report.

    Args:
        evaluation_dir: Output folder of ``fseft evaluate`` (summary table, box plots, per-case table).
        benchmark_csv: Benchmark results (Dice-vs-k curves per method, mean ± std over seeds).
        overlays: Cases to draw (axial, coronal, sagittal slices through each structure's centroid).
        out: The HTML file.
        title: Page title.
        overwrite: Replace an existing ``out``.

    Returns:
        The written path.

    Raises:
        ConfigError: ``out`` exists without ``overwrite``, or there is nothing to report.
        DataError: An input is missing or malformed (the message names the file).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: already exists; pass --overwrite to replace it")
    if evaluation_dir is None and benchmark_csv is None and not overlays:
        raise ConfigError("nothing to report: give an evaluation folder, a benchmark CSV or cases to draw")
    sections: list[str] = []
    meta: list[tuple[str, str]] = [("generated", datetime.datetime.now().strftime("%Y-%m-%d %H:%M")),
                                   ("fseft", __version__)]  # fmt: skip
    per_case: list[dict[str, str]] = []
    if evaluation_dir is not None:
        evaluation = Path(evaluation_dir)
        per_case = _read_csv(evaluation / PER_CASE_CSV, ("case", "structure", "dice", "hd95_mm"))
        summary = _read_csv(evaluation / SUMMARY_CSV, ("structure", "metric", "mean", "std", "median", "n"))
        meta += _evaluation_meta(evaluation / METRICS_JSON, per_case)
        sections += [_summary_section(summary), _boxplot_section(per_case)]
    if overlays:
        sections.append(_overlay_section(overlays, per_case))
    if evaluation_dir is not None:
        sections.append(_per_case_section(per_case))
    if benchmark_csv is not None:
        sections.append(_benchmark_section(Path(benchmark_csv)))
    write_text_atomic(out, _page(title, meta, sections))
    return out


def _read_csv(path: Path, required: Sequence[str]) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None
    missing = [c for c in required if c not in columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    return rows


def _float(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "") else math.nan
    except ValueError:
        return math.nan


def _evaluation_meta(path: Path, per_case: list[dict[str, str]]) -> list[tuple[str, str]]:
    meta = [("cases", str(len({r["case"] for r in per_case}))),
            ("structures", str(len({r["structure"] for r in per_case})))]  # fmt: skip
    if path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a readable JSON file ({e})") from None
        for key, label in (
            ("pred", "predictions"),
            ("gt", "references"),
            ("tolerance_mm", "NSD tolerance (mm)"),
        ):
            if isinstance(doc, dict) and doc.get(key) is not None:
                meta.append((label, str(doc[key])))
    return meta


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _dice_class(value: float) -> str:
    if math.isnan(value):
        return ""
    return "good" if value >= 0.8 else "fair" if value >= 0.6 else "poor"


def _summary_section(summary: list[dict[str, str]]) -> str:
    stats = {(r["structure"], r["metric"]): r for r in summary}
    head = "".join(
        f"<th>{html.escape(t)}</th>" for t in ("Structure", "n", *(t for _, t in _SUMMARY_METRICS))
    )
    body = []
    for structure in dict.fromkeys(r["structure"] for r in summary):
        cells = [f"<td class='name'>{html.escape(structure)}</td>"]
        dice = stats.get((structure, "dice"))
        cells.append(f"<td>{html.escape(dice['n']) if dice else '–'}</td>")
        for metric, _ in _SUMMARY_METRICS:
            row = stats.get((structure, metric))
            mean = _float(row["mean"]) if row else math.nan
            cls = f" class='{_dice_class(mean)}'" if metric == "dice" else ""
            cells.append(f"<td{cls}>{_stat(row)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (
        "<section><h2>Summary</h2><p class='note'>Mean ± standard deviation over cases (median in "
        "brackets). Dice cells: green ≥ 0.80, amber ≥ 0.60, red below.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></section>"
    )


def _stat(row: Mapping[str, str] | None) -> str:
    if row is None or math.isnan(_float(row["mean"])):
        return "–"
    mean, std, median = _float(row["mean"]), _float(row["std"]), _float(row["median"])
    spread = "" if math.isnan(std) else f" ± {std:.3g}"
    return f"{mean:.3g}{spread} <span class='muted'>({median:.3g})</span>"


def _boxplot_section(per_case: list[dict[str, str]]) -> str:
    values: dict[str, dict[str, list[float]]] = {"Dice": {}, "HD95 (mm)": {}}
    for row in per_case:
        values["Dice"].setdefault(row["structure"], []).append(_float(row["dice"]))
        values["HD95 (mm)"].setdefault(row["structure"], []).append(_float(row["hd95_mm"]))
    if not per_case:
        return "<section><h2>Distributions</h2><p>No per-case rows.</p></section>"
    png = figures.boxplot_figure(values)
    return (
        "<section><h2>Distributions per structure</h2><p class='note'>Boxes: quartiles and median; "
        f"dots: cases. HD95 is undefined when a side is empty.</p>{_img(png, 'Dice and HD95 box plots')}</section>"
    )


def _per_case_section(per_case: list[dict[str, str]]) -> str:
    columns = [("case", "Case"), ("structure", "Structure"), ("dice", "Dice"), ("nsd", "NSD"),
               ("hd95_mm", "HD95 (mm)"), ("vol_pred_ml", "V pred (ml)"), ("vol_gt_ml", "V ref (ml)"),
               ("flag", "Note")]  # fmt: skip
    head = "".join(f"<th>{t}</th>" for _, t in columns)
    rows = []
    for r in sorted(per_case, key=lambda r: (_float(r["dice"]), r["case"])):
        cells = []
        for key, _ in columns:
            raw = r.get(key, "")
            value = _float(raw)
            text = (
                raw
                if key in ("case", "structure", "flag")
                else ("–" if math.isnan(value) else f"{value:.3g}")
            )
            cls = f" class='{_dice_class(value)}'" if key == "dice" else ""
            cells.append(f"<td{cls}>{html.escape(text.replace('_', ' ') if key == 'flag' else text)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return (
        f"<section><h2>Per-case results</h2><details><summary>{len(per_case)} rows, worst Dice first</summary>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></details></section>"
    )


def _overlay_section(overlays: Sequence[OverlayCase], per_case: list[dict[str, str]]) -> str:
    dice = {(r["case"], r["structure"]): _float(r["dice"]) for r in per_case}
    parts = []
    for item in overlays:
        image = read_image(item.image)
        pred = align_label(read_image(item.pred, dtype=None), image).array
        pred_masks = {name: pred == value for value, name in item.pred_labels.items()}
        gt_masks = _reference_masks(item, image)
        names = [
            n
            for n in dict.fromkeys([*pred_masks, *(gt_masks or {})])
            if any(m is not None and m.any() for m in (pred_masks.get(n), (gt_masks or {}).get(n)))
        ]
        if not names:
            parts.append(f"<h3>{html.escape(item.case)}</h3><p>Prediction and reference are empty.</p>")
            continue
        rows = [
            figures.OverlayRow(
                n, pred_masks.get(n), None if gt_masks is None else gt_masks.get(n), dice.get((item.case, n))
            )
            for n in names[:MAX_STRUCTURES]
        ]
        hidden = len(names) - len(rows)
        extra = f" ({hidden} more structures not shown)" if hidden else ""
        png = figures.overlay_figure(image, rows)
        parts.append(
            f"<div class='case'><h3>{html.escape(item.case)}{extra}</h3>{_img(png, item.case)}</div>"
        )
    return (
        "<section><h2>Cases</h2><p class='note'>Slices through each structure's centroid; "
        "<span style='color:#00a050'>reference</span> and <span style='color:#e0302a'>prediction</span> "
        "outlines. Radiological convention: patient's right on the left of axial and coronal views; "
        f"soft-tissue window (L40/W400).</p>{''.join(parts)}</section>"
    )


def _reference_masks(item: OverlayCase, image: Image) -> dict[str, np.ndarray] | None:
    if item.gt is None:
        return None
    if isinstance(item.gt, LabelSource):
        return read_label(item.gt, image)
    if item.gt_labels is None:
        raise ConfigError(f"{item.gt}: reference label map given without its label names")
    gt = align_label(read_image(item.gt, dtype=None), image).array
    return {name: gt == value for value, name in item.gt_labels.items()}


def _benchmark_section(path: Path) -> str:
    rows = _read_csv(path, BENCHMARK_COLUMNS)
    if not rows:
        raise DataError(f"{path}: no result rows")
    seeds: dict[tuple[str, str, str, int, str], float] = {}
    for i, row in enumerate(rows, start=2):
        try:
            key = (row.get("group") or "", row["structure"], row["method"], int(row["k"]), row["seed"])
        except ValueError:
            raise DataError(f"{path}: line {i}: k must be an integer, got {row['k']!r}") from None
        seeds[key] = _float(row["dice"])
    members: dict[str, set[str]] = {}
    curves: dict[str, dict[str, dict[int, list[float]]]] = {}
    pooled: dict[tuple[str, str, int, str], dict[str, float]] = {}
    for (group, structure, method, k, seed), value in seeds.items():
        members.setdefault(group, set()).add(structure)
        curves.setdefault(structure, {}).setdefault(method, {}).setdefault(k, []).append(value)
        pooled.setdefault((group, method, k, seed), {})[structure] = value
    # a method enters a group's mean only with every structure of the group; groups never mix
    means: dict[str, dict[str, dict[int, list[float]]]] = {}
    for (group, method, k, _), values in pooled.items():
        if set(values) == members[group]:
            panel = f"mean over {group} structures" if group else "mean over structures"
            means.setdefault(panel, {}).setdefault(method, {}).setdefault(k, []).append(
                float(np.nanmean(list(values.values())))
            )
    tables = "".join(_mean_table(panel, by_method) for panel, by_method in means.items())
    png = figures.dice_vs_k_figure({**means, **curves})
    return (
        f"<section><h2>Benchmark: Dice against support size</h2><p class='note'>{html.escape(str(path))}: "
        "mean ± standard deviation over seeds (per seed, Dice averaged over the structures of a group in "
        "the mean tables and panels; a method without every structure of a group is left out of its mean, "
        f"and groups are never averaged together).</p>{tables}{_img(png, 'Dice against k')}</section>"
    )


def _mean_table(panel: str, by_method: Mapping[str, Mapping[int, Sequence[float]]]) -> str:
    ks = sorted({k for by_k in by_method.values() for k in by_k})
    head = "".join(f"<th>k = {k}</th>" for k in ks)
    body = []
    for method, by_k in by_method.items():
        cells = []
        for k in ks:
            v = np.asarray(by_k.get(k, []), dtype=float)
            text = (
                "–"
                if v.size == 0
                else f"{np.nanmean(v):.3f}" + (f" ± {np.nanstd(v, ddof=1):.3f}" if v.size > 1 else "")
            )
            cells.append(f"<td>{text}</td>")
        body.append(f"<tr><td class='name'>{html.escape(method)}</td>{''.join(cells)}</tr>")
    return (
        f"<h3>{html.escape(panel.capitalize())}</h3><table><thead><tr><th>Method</th>{head}</tr></thead>"
        f"<tbody>{''.join(body)}</tbody></table>"
    )


_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;color:#1d2733;background:#f4f6f9}
header{background:#1f4e79;color:#fff;padding:18px 32px}header h1{margin:0;font-size:24px}
dl.meta{display:flex;flex-wrap:wrap;gap:4px 24px;margin:8px 0 0;font-size:13px;opacity:.9}
dl.meta dt{font-weight:600}dl.meta dd{margin:0 0 0 4px}dl.meta div{display:flex}
main{padding:8px 32px 32px;max-width:1200px}
section{background:#fff;border-radius:6px;padding:12px 20px 18px;margin:18px 0;box-shadow:0 1px 3px rgba(0,0,0,.12)}
h2{font-size:19px;color:#1f4e79;border-bottom:1px solid #dde3ea;padding-bottom:6px}h3{font-size:15px;margin:18px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{padding:5px 10px;border-bottom:1px solid #e6eaef;text-align:right}
th{background:#eef2f6;text-align:center}td.name{text-align:left;font-weight:600}
td.good{background:#e3f4e8}td.fair{background:#fff4d6}td.poor{background:#fde2e0}
.muted{color:#7a8794}.note{color:#55606b;font-size:13px}img{max-width:100%;height:auto;display:block;margin:8px 0}
summary{cursor:pointer;color:#1f4e79;font-weight:600}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;vertical-align:-1px}
table.facts{font-size:14px}th.fact{background:none;text-align:left;vertical-align:top;white-space:nowrap;color:#1f4e79}
td.fact{text-align:left;line-height:1.5}ul.note li{margin:4px 0}
"""


def _page(title: str, meta: Sequence[tuple[str, str]], sections: Sequence[str]) -> str:
    items = "".join(f"<div><dt>{html.escape(k)}:</dt><dd>{html.escape(v)}</dd></div>" for k, v in meta)
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<meta name='viewport' content='width=device-width, initial-scale=1'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><header><h1>{html.escape(title)}</h1><dl class='meta'>{items}</dl>"
        f"</header><main>{''.join(sections)}</main></body></html>\n"
    )
