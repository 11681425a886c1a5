"""Bad input never yields a silent wrong answer, and no work is lost to an unwritable output.

Each case gives one ``fseft: error:`` line naming the file, a non-zero exit and no output, and the
clean version of the same input still works.
"""

from __future__ import annotations

import gzip
import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fseft.adapt import save_adapter
from fseft.adapt.model import apply_method
from fseft.cli import main
from fseft.config import PreprocessConfig
from fseft.data.cases import Case, LabelSource
from fseft.data.image import Image
from fseft.data.io import read_image, write_image
from fseft.data.manifests import write_manifest_csv
from fseft.data.validate import CTLimits, ct_problems, resampled_shape, validate_ct
from fseft.errors import CheckpointError, ConfigError, DataError
from fseft.models import ModelConfig, build_model, load_model, save_model

SHAPE = (40, 40, 36)
SPACING = 1.5
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


def _ct(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A body of soft tissue in air with a bright sphere (label 6 = pancreas in the synth template)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    centre = rng.integers(12, np.array(SHAPE) - 12)
    inside = ((grid - centre[:, None, None, None]) ** 2).sum(0) < 36
    hu = np.full(SHAPE, -1000.0, np.float32)
    hu[3:-3, 3:-3, 2:-2] = rng.normal(40, 20, (SHAPE[0] - 6, SHAPE[1] - 6, SHAPE[2] - 4))
    hu[inside] += 200
    return hu.astype(np.float32), (inside * 6).astype(np.uint8)


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path, zero_pixdim: int | None = None) -> Path:
    """A NIfTI file; ``zero_pixdim``: store that axis' voxel size as 0 with no sform (nibabel guesses 1 mm)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if np.linalg.det(affine) == 0:  # nibabel cannot make a qform of it: store it as the sform alone
        nifti = nib.Nifti1Image(array, None)
        nifti.header.set_sform(affine, code=1)
    else:
        nifti = nib.Nifti1Image(array, affine)
    if zero_pixdim is not None:
        nifti.set_sform(None, code=0)
        nifti.set_qform(None, code=0)
    nib.save(nifti, path)
    if zero_pixdim is not None:  # nibabel writes the zooms of the affine: patch the stored header
        raw = bytearray(gzip.decompress(path.read_bytes()))
        struct.pack_into("<f", raw, 76 + 4 * (1 + zero_pixdim), 0.0)  # pixdim[1 + axis]
        path.write_bytes(gzip.compress(bytes(raw)))
    return path


#: kind of bad CT -> (voxel change, affine, zero pixdim axis, the words the error must hold)
BAD_CTS = {
    "nan": ("nan", np.diag([SPACING] * 3 + [1.0]), None, "64 NaN voxel(s)"),
    "inf": ("inf", np.diag([SPACING] * 3 + [1.0]), None, "32 +inf and 32 -inf voxel(s)"),
    "singular-affine": (None, np.diag([SPACING, SPACING, 0.0, 1.0]), None, "affine is not invertible"),
    "zero-pixdim": (None, np.diag([SPACING] * 3 + [1.0]), 2, "affine is not invertible"),
    "spacing-1000mm": (
        None,
        np.diag([SPACING, SPACING, 1000.0, 1.0]),
        None,
        "outside the plausible CT range",
    ),
    "spacing-0.001mm": (
        None,
        np.diag([0.001, SPACING, SPACING, 1.0]),
        None,
        "outside the plausible CT range",
    ),
}


def _case_files(root: Path, name: str, kind: str | None, seed: int = 0) -> tuple[Path, Path]:
    hu, label = _ct(seed)
    affine, zero = np.diag([SPACING] * 3 + [1.0]), None
    if kind is not None:
        change, affine, zero, _ = BAD_CTS[kind]
        if change == "nan":
            hu[10:14, 10:14, 10:14] = np.nan
        elif change == "inf":
            hu[10:12, 10:14, 10:14] = np.inf
            hu[20:22, 10:14, 10:14] = -np.inf
    image = _write_nifti(hu, affine, root / f"{name}_img.nii.gz", zero)
    lab = _write_nifti(label, affine, root / f"{name}_lab.nii.gz", zero)
    return image, lab


def _manifest(root: Path, name: str, kind: str | None, n: int = 2) -> Path:
    """A manifest of ``n`` cases annotating pancreas; the first is of the given kind."""
    cases = []
    for i in range(n):
        image, label = _case_files(root, f"{name}{i}", kind if i == 0 else None, seed=i)
        cases.append(Case(f"{name}{i}", image, (LabelSource(label, "synth"),), structures=("pancreas",)))
    write_manifest_csv(cases, root / f"{name}.csv")
    return root / f"{name}.csv"


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad_input")
    torch.manual_seed(0)
    cfg = ModelConfig(arch="unet-small", feature_size=4, structures=("liver", "pancreas"),
                      preprocess=PreprocessConfig(spacing=(3.0, 3.0, 3.0), roi=(32, 32, 32)))  # fmt: skip
    model = save_model(build_model(cfg), root / "tiny.pt")
    adapted = apply_method(load_model(model), "linear-probe", ["pancreas"])
    adapter = save_adapter(adapted, root / "clean.safetensors")
    return {"root": root, "model": model, "adapter": adapter}


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FSEFT_CACHE", str(tmp_path / "cache"))


def _one_error_line(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fseft: error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _predict(ws: dict[str, Path], inputs: list[Path], out: Path, *extra: str) -> int:
    return main(["predict", *map(str, inputs), "--model", str(ws["model"]), "--out", str(out), "--device", "cpu",
                 *extra])  # fmt: skip


def _adapt(ws: dict[str, Path], manifest: Path, out: Path, *extra: str) -> int:
    return main(["adapt", "--model", str(ws["model"]), "--support", str(manifest), "--structure", "pancreas",
                 "--k", "1", "--seed", "0", "--method", "linear-probe", "--epochs", "1", "--device", "cpu",
                 "--out", str(out), *extra])  # fmt: skip


def _pretrain(ws: dict[str, Path], manifest: Path, out: Path, *extra: str) -> int:
    return main(["pretrain", "--manifest", str(manifest), "--model-arch", "unet-small", "--feature-size", "4",
                 "--spacing", "6", "6", "6", "--roi", "32", "32", "32", "--num-samples", "1", "--steps", "1",
                 "--device", "cpu", "--out", str(out), *extra])  # fmt: skip


# --- one validation step for every CT --------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BAD_CTS))
@pytest.mark.parametrize("command", ["predict", "adapt", "check-data"])
def test_bad_ct_is_refused_naming_the_file(ws, tmp_path, capsys, command: str, kind: str) -> None:
    words = BAD_CTS[kind][3]
    bad, clean = _manifest(tmp_path, "bad", kind), _manifest(tmp_path, "clean", None)
    bad_image = tmp_path / "bad0_img.nii.gz"
    out = tmp_path / "out"
    if command == "predict":
        assert _predict(ws, [bad_image], out) == 2
        _one_error_line(capsys, str(bad_image), words)
        assert not _files(out)
        assert _predict(ws, [tmp_path / "clean0_img.nii.gz"], out) == 0
        assert (out / "clean0_img.nii.gz").is_file()
    elif command == "adapt":
        adapter = out / "a.safetensors"
        assert _adapt(ws, bad, adapter) == 2
        _one_error_line(capsys, str(bad_image), words)
        assert not _files(out)
        assert _adapt(ws, clean, adapter) == 0
        assert adapter.is_file() and (out / "a.record.json").is_file()
    else:
        assert main(["check-data", str(bad), "--json", str(out / "r.json")]) == 1
        problems = json.loads((out / "r.json").read_text(encoding="utf-8"))["problems"]
        errors = [p for p in problems if p["severity"] == "error"]
        assert len(errors) == 1 and errors[0]["path"] == str(bad_image) and words in errors[0]["message"]
        assert main(["check-data", str(clean)]) == 0


def test_bad_ct_is_refused_by_pretrain(ws, tmp_path, capsys) -> None:
    bad = _manifest(tmp_path, "bad", "nan")
    assert _pretrain(ws, bad, tmp_path / "run") == 2
    _one_error_line(capsys, str(tmp_path / "bad0_img.nii.gz"), "NaN voxel(s)")
    assert not (tmp_path / "run" / "model.pt").exists() and not (tmp_path / "run" / "checkpoint.pt").exists()
    assert _pretrain(ws, _manifest(tmp_path, "clean", None), tmp_path / "run2") == 0
    assert (tmp_path / "run2" / "model.pt").is_file()


def test_limits_are_overridable_and_the_resampled_size_is_bounded(monkeypatch) -> None:
    hu, _ = _ct(0)
    coarse = Image(hu, np.diag([SPACING, SPACING, 25.0, 1.0]), Path("coarse.nii.gz"))
    assert "outside the plausible CT range 0.1-20 mm" in ct_problems(coarse)[0]
    monkeypatch.setenv("FSEFT_SPACING_RANGE", "0.1,30")
    assert ct_problems(coarse) == []
    # resampled size: 40 x 40 x 36 voxels of 1.5 mm at 0.5 mm is 120 x 120 x 108
    image = Image(hu, np.diag([SPACING] * 3 + [1.0]), Path("ct.nii.gz"))
    assert resampled_shape(image, (0.5, 0.5, 0.5), "RAS") == (120, 120, 108)
    permuted = Image(hu, np.array([[0, 0, 2.0, 0], [1.5, 0, 0, 0], [0, -1.5, 0, 0], [0, 0, 0, 1]]))
    assert resampled_shape(permuted, (1.0, 2.0, 3.0), "RAS") == (36 * 2, 30, 20)
    monkeypatch.setenv("FSEFT_MAX_RESAMPLED_VOXELS", str(120 * 120 * 108 - 1))
    with pytest.raises(DataError, match=r"ct.nii.gz: resampling .* 1,555,200 voxels, over the limit"):
        validate_ct(image, preprocess=PreprocessConfig(spacing=(0.5, 0.5, 0.5)))
    assert validate_ct(image, preprocess=PreprocessConfig(spacing=(1.5, 1.5, 1.5))) is image
    monkeypatch.setenv("FSEFT_MAX_RESAMPLED_VOXELS", "many")
    with pytest.raises(ConfigError, match="FSEFT_MAX_RESAMPLED_VOXELS"):
        CTLimits.from_env()


def test_resampled_size_bound_refuses_predict_before_allocating(ws, tmp_path, capsys, monkeypatch) -> None:
    image, _ = _case_files(tmp_path, "big", None)
    monkeypatch.setenv("FSEFT_MAX_RESAMPLED_VOXELS", "1000")
    assert _predict(ws, [image], tmp_path / "out") == 2
    _one_error_line(capsys, str(image), "over the limit of 1,000")
    assert not _files(tmp_path / "out")
    monkeypatch.delenv("FSEFT_MAX_RESAMPLED_VOXELS")
    assert _predict(ws, [image], tmp_path / "out") == 0


def test_check_data_lists_every_missing_file(tmp_path, capsys) -> None:
    manifest = _manifest(tmp_path, "m", None, n=3)
    for name in ("m0_img.nii.gz", "m1_lab.nii.gz", "m2_img.nii.gz"):
        (tmp_path / name).unlink()
    assert main(["check-data", str(manifest), "--json", str(tmp_path / "r.json")]) == 1
    problems = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["problems"]
    missing = sorted(Path(p["path"]).name for p in problems if "file not found" in p["message"])
    assert missing == ["m0_img.nii.gz", "m1_lab.nii.gz", "m2_img.nii.gz"]


def test_batch_predict_names_the_cases_already_written(ws, tmp_path, capsys) -> None:
    first, _ = _case_files(tmp_path, "first", None)
    second, _ = _case_files(tmp_path, "second", "nan")
    assert _predict(ws, [first, second], tmp_path / "out") == 2
    _one_error_line(capsys, str(second), "case 2 of 2; already written: first_img")
    assert [p.name for p in _files(tmp_path / "out")] == ["first_img.nii.gz", "labels.json"]


# --- outputs checked before any work ----------------------------------------------------------------


def _read_only(folder: Path, request: pytest.FixtureRequest) -> Path:
    """A folder no file can be created in: mode 0500, and for root (who ignores modes) immutable."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    request.addfinalizer(lambda: folder.chmod(stat.S_IRWXU))
    if ROOT_USER:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root on a file system without chattr +i: no read-only folder")
        request.addfinalizer(lambda: subprocess.run(["chattr", "-i", str(folder)], check=True))
    return folder


