"""fseft predict: geometry back to the input grid, output layouts, overwrite rule, TTA, largest CC, slabs."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from fseft.cli import main
from fseft.config import PreprocessConfig
from fseft.data.image import Image
from fseft.data.io import read_image, write_image
from fseft.errors import ConfigError, DataError
from fseft.evaluation.files import read_labels_json
from fseft.inference import (
    OutputConfig,
    PredictConfig,
    find_inputs,
    predict_files,
    predict_image,
)
from fseft.inference.postprocess import grid_mapping, keep_largest_component, label_map
from fseft.models import MODELS, FoundationModel, ModelConfig, register_model_spec

PRE = PreprocessConfig(spacing=(6.0, 6.0, 6.0), roi=(32, 32, 32))  # coarse: few windows on real CT
# LPS-like, axes permuted and anisotropic: array axes point to -y (1.5 mm), -z (2.5 mm), +x (1.2 mm).
AFFINE = np.array([[0, 0, 1.2, -50.0], [-1.5, 0, 0, 40.0], [0, -2.5, 0, 30.0], [0, 0, 0, 1]])


class Oracle(FoundationModel):
    """Segments 'bright' voxels (windowed intensity above 0.8, i.e. > ~165 HU): geometry can be checked."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (50.0 * (x - 0.8)).repeat(1, len(self.structures), 1, 1, 1)


