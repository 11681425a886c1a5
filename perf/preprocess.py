"""Preprocessing throughput: first pass (read + resample + window + crop, written to the cache) vs cached pass.

Measured side by side in one run, on
  * the synthetic assembly (generated into a temporary folder), resampled isotropically near its native
    voxel size, and
  * a subset of OpenKBP from $FSEFT_SHARED_DATA or ../shared/data (skipped with a message when absent),
    resampled near its native spacing (4 x 4 x 2.5 mm; 1.5 mm would inflate 128^3 volumes to ~340^3).

Usage: python perf/preprocess.py [--openkbp-cases 20] [--synth-preset tiny] [--synth-cases 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from fseft.anatomy import OPENKBP_ORGANS, get_template
from fseft.config import PreprocessConfig
from fseft.data.cases import Case
from fseft.data.dataset import PreprocessedCache
from fseft.data.manifests import load_manifest
from fseft.data.synth import generate_assembly

REPO = Path(__file__).resolve().parents[1]


def shared_data() -> Path | None:
    env = os.environ.get("FSEFT_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


def native_spacing(cases: Sequence[Case]) -> float:
    """Median voxel size of the images (header only), rounded to 0.5 mm: an isotropic target near native."""
    zooms = [z for case in cases for z in nib.load(case.image).header.get_zooms()[:3]]
    return max(0.5, round(float(np.median(zooms)) * 2) / 2)


def measure(
    name: str, cases: Sequence[Case], structures: Sequence[str], cfg: PreprocessConfig, cache_dir: Path
) -> dict:
    """Time one pass that fills the cache and one that reads it back (fresh cache object, like a new run)."""
    first = PreprocessedCache(structures, cfg, cache_dir)
    start = time.perf_counter()
    shapes = [tuple(first.get(case)["image"].shape[1:]) for case in cases]
    t_first = time.perf_counter() - start
    cached = PreprocessedCache(structures, cfg, cache_dir)
    start = time.perf_counter()
    for case in cases:
        cached.get(case)
    t_cached = time.perf_counter() - start
    assert first.misses == len(cases) and cached.hits == len(cases), "cache did not serve the second pass"
    size_mb = sum(p.stat().st_size for p in cache_dir.glob("*.pt")) / 2**20
    mean_shape = "x".join(str(round(sum(s[i] for s in shapes) / len(shapes))) for i in range(3))
    return {
        "dataset": name,
        "cases": len(cases),
        "spacing": "x".join(f"{s:g}" for s in cfg.spacing),
        "shape": mean_shape,
        "first": len(cases) / t_first,
        "cached": len(cases) / t_cached,
        "cache_mb": size_mb,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--openkbp-cases", type=int, default=20, help="OpenKBP cases to preprocess")
    parser.add_argument("--synth-preset", default="tiny", help="synthetic assembly preset (tiny, default)")
    parser.add_argument("--synth-cases", type=int, default=8, help="synthetic cases")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="fseft-bench-") as tmp:
        root = Path(tmp)
        assembly = generate_assembly(root / "synth", cases=args.synth_cases, preset=args.synth_preset, seed=0)
        synth_cfg = PreprocessConfig(spacing=(native_spacing(assembly.cases),) * 3)
        synth_structures = get_template("synth").structures
        rows.append(measure("synthetic", assembly.cases, synth_structures, synth_cfg, root / "cache-synth"))

        data = shared_data()
        manifest = data / "openkbp" / "cases.csv" if data else None
        if manifest is None or not manifest.is_file():
            print("OpenKBP skipped: no shared data (set FSEFT_SHARED_DATA to the folder holding openkbp/)")
        else:
            cases = load_manifest(manifest)[: args.openkbp_cases]
            cfg = PreprocessConfig(spacing=(4.0, 4.0, 2.5))
            rows.append(measure("openkbp", cases, OPENKBP_ORGANS, cfg, root / "cache-openkbp"))

    header = f"{'dataset':<10} {'cases':>5} {'spacing mm':>12} {'mean shape':>12} {'first vol/s':>12} {'cached vol/s':>13} {'speed-up':>9} {'cache MB':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['dataset']:<10} {r['cases']:>5} {r['spacing']:>12} {r['shape']:>12} {r['first']:>12.2f} "
            f"{r['cached']:>13.2f} {r['cached'] / r['first']:>8.1f}x {r['cache_mb']:>9.1f}"
        )


if __name__ == "__main__":
    main()