@pytest.mark.parametrize(
    ("command", "case"),
    [
        ("predict", "read-only"),
        ("predict", "under-a-file"),
        ("adapt", "read-only"),
        ("adapt", "under-a-file"),
        ("adapt", "existing-record"),
        ("pretrain", "read-only"),
        ("pretrain", "under-a-file"),
        ("check-data", "read-only"),
        ("check-data", "under-a-file"),
        ("check-data", "existing-json"),
    ],
)
def test_outputs_are_checked_before_any_work(
    ws, tmp_path, capsys, monkeypatch, request, command: str, case: str
) -> None:
    manifest = _manifest(tmp_path, "m", None)
    image = tmp_path / "m0_img.nii.gz"
    if case == "read-only":
        parent = _read_only(tmp_path / "locked", request)
    elif case == "under-a-file":
        (tmp_path / "file").write_text("a file, not a folder")
        parent = tmp_path / "file"
    else:
        parent = tmp_path / "outs"
        parent.mkdir()
    named = {"predict": parent / "preds", "adapt": parent / "a.safetensors", "pretrain": parent / "run",
             "check-data": parent / "r.json"}[command]  # fmt: skip
    existing = {"existing-record": parent / "a.record.json", "existing-json": parent / "r.json"}.get(case)
    if existing is not None:
        existing.write_text("keep")
    before = {p: p.read_bytes() for p in _files(tmp_path) if p.parent == parent}

    def run(target: Path, *extra: str) -> int:
        return {
            "predict": lambda: _predict(ws, [image], target, *extra),
            "adapt": lambda: _adapt(ws, manifest, target, *extra),
            "pretrain": lambda: _pretrain(ws, manifest, target, *extra),
            "check-data": lambda: main(["check-data", str(manifest), "--json", str(target), *extra]),
        }[command]()

    with monkeypatch.context() as m:  # nothing may be read or computed before the refusal
        m.setattr("fseft.data.transforms.LoadCased.__call__", lambda *a: pytest.fail("work started"))
        m.setattr("fseft.data.check.check_cases", lambda *a, **k: pytest.fail("work started"))
        m.setattr("fseft.inference.writer.read_image", lambda *a, **k: pytest.fail("work started"))
        assert run(named) == 2
    _one_error_line(capsys, str(existing if existing is not None else named))
    assert {p: p.read_bytes() for p in _files(tmp_path) if p.parent == parent} == before
    if existing is None:  # the clean version: a writable location
        assert run(tmp_path / "fine" / named.name) == 0
    else:  # the clean version: asking to replace
        assert run(named, "--overwrite") == 0
        assert existing.read_text(encoding="utf-8") != "keep"


