"""fseft report: a self-contained HTML page from an evaluation and a benchmark, checked in a real browser."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from fseft.benchmark import Cell, CellCost, CellResult, MetricRow
from fseft.cli import main
from fseft.data.image import Image
from fseft.data.io import write_image
from fseft.errors import ConfigError, DataError
from fseft.report import build_report, find_overlay_cases
from fseft.report.benchmark_page import build_benchmark_report
from fseft.report.figures import _to_ras, _view
from fseft.report.groups import summarise_group
from fseft.report.snapshots import load_snapshot, save_snapshot, take_snapshot

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
# LPS-oriented, anisotropic grid (as DICOM-derived files often are)
AFFINE = np.array([[-1.5, 0, 0, 60.0], [0, -1.5, 0, 50.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1]])
NAMES = {1: "liver", 2: "spleen"}


def write_cases(root: Path, n: int = 2) -> None:
    """CTs with two organs, references, and shifted predictions (Dice decreasing with the case index)."""
    shape = (64, 56, 24)
    ijk = np.indices(shape).transpose(1, 2, 3, 0).astype(float)
    rng = np.random.default_rng(0)
    for c in range(n):
        ct = rng.normal(40.0, 15.0, shape).astype(np.float32)
        body = (((ijk[..., :2] - [32, 28]) / [30, 24]) ** 2).sum(-1) < 1
        ct[~body] = -1000.0
        gt = np.zeros(shape, np.uint8)
        gt[(((ijk - [20, 24, 12]) / [9, 10, 6]) ** 2).sum(-1) < 1] = (
            1  # liver (array -x side = patient's right)
        )
        gt[(((ijk - [46, 30, 12]) / [5, 6, 4]) ** 2).sum(-1) < 1] = 2
        ct[gt == 1] += 60.0
        ct[gt == 2] += 30.0
        pred = np.roll(gt, c + 1, axis=1)
        write_image(Image(ct, AFFINE), root / "images" / f"case{c}.nii.gz")
        write_image(Image(gt, AFFINE), root / "gt" / f"case{c}.nii.gz")
        write_image(Image(pred, AFFINE), root / "pred" / f"case{c}.nii.gz")
    for side in ("gt", "pred"):
        (root / side / "labels.json").write_text(json.dumps({str(k): v for k, v in NAMES.items()}))


def write_benchmark(path: Path) -> dict[tuple[str, int], list[float]]:
    """Rows method, k, seed, structure, dice; returns the per-seed structure-mean Dice per (method, k)."""
    expected: dict[tuple[str, int], list[float]] = {}
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "k", "seed", "structure", "dice", "hd95_mm"])
        for m, method in enumerate(("linear-probe", "lora")):
            for k in (1, 5, 10):
                for seed in range(3):
                    values = [0.4 + 0.1 * m + 0.03 * k + 0.01 * seed + 0.02 * s for s in range(2)]
                    for structure, value in zip(("liver", "spleen"), values, strict=True):
                        writer.writerow([method, k, seed, structure, value, 5.0])
                    expected.setdefault((method, k), []).append(float(np.mean(values)))
    return expected


@pytest.fixture
def evaluated(tmp_path: Path) -> Path:
    write_cases(tmp_path)
    assert (
        main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--out", str(tmp_path / "eval")]) == 0
    )
    return tmp_path


def embedded_pngs(page: str) -> list[np.ndarray]:
    blobs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [np.asarray(PILImage.open(io.BytesIO(base64.b64decode(b)))) for b in blobs]


def test_report_is_self_contained_and_complete(evaluated: Path) -> None:
    root = evaluated
    expected = write_benchmark(root / "bench.csv")
    out = root / "report.html"
    assert main(["report", "--eval", str(root / "eval"), "--images", str(root / "images"),
                 "--benchmark", str(root / "bench.csv"), "--out", str(out)]) == 0  # fmt: skip
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"(src|href)=[\"'](?!data:)", page)  # nothing loaded from elsewhere
    assert "<script" not in page and "<link" not in page and "http" not in page.replace("http-equiv", "")
    pngs = embedded_pngs(page)
    assert len(pngs) == 1 + 2 + 1  # box plots, two cases, Dice-vs-k
    assert all(p.std() > 10 for p in pngs)  # none blank
    for name in ("Summary", "liver", "spleen", "case0", "case1", "linear-probe", "lora", "k = 10"):
        assert name in page
    assert page.index("case1</h3>") < page.index("case0</h3>")  # worst case (larger shift) first
    lora10 = expected[("lora", 10)]
    assert f"{np.mean(lora10):.3f} ± {np.std(lora10, ddof=1):.3f}" in page
    summary = list(csv.DictReader((root / "eval" / "metrics_summary.csv").open()))
    liver_dice = next(r for r in summary if r["structure"] == "liver" and r["metric"] == "dice")
    assert f"{float(liver_dice['mean']):.3g}" in page


def test_overwrite_rule_and_bad_inputs(evaluated: Path, capsys) -> None:
    root = evaluated
    out = root / "report.html"
    assert main(["report", "--eval", str(root / "eval"), "--max-cases", "0", "--out", str(out)]) == 0
    before = out.read_text(encoding="utf-8")
    capsys.readouterr()
    assert main(["report", "--eval", str(root / "eval"), "--out", str(out)]) == 2
    assert "report.html: already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == before
    with pytest.raises(ConfigError, match="nothing to report"):
        build_report(out=root / "empty.html")
    bad = root / "bad.csv"
    bad.write_text("method,k,dice\nlora,1,0.5\n")
    with pytest.raises(DataError, match=r"bad.csv: missing column\(s\) seed, structure"):
        build_report(benchmark_csv=bad, out=root / "b.html")
    with pytest.raises(DataError, match="metrics_per_case.csv: file not found"):
        build_report(evaluation_dir=root / "nowhere", out=root / "c.html")
    assert not (root / "b.html").exists() and not (root / "c.html").exists()
    with pytest.raises(ConfigError, match="--images"):
        find_overlay_cases(root / "pred", root / "gt")


def test_views_follow_the_radiological_convention() -> None:
    volume = np.zeros((10, 8, 6))
    volume[1, 4, 3] = 1.0  # array axis 0 runs to the patient's LEFT here (LPS): index 1 is on the right
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    ras = _to_ras(volume, lps)
    axial = _view(ras, "axial", (0, 0, 3))
    row, col = np.argwhere(axial)[0]
    assert col < axial.shape[1] / 2  # patient's right on the image's left


def render(page: Path, tmp_path: Path, height: int) -> tuple[np.ndarray, str]:
    """Screenshot (grey levels) and DOM of ``page`` in headless Chromium, with no page errors."""
    shot = tmp_path / f"{page.stem}.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]  # fmt: skip
    run = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", f"--window-size=1280,{height}", page.resolve().as_uri()],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    errors = [ln for ln in run.stderr.splitlines() if "Uncaught" in ln or ("CONSOLE" in ln and "ERROR" in ln)]
    assert not errors, errors
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.resolve().as_uri()],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)  # fmt: skip
    return np.asarray(PILImage.open(shot).convert("L"), dtype=float), dom.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(evaluated: Path, tmp_path: Path) -> None:
    root = evaluated
    write_benchmark(root / "bench.csv")
    cases = find_overlay_cases(root / "pred", root / "gt", images=root / "images")
    out = build_report(root / "eval", root / "bench.csv", cases, root / "report.html")
    pixels, dom = render(out, tmp_path, 2000)
    assert pixels.shape == (2000, 1280) and pixels.std() > 20
    assert "Benchmark: Dice against support size" in dom
    assert dom.count("<img") == 4
    # the benchmark's page: the query case drawn with every method's prediction, and the cost columns
    cells = bench_cells()
    write_snapshots(root / "snapshots", cells)
    page = build_benchmark_report(cells, root / "bench.html", snapshots=root / "snapshots")
    pixels, dom = render(page, tmp_path, 3000)
    assert pixels.shape == (3000, 1280) and pixels.std() > 20
    images = re.findall(r"<img [^>]*alt=\"([^\"]*)\"", dom)
    assert "query case q0: liver predictions" in images and len(images) == 5
    heads = re.findall(r"<th[^>]*>([^<]*)</th>", dom)
    assert all(any(h.startswith(c) for h in heads) for c in COST_HEADS)


# --- the benchmark's page ------------------------------------------------------------------------

COST_HEADS = ("trainable parameters", "adapter size", "adaptation time", "peak memory")


def bench_cell(task: str, group: str, label: str, k: int, seed: int, dice: tuple[float, ...],
               *, k_independent: bool = False) -> CellResult:  # fmt: skip
    """A finished cell with one metric row per query case (``dice`` in case order)."""
    tasks, methods = ("liver", "spleen", "duodenum"), ("zero-shot", "lora")
    cell = Cell(task, group, tasks.index(task), methods.index(label), label, k, False, seed)
    rows = tuple(MetricRow(f"q{i}", task, d, 10.0 * (1 - d), d, 1.0, 1.0, "") for i, d in enumerate(dice))
    cost = CellCost(0 if k_independent else 1000 * k, 2048, 2**28, "cpu-peak-rss", 0.5 + k, "cpu", 2.0 + k, "test")
    return CellResult(cell, label, "frozen", False, k_independent, "0" * 16,
                      {"model": "tiny.pt", "task": {"structures": [task], "pool": ["p0"], "queries": ["q0", "q1"]},
                       "train": {"max_epochs": 5}, "predict": {}}, {"lr": None if k_independent else 1e-3},
                      cost, rows)  # fmt: skip


def bench_cells() -> list[CellResult]:
    """Base group (liver, spleen) and novel group (duodenum); zero-shot ran on liver only."""
    cells = [bench_cell("liver", "base", "zero-shot", 1, 0, (0.9, 0.8), k_independent=True)]
    for seed in (0, 1):
        for k in (1, 5):
            cells.append(bench_cell("liver", "base", "lora", k, seed, (0.5 + 0.05 * k + 0.01 * seed, 0.6)))
            cells.append(bench_cell("spleen", "base", "lora", k, seed, (0.3 + 0.02 * k, 0.4 + 0.01 * seed)))
            cells.append(bench_cell("duodenum", "novel", "lora", k, seed, (0.1 * k, 0.2)))
    return cells


def test_a_method_missing_from_a_group_never_enters_its_mean() -> None:
    cells = bench_cells()
    base = summarise_group(cells, "base")
    assert base.tasks == ("liver", "spleen") and base.columns == ("1", "5")
    assert [r.label for r in base.methods] == ["lora"] and base.incomplete == ("zero-shot",)
    lora = base.methods[0]
    per_seed = [np.mean([np.mean([0.5 + 0.25 + 0.01 * s, 0.6]), np.mean([0.3 + 0.1, 0.4 + 0.01 * s])])
                for s in (0, 1)]  # fmt: skip
    stat = lora.scores[("dice", "5")]
    assert stat.n == 2 and stat.mean == pytest.approx(np.mean(per_seed))
    assert stat.std == pytest.approx(np.std(per_seed, ddof=1))
    novel = summarise_group(cells, "novel")  # base values never leak into the novel mean
    assert novel.tasks == ("duodenum",) and novel.incomplete == ()
    assert novel.methods[0].scores[("dice", "5")].mean == pytest.approx(np.mean([0.5, 0.2]))
    assert lora.adapt_s == {"1": 1.5, "5": 5.5}
    assert lora.per_case["1"] == pytest.approx((0.55, 0.6, 0.56, 0.6, 0.32, 0.4, 0.32, 0.41))
    # with zero-shot on every base task it has a row, shown under every k
    full = [*cells, bench_cell("spleen", "base", "zero-shot", 1, 0, (0.7, 0.7), k_independent=True)]
    zero = summarise_group(full, "base").methods[0]
    assert zero.label == "zero-shot" and zero.scores[("dice", "1")] == zero.scores[("dice", "5")]
    assert zero.scores[("dice", "5")].mean == pytest.approx(np.mean([0.85, 0.7]))


def test_benchmark_csv_report_keeps_groups_apart(tmp_path: Path) -> None:
    path = tmp_path / "per_seed.csv"
    path.write_text("group,method,k,seed,structure,dice\nbase,zero-shot,1,0,liver,0.8\n"
                    "base,lora,1,0,liver,0.6\nbase,lora,1,0,spleen,0.4\nnovel,lora,1,0,duodenum,0.2\n")  # fmt: skip
    page = build_report(benchmark_csv=path, out=tmp_path / "r.html").read_text(encoding="utf-8")
    base = page[page.index("Mean over base structures") : page.index("Mean over novel structures")]
    assert "zero-shot" not in base and "<td>0.500</td>" in base  # (0.6 + 0.4) / 2, never with 0.2
    novel = page[page.index("Mean over novel structures") :]
    assert "<td>0.200</td>" in novel and "0.8" not in novel.split("<img")[0]


def write_snapshots(folder: Path, cells: list[CellResult]) -> None:
    """A query snapshot per cell: a CT with a bright box (the reference) and a shifted prediction."""
    shape = (40, 36, 30)
    ct = np.full(shape, 40.0, np.float32)
    ct[12:26, 10:24, 8:20] = 120.0
    reference = np.zeros(shape, bool)
    reference[12:26, 10:24, 8:20] = True
    for i, d in enumerate(cells):
        pred = np.roll(reference, i % 4, axis=0).astype(np.uint8)
        snap = take_snapshot("q0", Image(ct, AFFINE), {d.cell.task: reference}, pred, (d.cell.task,))
        save_snapshot(snap, folder / f"{d.cell_id}.npz")


def test_benchmark_page_tells_the_story(tmp_path: Path) -> None:
    cells = bench_cells()
    write_snapshots(tmp_path / "snapshots", cells)
    snap = load_snapshot(tmp_path / "snapshots" / f"{cells[0].cell_id}.npz")
    assert snap.case == "q0" and snap.structures == ("liver",) and set(snap.ct) == {"axial", "coronal"}
    assert snap.reference["axial"].any() and snap.aspect["coronal"] == pytest.approx(2.0)  # 3 mm / 1.5 mm
    out = build_benchmark_report(cells, tmp_path / "report.html", snapshots=tmp_path / "snapshots",
                                 files=["results.md"], title="demo")  # fmt: skip
    page = out.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)=[\"'](?!data:)", page) and "<script" not in page
    for text in ("What was run", "How to read this page", "Base structures (liver, spleen)",
                 "Novel structures (duodenum)", "max_epochs 5 (the paper's: 200)", *COST_HEADS):  # fmt: skip
        assert text in page, text
    base = page[page.index("Base structures") : page.index("Novel structures")]
    assert "Left out (not run on every task of the group): zero-shot" in base
    assert "<td>3,000</td>" in base and "1.5 / 5.5 s" in base  # cost columns: mean parameters, time per k
    pngs = embedded_pngs(page)
    assert len(pngs) == 2 + 3 and all(p.std() > 10 for p in pngs)  # group figures, one grid per task
    for task in ("liver", "spleen", "duodenum"):
        assert f'alt="query case q0: {task} predictions"' in page


def test_benchmark_page_without_snapshots_says_so(tmp_path: Path) -> None:
    page = build_benchmark_report(bench_cells(), tmp_path / "r.html").read_text(encoding="utf-8")
    assert "No query snapshots were kept" in page and len(embedded_pngs(page)) == 2
