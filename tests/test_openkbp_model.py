"""The bundled head-and-neck model segments real OpenKBP CT on the input grid (skipped without the data).

A floor well under the measured Dice (see ``fseft zoo info resunet.openkbp``): it catches a broken or
mis-loaded model, not a small regression.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from fseft.cli import main
from fseft.evaluation.files import read_labels_json
from fseft.models.bundled_models import recipe

MODEL = "resunet.openkbp"
CASES = ("pt_201", "pt_225")  # validation-pats: never seen in pre-training; all five base structures
FLOOR = {"brainstem": 0.5, "spinal_cord": 0.5, "parotid_right": 0.5, "parotid_left": 0.5, "mandible": 0.6}
OPENKBP = {"brainstem": 1, "spinal_cord": 2, "parotid_right": 3, "parotid_left": 4, "mandible": 7}


def test_bundled_openkbp_model_segments_held_out_cases_on_their_grid(openkbp_dir: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for case in CASES:
        (images / f"{case}.nii.gz").symlink_to(openkbp_dir / "images" / f"{case}.nii.gz")
    assert main(["predict", str(images), "--model", MODEL, "--out", str(tmp_path / "pred")]) == 0
    names = read_labels_json(tmp_path / "pred" / "labels.json")
    assert set(names.values()) == set(FLOOR) and set(recipe(MODEL)["structures"]) == set(FLOOR)
    for case in CASES:
        ref_img = nib.load(openkbp_dir / "labels" / f"{case}.nii.gz")
        pred_img = nib.load(tmp_path / "pred" / f"{case}.nii.gz")
        assert pred_img.shape == ref_img.shape and np.allclose(pred_img.affine, ref_img.affine)
        pred, ref = np.asarray(pred_img.dataobj), np.asarray(ref_img.dataobj)
        for value, name in names.items():
            a, b = pred == int(value), ref == OPENKBP[name]
            dice = 2 * (a & b).sum() / (a.sum() + b.sum())
            assert dice > FLOOR[name], f"{case} {name}: Dice {dice:.3f}"