def test_output_files_get_the_usual_mode(ws, tmp_path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    adapted = apply_method(load_model(ws["model"]), "linear-probe", ["pancreas"])
    path = save_adapter(adapted, tmp_path / "a.safetensors")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


# --- weights and headers ------------------------------------------------------------------------


def _tamper(src: Path, dst: Path, *, nan: bool = False, structures: list[str] | None = None) -> Path:
    from safetensors import safe_open

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(str(src))
    if nan:
        name = next(iter(tensors))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
    if structures is not None:
        header = json.loads(meta["fseft"])
        header["structures"] = structures
        meta["fseft"] = json.dumps(header)
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("problem", ["non-finite-weights", "unknown-structure"])
def test_bad_adapter_is_refused_naming_the_file(ws, tmp_path, capsys, problem: str) -> None:
    image, _ = _case_files(tmp_path, "ct", None)
    if problem == "non-finite-weights":
        adapter, words = _tamper(ws["adapter"], tmp_path / "bad.safetensors", nan=True), "NaN or infinite"
    else:
        adapter = _tamper(ws["adapter"], tmp_path / "bad.safetensors", structures=["duodenux"])
        words = "unknown structure 'duodenux'; did you mean: duodenum"
    out = tmp_path / "out"
    assert _predict(ws, [image], out, "--adapter", str(adapter)) == 2
    _one_error_line(capsys, str(adapter), words)
    assert not _files(out)
    assert _predict(ws, [image], out, "--adapter", str(ws["adapter"])) == 0
    assert json.loads((out / "labels.json").read_text(encoding="utf-8")) == {"1": "pancreas"}


def test_non_finite_model_weights_are_refused(ws, tmp_path) -> None:
    model = load_model(ws["model"])
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    path = save_model(model, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match=r"broken.pt: weight\(s\) .* NaN or infinite"):
        load_model(path)


def test_adapters_are_written_for_catalogue_structures_only(ws, tmp_path) -> None:
    adapted = apply_method(load_model(ws["model"]), "linear-probe", ["new_organ"])
    with pytest.raises(ConfigError, match="new_organ"):
        save_adapter(adapted, tmp_path / "novel.safetensors")
    assert not (tmp_path / "novel.safetensors").exists()


# --- training refuses non-finite losses -----------------------------------------------------------


def test_adapt_refuses_a_non_finite_loss_and_writes_nothing(ws, tmp_path, capsys, monkeypatch) -> None:
    import fseft.adapt.trainer as trainer

    make_loss = trainer.make_loss

    def nan_loss(*a):
        return lambda logits, label: make_loss(*a)(logits, label) * float("nan")

    manifest, out = _manifest(tmp_path, "m", None), tmp_path / "out" / "a.safetensors"
    with monkeypatch.context() as m:
        m.setattr(trainer, "make_loss", nan_loss)
        assert _adapt(ws, manifest, out) == 2
    _one_error_line(capsys, "the training loss is nan (not finite)", "nothing was written")
    assert not _files(tmp_path / "out")
    assert _adapt(ws, manifest, out) == 0


# --- messages ---------------------------------------------------------------------------------------


def test_pickled_code_checkpoint_message_gives_no_unsafe_advice(tmp_path) -> None:
    from fseft.training.checkpointing import load_checkpoint

    class Payload:
        def __reduce__(self):
            return (print, ("never printed",))

    torch.save({"format": "x", "obj": Payload()}, tmp_path / "evil.pt")
    for load in (load_checkpoint, load_model):
        with pytest.raises(CheckpointError) as error:
            load(tmp_path / "evil.pt")
        message = str(error.value)
        assert "evil.pt: refused to load" in message and "nothing in it was run" in message
        assert "weights_only" not in message and "\n" not in message


@pytest.mark.slow
@pytest.mark.parametrize("command", ["predict", "adapt"])
def test_process_stderr_is_one_error_line_and_one_nibabel_warning(ws, tmp_path, command: str) -> None:
    """The real process: no blank line before the error, nibabel's zero-pixdim warning printed once."""
    manifest = _manifest(tmp_path, "zero", "zero-pixdim")
    image = tmp_path / "zero0_img.nii.gz"
    args = {
        "predict": ["predict", str(image), "--out", str(tmp_path / "out")],
        "adapt": ["adapt", "--support", str(manifest), "--structure", "pancreas", "--k", "1", "--out",
                  str(tmp_path / "out" / "a.safetensors")],
    }[command]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-m", "fseft", *args, "--model", str(ws["model"]), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).splitlines()
    assert sum("should be non-zero" in line for line in lines) <= 1, lines
    assert lines[-1].startswith(f"fseft: error: {image}: the affine is not invertible"), lines
    assert "" not in [line.strip() for line in lines], lines
    assert not _files(tmp_path / "out")


def test_read_image_keeps_a_zero_nifti_voxel_size(tmp_path) -> None:
    image, _ = _case_files(tmp_path, "zero", "zero-pixdim")
    assert read_image(image).spacing[2] == 0.0
    write_image(Image(np.zeros((4, 4, 4), np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / "ok.nii.gz")
    assert read_image(tmp_path / "ok.nii.gz").spacing == (2.0, 2.0, 2.0)


@pytest.mark.shared_data
def test_real_ct_passes_and_the_same_ct_with_nan_voxels_is_refused(abdomen_dir: Path) -> None:
    image = read_image(abdomen_dir / "ts_abdomen" / "ct.nii.gz")
    assert ct_problems(image, preprocess=PreprocessConfig()) == []
    broken = image.array.copy()
    broken[tuple(slice(s // 2, s // 2 + 5) for s in image.shape)] = np.nan
    with pytest.raises(DataError, match=r"ct.nii.gz: 125 NaN voxel\(s\)"):
        validate_ct(image.with_array(broken), preprocess=PreprocessConfig())
