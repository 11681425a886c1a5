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

from fseft.cli import main
from fseft.data.image import Image
from fseft.data.io import write_image
from fseft.errors import ConfigError, DataError
from fseft.report import build_report, find_overlay_cases
from fseft.report.figures import _to_ras, _view

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


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(evaluated: Path, tmp_path: Path) -> None:
    root = evaluated
    write_benchmark(root / "bench.csv")
    cases = find_overlay_cases(root / "pred", root / "gt", images=root / "images")
    out = build_report(root / "eval", root / "bench.csv", cases, root / "report.html")
    shot = tmp_path / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]  # fmt: skip
    run = subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1280,2000", out.resolve().as_uri()],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    errors = [ln for ln in run.stderr.splitlines() if "Uncaught" in ln or ("CONSOLE" in ln and "ERROR" in ln)]
    assert not errors, errors
    pixels = np.asarray(PILImage.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (2000, 1280) and pixels.std() > 20
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", out.resolve().as_uri()],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120)  # fmt: skip
    assert "Benchmark: Dice against support size" in dom.stdout
    assert dom.stdout.count("<img") == 4
