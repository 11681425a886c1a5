"""``fseft adapt`` end to end on a tiny model and tiny NIfTI cases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fseft.adapt import load_adapter, read_adapter_header
from fseft.cli import main
from fseft.models import load_model, save_model


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, make_tiny_model, sphere_cases) -> dict[str, Path]:
    """A tiny model file and a manifest of 4 cases with a bright 'pancreas' sphere (synth template)."""
    root = tmp_path_factory.mktemp("adapt_cli")
    model = save_model(make_tiny_model(), root / "tiny.pt")
    manifest = sphere_cases(root, 4, shape=(40, 40, 36), spacing=1.5, radius=6, margin=10)
    return {"root": root, "model": model, "manifest": manifest}


pytestmark = pytest.mark.usefixtures("isolated_cache")


def args(ws: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["adapt", "--model", str(ws["model"]), "--support", str(ws["manifest"]), "--structure", "pancreas",
            "--k", "2", "--seed", "0", "--method", "spatial-adapter", "--epochs", "2", "--device", "cpu",
            "--out", str(out), *extra]  # fmt: skip


def test_adapt_writes_adapter_and_record(workspace, tmp_path, capsys):
    out = tmp_path / "out" / "probe.safetensors"
    assert main(args(workspace, out, "--method", "linear-probe", "--val-case", "case3")) == 0
    summary = capsys.readouterr().out
    record = json.loads((tmp_path / "out" / "probe.record.json").read_text(encoding="utf-8"))
    assert record["method"] == "linear-probe" and record["k"] == 2 and record["epochs_run"] == 2
    assert len(record["support_case_ids"]) == 2 and "case3" not in record["support_case_ids"]
    assert record["validation_case_id"] == "case3" and record["path"] == "cached"
    assert record["train_config"]["max_epochs"] == 2 and record["trainable_params"] == 5
    for text in (
        "linear-probe",
        "trainable params",
        "peak memory",
        "final loss",
        "wall time",
        *record["support_case_ids"],
    ):
        assert text in summary
    header = read_adapter_header(out)
    assert header["method"] == "linear-probe" and header["structures"] == ["pancreas"]
    assert header["record"]["support_case_ids"] == record["support_case_ids"]
    adapted = load_adapter(out, load_model(workspace["model"]))
    assert adapted.head.out_channels == 1
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_adapt_no_cache_features_takes_the_naive_path(workspace, tmp_path):
    out = tmp_path / "naive.safetensors"
    assert main(args(workspace, out, "--method", "linear-probe", "--no-cache-features", "--epochs", "1")) == 0
    assert json.loads((tmp_path / "naive.record.json").read_text(encoding="utf-8"))["path"] == "naive"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--k": "9"}, "k=9 is larger than the 4 cases that annotate pancreas"),
        ({"--structure": "pancreatic_thing"}, "pancreatic_thing"),
        ({"--support": "missing.csv"}, "missing.csv"),
        ({"--method": "nope"}, "unknown adaptation method 'nope'"),
        ({"--model": "no-such-model"}, "no-such-model"),
    ],
)
def test_bad_inputs_give_one_error_line_and_no_adapter(workspace, tmp_path, capsys, change, message):
    out = tmp_path / "bad.safetensors"
    argv = args(workspace, out)
    for flag, value in change.items():
        argv[argv.index(flag) + 1] = str(tmp_path / value) if flag == "--support" else value
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fseft: error: ") and message in err[0]
    assert not any(tmp_path.glob("*.safetensors")) and not any(tmp_path.glob("*.json"))


def test_model_is_required_without_a_bundled_model(workspace, tmp_path, capsys):
    from fseft.defaults import DEFAULT_MODEL
    from fseft.models import MODELS

    argv = args(workspace, tmp_path / "x.safetensors")
    del argv[1:3]
    if DEFAULT_MODEL in MODELS:
        pytest.skip(f"{DEFAULT_MODEL} is registered: --model has a default")
    assert main(argv) == 2
    assert "--model is required" in capsys.readouterr().err


def test_existing_output_is_not_overwritten(workspace, tmp_path, capsys):
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep")
    assert main(args(workspace, out)) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep"


def test_transductive_adapt_then_per_query_predict(workspace, tmp_path, capsys):
    """The size prior learnt by 'adapt --transductive' drives 'predict --transductive' on each input."""
    from fseft.data.io import read_image

    adapter = tmp_path / "tx.safetensors"
    argv = args(workspace, adapter, "--method", "linear-probe", "--transductive", str(workspace["manifest"]),
                "--tx-warmup", "1", "--tx-prior", "volume")  # fmt: skip
    assert main(argv) == 0
    header = read_adapter_header(adapter)
    assert header["size_priors"][0]["structure"] == "pancreas" and header["transductive"]["mode"] == "batch"
    assert header["transductive"]["prior"] == "volume"
    capsys.readouterr()
    image = workspace["root"] / "img3.nii.gz"
    predict = ["predict", str(image), "--model", str(workspace["model"]), "--adapter", str(adapter),
               "--out", str(tmp_path / "preds"), "--device", "cpu", "--transductive"]  # fmt: skip
    assert main([*predict, "--constraint", "log-barrier", "--tx-prior", "proportion"]) == 0
    report = capsys.readouterr().err
    assert "transductive img3" in report and "prior" in report and "steps" in report
    (written,) = [p for p in (tmp_path / "preds").iterdir() if p.name.endswith(".nii.gz")]
    assert read_image(written).shape == read_image(image).shape
    # the constraint choice without --transductive is refused with one line
    assert main(predict[:-1] + ["--constraint", "hinge", "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--constraint and --tx-prior need --transductive" in err[0]


def test_lr_reaches_per_query_refinement_and_each_input_is_read_once(workspace, tmp_path, monkeypatch):
    """'adapt --lr' is the method's one rate: training's and per-query refinement's at prediction."""
    from fseft.inference import predictor, writer

    adapter = tmp_path / "pq.safetensors"
    argv = args(workspace, adapter, "--method", "linear-probe", "--tx-mode", "per-query", "--lr", "0.0123",
                "--head-lr", "0.02")  # fmt: skip
    assert main(argv) == 0
    assert read_adapter_header(adapter)["config"]["lr"] == 0.0123
    assert read_adapter_header(adapter)["config"]["head_lr"] == 0.02  # training's head rate only
    assert json.loads(adapter.with_name("pq.record.json").read_text())["lr"] == 0.0123
    rates, reads, preprocessed = [], [], []
    adam, read, preprocess = torch.optim.Adam, writer.read_image, predictor.preprocess_image
    monkeypatch.setattr(torch.optim, "Adam", lambda params, lr: rates.append(lr) or adam(params, lr=lr))
    monkeypatch.setattr(writer, "read_image", lambda path: reads.append(path) or read(path))
    monkeypatch.setattr(predictor, "preprocess_image", lambda *a: preprocessed.append(a) or preprocess(*a))
    images = [str(workspace["root"] / f"img{i}.nii.gz") for i in (2, 3)]
    assert main(["predict", *images, "--model", str(workspace["model"]), "--adapter", str(adapter),
                 "--out", str(tmp_path / "preds"), "--device", "cpu", "--transductive"]) == 0  # fmt: skip
    assert rates == [0.0123, 0.0123]
    assert len(reads) == 2 and len(preprocessed) == 2  # each input read and preprocessed once
