"""Public checkpoints without a head through ``fseft adapt`` / ``fseft predict``, and loads that fail loudly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import fseft
from fseft.cli import main
from fseft.config import PreprocessConfig
from fseft.errors import CheckpointError, ConfigError
from fseft.models import zoo
from fseft.models.unet3d import UNet3D

NAME = "unet3d.suprem"


@pytest.fixture
def fake_suprem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sphere_cases) -> dict[str, Path]:
    """A tiny UNet3D saved in the public SuPreM layout as the cached ``unet3d.suprem``, and 3 cases."""
    torch.manual_seed(0)
    net = {f"module.backbone.{k}": v for k, v in UNet3D(base=4).state_dict().items()}
    net["module.precls_conv.0.weight"] = torch.ones(8, 8, 1, 1, 1)  # a dynamic-head key: dropped
    entry = dataclasses.replace(zoo.get_entry(NAME), feature_size=8, preprocess=PreprocessConfig(roi=(32,) * 3))
    monkeypatch.setattr(zoo, "get_entry", lambda name: entry)
    monkeypatch.setenv("FSEFT_CACHE", str(tmp_path / "cache"))
    ckpt = tmp_path / "cache" / entry.filename
    ckpt.parent.mkdir()
    torch.save({"net": net}, ckpt)
    (tmp_path / "data").mkdir()
    manifest = sphere_cases(tmp_path / "data", 3, shape=(40, 40, 36), spacing=1.5, radius=6, margin=10)
    return {"ckpt": ckpt, "manifest": manifest, "root": tmp_path}


def adapt_args(ws: dict[str, Path], out: Path, method: str, *extra: str) -> list[str]:
    return ["adapt", "--model", NAME, "--support", str(ws["manifest"]), "--structure", "pancreas", "--k", "2",
            "--method", method, "--epochs", "1", "--device", "cpu", "--out", str(out), *extra]  # fmt: skip


def test_headless_checkpoint_adapts_from_the_cli_and_predicts(fake_suprem, capsys) -> None:
    out = fake_suprem["root"] / "probe.safetensors"
    assert main(adapt_args(fake_suprem, out, "linear-probe")) == 0
    err = capsys.readouterr().err
    assert "fseft: warning:" in err and "missing 2 keys, left at initialisation (head.weight, head.bias), all expected" in err
    assert "no trained head row for 1 structure(s) (pancreas)" in err
    preds = fake_suprem["root"] / "preds"
    image = fake_suprem["manifest"].parent / "img0.nii.gz"
    assert main(["predict", str(image), "--model", NAME, "--adapter", str(out), "--out", str(preds),
                 "--device", "cpu"]) == 0  # fmt: skip
    assert (preds / "img0.nii.gz").is_file()


def test_zero_shot_on_an_untrained_head_row_is_refused(fake_suprem, capsys) -> None:
    out = fake_suprem["root"] / "zs.safetensors"
    assert main(adapt_args(fake_suprem, out, "zero-shot")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fseft: error: zero-shot needs a trained head row") and "pancreas" in err
    assert not out.exists()
    with pytest.raises(ConfigError, match="zero-shot needs a trained head row, and this model has none for pancreas"):
        fseft.adapt(NAME, fake_suprem["manifest"], "pancreas", k=2, method="zero-shot")
    with pytest.raises(ConfigError, match=f"zoo checkpoint '{NAME}' has no per-structure head"):
        fseft.models.load_model(NAME)


def test_unintended_keys_fail_the_load_unless_allowed(fake_suprem, capsys) -> None:
    state = torch.load(fake_suprem["ckpt"], weights_only=True)
    state["net"]["module.backbone.extra_block.weight"] = torch.zeros(3)
    state["net"].pop("module.backbone.down_tr64.ops.0.conv1.weight")
    torch.save(state, fake_suprem["ckpt"])
    with pytest.raises(CheckpointError, match=r"missing 3 \(backbone\.down_tr64\.ops\.0\.conv1\.weight, head\.weight"
                                              r".*unexpected 1 \(backbone\.extra_block\.weight\)"):  # fmt: skip
        fseft.models.load_model(NAME, structures=("pancreas",))
    prints = []
    for seed in (1, 2):  # weights the file lacks start the same whatever the global RNG: same fingerprint
        torch.manual_seed(seed)
        prints.append(fseft.models.load_model(NAME, structures=("pancreas",), allow_partial=True).fingerprint())
    assert prints[0] == prints[1]
    out = fake_suprem["root"] / "partial.safetensors"
    assert main(adapt_args(fake_suprem, out, "linear-probe")) == 2
    assert "--allow-partial-load" in capsys.readouterr().err
    assert main(adapt_args(fake_suprem, out, "linear-probe", "--allow-partial-load")) == 0
    err = capsys.readouterr().err
    assert "1 not expected by the layout (backbone.down_tr64.ops.0.conv1.weight)" in err
    assert "unexpected 1 checkpoint keys, ignored (backbone.extra_block.weight)" in err


def test_transductive_options_without_a_mode_are_refused(fake_suprem, capsys) -> None:
    out = fake_suprem["root"] / "tx.safetensors"
    assert main(adapt_args(fake_suprem, out, "linear-probe", "--margin", "0.2", "--lambda", "1")) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("fseft: error: --lambda, --margin only apply to transductive adaptation: add --transductive "
                   "QUERY_MANIFEST or --tx-mode per-query, or drop them")  # fmt: skip
    assert not out.exists()