class Ramp(FoundationModel):
    """Logits that rise along the first window axis: not flip-equivariant (to test TTA)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(-4.0, 4.0, x.shape[2]).view(1, 1, -1, 1, 1)
        return ramp.expand(x.shape[0], 1, *x.shape[2:]).clone()


def make_oracle(structures=("liver",), spacing=(2.0, 2.0, 2.0)) -> Oracle:
    return Oracle(ModelConfig(arch="unet-small", feature_size=4, structures=structures,
                              preprocess=PreprocessConfig(spacing=spacing, roi=(32, 32, 32))))  # fmt: skip


def tiny_model() -> FoundationModel:
    torch.manual_seed(0)
    return FoundationModel(
        ModelConfig(arch="unet-small", feature_size=4, structures=("liver", "spleen"), preprocess=PRE)
    )


@pytest.fixture(scope="module", autouse=True)
def registered_models() -> None:
    if "oracle.test" not in MODELS:
        register_model_spec("oracle.test", make_oracle, "intensity-threshold oracle")
    if "tiny.test" not in MODELS:
        register_model_spec("tiny.test", tiny_model, "random tiny UNet")


def phantom(shape=(50, 40, 30), blob: bool = False) -> tuple[Image, np.ndarray]:
    """A body (0 HU) in air holding a bright ellipsoid (300 HU); returns the image and the object mask."""
    array = np.full(shape, -1000.0, dtype=np.float32)
    array[2:-2, 3:-3, 2:-2] = 0.0
    ijk = np.indices(shape).transpose(1, 2, 3, 0).astype(float)
    spacing = np.linalg.norm(AFFINE[:3, :3], axis=0)
    obj = (((ijk - np.array([22, 22, 14])) * spacing) ** 2).sum(-1) < 11.0**2
    array[obj] = 300.0
    if blob:
        array[40:44, 5:8, 24:27] = 300.0  # a small separate bright blob
    return Image(array, AFFINE.copy()), obj


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_oracle_prediction_lands_on_the_object_in_a_non_ras_grid() -> None:
    image, obj = phantom()
    calls: list[tuple[int, int]] = []
    pred = predict_image(
        make_oracle(), image, config=PredictConfig(device="cpu"), progress=lambda d, t: calls.append((d, t))
    )
    assert pred.label.shape == image.shape and np.array_equal(pred.label.affine, image.affine)
    assert pred.label.array.dtype == np.uint8 and set(np.unique(pred.label.array)) <= {0, 1}
    assert dice(pred.label.array == 1, obj) > 0.95
    assert pred.structures == ("liver",) and pred.probabilities is None
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1][0] == calls[-1][1] > 0


def test_tta_averages_flips_and_keeps_an_equivariant_prediction() -> None:
    image, obj = phantom()
    cfg = PredictConfig(device="cpu", tta=True, probabilities=True)
    pred = predict_image(make_oracle(), image, config=cfg)
    assert dice(pred.label.array == 1, obj) > 0.95
    # a ramp along the window's first axis: averaged over flips it becomes symmetric along that axis
    ramp = Ramp(ModelConfig(arch="unet-small", feature_size=4, structures=("liver",),
                            preprocess=PreprocessConfig(spacing=(2.0, 2.0, 2.0), roi=(64, 64, 64), crop_foreground=False)))  # fmt: skip
    flat = Image(np.zeros((32, 32, 32), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    plain = predict_image(ramp, flat, config=PredictConfig(device="cpu", probabilities=True)).probabilities[
        "liver"
    ]
    tta = predict_image(
        ramp, flat, config=PredictConfig(device="cpu", probabilities=True, tta=True)
    ).probabilities["liver"]
    assert plain.array[0].mean() < 0.3 and plain.array[-1].mean() > 0.7
    np.testing.assert_allclose(tta.array, tta.array[::-1], atol=1e-5)
    np.testing.assert_allclose(tta.array, 0.5, atol=1e-4)  # sigmoid(r) + sigmoid(-r) = 1


class Sided(FoundationModel):
    """Channel 0 on the +x half of the model grid, channel 1 on the -x half: a left/right-aware model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = torch.linspace(-4.0, 4.0, x.shape[2]).view(1, 1, -1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return torch.cat([side, -side, side.abs() - 10.0][: len(self.structures)], dim=1)


@pytest.mark.parametrize("structures", [("parotid_right", "parotid_left", "mandible"), ("parotid_right", "brainstem")])
def test_tta_left_right_flips_keep_paired_structures_on_their_side(structures: tuple[str, ...]) -> None:
    model = Sided(ModelConfig(arch="unet-small", feature_size=4, structures=structures,
                              preprocess=PreprocessConfig(spacing=(2.0, 2.0, 2.0), roi=(32, 32, 32), crop_foreground=False)))  # fmt: skip
    flat = Image(np.zeros((32, 32, 32), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    plain = predict_image(model, flat, config=PredictConfig(device="cpu", probabilities=True)).probabilities
    tta = predict_image(model, flat, config=PredictConfig(device="cpu", probabilities=True, tta=True)).probabilities
    # a flipped pass maps the left channel back onto the right structure (both pairs present), or is
    # skipped (a structure without its pair): either way the sides survive, instead of averaging to 0.5
    for name in structures:
        np.testing.assert_allclose(tta[name].array, plain[name].array, atol=1e-5)
    assert plain["parotid_right"].array[-1].mean() > 0.9 and plain["parotid_right"].array[0].mean() < 0.1


def test_largest_cc_removes_a_spurious_blob() -> None:
    image, obj = phantom(blob=True)
    plain = predict_image(make_oracle(), image, config=PredictConfig(device="cpu")).label.array
    cleaned = predict_image(
        make_oracle(), image, config=PredictConfig(device="cpu", largest_cc=True)
    ).label.array
    assert plain[41:43, 6, 25].all()  # the blob is predicted...
    assert not cleaned[40:44, 5:8, 24:27].any()  # ...and removed by largest-cc
    assert ndimage.label(cleaned == 1)[1] == 1
    assert np.all((cleaned == 1) <= (plain == 1))  # only removes
    assert dice(cleaned == 1, obj) > 0.95


def test_keep_largest_component_per_value() -> None:
    label = np.zeros((10, 10, 10), np.uint8)
    label[0:4, 0:4, 0:4] = 1
    label[8, 8, 8] = 1
    label[6:9, 0:2, 0:2] = 2
    label[0, 9, 0] = 2
    out = keep_largest_component(label.copy(), [1, 2])
    assert out[8, 8, 8] == 0 and out[0, 9, 0] == 0
    assert (out == 1).sum() == 64 and (out == 2).sum() == 12


def _naive_labels(probs: np.ndarray, mapping: np.ndarray, shape, multiclass: bool) -> np.ndarray:
    """Reference: interpolate every channel over the whole input grid at once, then decide."""
    padded = np.pad(probs, [(0, 0)] + [(1, 1)] * 3, mode="edge")
    shift = np.eye(4)
    shift[:3, 3] = 1.0
    m = shift @ mapping
    full = np.stack([ndimage.affine_transform(p, m[:3, :3], offset=m[:3, 3], output_shape=shape, order=1,
                                              mode="constant", cval=0.0) for p in padded])  # fmt: skip
    if multiclass:
        return np.argmax(full, axis=0).astype(np.uint8)
    best = np.argmax(full, axis=0)
    return np.where(full.max(axis=0) > 0.5, best + 1, 0).astype(np.uint8)


@pytest.mark.parametrize("multiclass", [False, True])
def test_slab_resampling_equals_whole_volume_resampling(multiclass: bool) -> None:
    rng = np.random.default_rng(1)
    channels = 4 if multiclass else 3
    logits = ndimage.gaussian_filter(rng.normal(size=(channels, 18, 16, 20)), sigma=(0, 2, 2, 2)) * 8
    if multiclass:
        probs = torch.from_numpy(logits).softmax(0).numpy().astype(np.float32)
    else:
        probs = (1 / (1 + np.exp(-logits))).astype(np.float32)
    model_affine = np.diag([3.0, 3.0, 3.0, 1.0])
    model_affine[:3, 3] = [-20, -18, -25]
    input_affine = AFFINE.copy()
    shape = (60, 24, 55)  # covers more than the model grid along some axes: outside is background
    mapping = grid_mapping(model_affine, input_affine)
    whole = label_map(probs, mapping, shape, multiclass=multiclass, chunk=1000)
    slabs = label_map(probs, mapping, shape, multiclass=multiclass, chunk=4)
    assert np.array_equal(whole, slabs)
    assert np.array_equal(whole, _naive_labels(probs, mapping, shape, multiclass))
    assert len(np.unique(whole)) == channels + (0 if multiclass else 1)


def test_chunked_prediction_equals_unchunked_on_a_larger_volume() -> None:
    image, obj = phantom(shape=(90, 64, 80))
    a = predict_image(
        make_oracle(spacing=(3.0, 3.0, 3.0)), image, config=PredictConfig(device="cpu", chunk=3)
    )
    b = predict_image(
        make_oracle(spacing=(3.0, 3.0, 3.0)), image, config=PredictConfig(device="cpu", chunk=1000)
    )
    assert np.array_equal(a.label.array, b.label.array)
    assert dice(a.label.array == 1, obj) > 0.9


def test_adapted_multiclass_model_predicts_its_structures() -> None:
    from fseft.adapt import apply_method

    adapted = apply_method(
        tiny_model(), "linear-probe", ["liver", "gallbladder", "new_organ"], task="multiclass"
    )
    image, _ = phantom()
    pred = predict_image(adapted, image, config=PredictConfig(device="cpu"))
    assert pred.structures == ("liver", "gallbladder", "new_organ")
    assert pred.label.shape == image.shape and pred.label.array.max() <= 3


def run_cli(*args: str | Path) -> int:
    return main([str(a) for a in args])


@pytest.fixture
def phantom_file(tmp_path: Path) -> tuple[Path, np.ndarray]:
    image, obj = phantom()
    path = tmp_path / "in" / "case1.nii.gz"
    write_image(image, path)
    return path, obj


def test_cli_writes_labelmap_and_labels_json_that_evaluate_reads(
    tmp_path: Path, phantom_file, capsys
) -> None:
    path, obj = phantom_file
    out = tmp_path / "out"
    assert run_cli("predict", path, "--model", "oracle.test", "--out", out, "--device", "cpu") == 0
    written = nib.load(out / "case1.nii.gz")
    assert written.shape == obj.shape and np.allclose(written.affine, AFFINE, atol=1e-4)
    assert written.get_data_dtype() == np.uint8
    assert json.loads((out / "labels.json").read_text(encoding="utf-8")) == {"1": "liver"}
    assert read_labels_json(out / "labels.json") == {1: "liver"}
    assert dice(np.asarray(written.dataobj) == 1, obj) > 0.95
    gt = tmp_path / "gt"
    write_image(Image(obj.astype(np.uint8), AFFINE), gt / "case1.nii.gz")
    (gt / "labels.json").write_text('{"1": "liver"}')
    assert run_cli("evaluate", out, gt, "--out", tmp_path / "metrics") == 0
    rows = (tmp_path / "metrics" / "metrics_per_case.csv").read_text(encoding="utf-8").splitlines()
    assert rows[1].startswith("case1,liver,") and float(rows[1].split(",")[2]) > 0.95


def test_cli_refuses_to_overwrite_before_computing(tmp_path: Path, phantom_file, capsys, monkeypatch) -> None:
    path, _ = phantom_file
    out = tmp_path / "out"
    assert run_cli("predict", path, "--model", "oracle.test", "-o", out, "--device", "cpu") == 0
    before = (out / "case1.nii.gz").stat().st_mtime_ns
    import fseft.inference.writer as writer

    monkeypatch.setattr(writer, "predict_image", lambda *a, **k: pytest.fail("computed before the check"))
    capsys.readouterr()
    assert run_cli("predict", path, "--model", "oracle.test", "-o", out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fseft: error:") and "case1.nii.gz: already exists" in err[0]
    assert (out / "case1.nii.gz").stat().st_mtime_ns == before
    monkeypatch.undo()
    assert (
        run_cli("predict", path, "--model", "oracle.test", "-o", out, "--overwrite", "--device", "cpu") == 0
    )


@pytest.mark.parametrize("problem", ["missing", "unreadable", "unknown-model"])
def test_cli_bad_inputs_give_one_line_and_no_output(
    tmp_path: Path, phantom_file, problem: str, capsys
) -> None:
    path, _ = phantom_file
    model = "oracle.test"
    if problem == "missing":
        path = tmp_path / "nope.nii.gz"
    elif problem == "unreadable":
        path = tmp_path / "bad.nii.gz"
        path.write_bytes(b"this is not a nifti file at all" * 20)
    else:
        model = "no-such-model"
    out = tmp_path / "out"
    assert run_cli("predict", path, "--model", model, "-o", out, "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fseft: error:")
    assert {
        "missing": "nope.nii.gz: file not found",
        "unreadable": "bad.nii.gz",
        "unknown-model": "unknown model",
    }[problem] in err[0]
    assert not out.exists() or not any(out.rglob("*"))


def test_cli_masks_and_probabilities(tmp_path: Path, phantom_file) -> None:
    path, obj = phantom_file
    out = tmp_path / "out"
    assert (
        run_cli(
            "predict",
            path,
            "--model",
            "oracle.test",
            "-o",
            out,
            "--format",
            "masks",
            "--probabilities",
            "--device",
            "cpu",
        )
        == 0
    )
    mask = read_image(out / "case1" / "liver.nii.gz", dtype=None)
    assert mask.array.dtype == np.uint8 and dice(mask.array == 1, obj) > 0.95
    assert not (out / "case1.nii.gz").exists() and not (out / "labels.json").exists()
    prob = nib.load(out / "case1_probabilities" / "liver.nii.gz")
    assert prob.get_data_dtype() == np.uint8
    values = prob.get_fdata()
    assert 0.0 <= values.min() and values.max() <= 1.0 + 1e-6
    assert values[obj].mean() > 0.9 and values[~obj].mean() < 0.05


def test_find_inputs_tells_folders_dicom_and_manifests_apart(tmp_path: Path, phantom_file) -> None:
    path, _ = phantom_file
    write_image(read_image(path), path.parent / "case2.nii")
    assert [i.name for i in find_inputs([path.parent])] == ["case1", "case2"]
    manifest = tmp_path / "cases.csv"
    manifest.write_text(f"case_id,image\nA,{path}\n")
    assert [(i.name, i.path) for i in find_inputs([manifest])] == [("A", path)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        find_inputs([tmp_path / "empty"])
    with pytest.raises(DataError, match="case name 'case1'"):
        find_inputs([path, path])
    with pytest.raises(ConfigError, match="already exists"):
        out = tmp_path / "o"
        write_image(read_image(path), out / "case1.nii.gz")
        predict_files(make_oracle(), [path], OutputConfig(out))


@pytest.mark.slow
def test_real_ct_and_dicom_come_back_on_their_own_grid(abdomen_dir: Path, tmp_path: Path) -> None:
    ct = abdomen_dir / "ts_abdomen" / "ct.nii.gz"
    dicom = abdomen_dir / "ts_dicom_slab" / "dicom"
    inputs = find_inputs([ct, dicom])
    assert [i.name for i in inputs] == ["ct", "dicom"]
    out = tmp_path / "out"
    assert (
        run_cli("predict", ct, dicom, "--model", "tiny.test", "-o", out, "--device", "cpu", "--overlap", "0")
        == 0
    )
    for source, name in ((ct, "ct"), (dicom, "dicom")):
        image = read_image(source)
        pred = read_image(out / f"{name}.nii.gz", dtype=None)
        assert pred.shape == image.shape
        assert np.allclose(pred.affine, image.affine, atol=1e-3)
        assert pred.array.max() <= 2
    direct = predict_image(tiny_model(), read_image(dicom), config=PredictConfig(device="cpu", overlap=0.0))
    assert np.array_equal(direct.label.affine, read_image(dicom).affine)
    assert np.array_equal(direct.label.array, read_image(out / "dicom.nii.gz", dtype=None).array)
    assert json.loads((out / "labels.json").read_text(encoding="utf-8")) == {"1": "liver", "2": "spleen"}
