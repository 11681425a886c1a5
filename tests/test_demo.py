"""``fseft demo``'s pieces: its protocol (full and --quick) plans on the synthetic assembly it generates."""

from __future__ import annotations

import json

import pytest
import torch

from fseft.benchmark import plan
from fseft.cli import main
from fseft.commands.demo import QUICK_CASES, QUICK_EPOCHS, demo_protocol
from fseft.config import PreprocessConfig
from fseft.data.synth import SynthConfig
from fseft.models import DEFAULT_MODEL, MODELS, ModelConfig, build_model, save_model


def test_demo_protocol_is_the_readme_job():
    protocol = demo_protocol(quick=False)
    assert protocol.model.name == DEFAULT_MODEL
    assert [m.method for m in protocol.methods] == [
        "zero-shot",
        "linear-probe",
        "spatial-adapter",
        "lora",
        "full-ft",
    ]
    assert protocol.k == (1, 5) and protocol.seeds == (0,)
    # raised learning rates for the short budget, shown in the row labels and given to the methods
    lrs = {m.row_label: m.method_config().lr for m in protocol.methods}
    assert lrs["lora (lr 1e-2)"] == 1e-2 and lrs["full-ft (lr 3e-3)"] == 3e-3 and lrs["linear-probe"] is None
    assert [(t.name, t.group) for t in protocol.tasks] == [("liver", "base"), ("duodenum", "novel")]
    assert protocol.data.source == "synth" and protocol.data.synth_preset == "default"
    assert protocol.predict_config().largest_cc  # single-organ targets: scattered false positives removed
    quick = demo_protocol(quick=True)
    assert quick.k == (1,) and quick.train["max_epochs"] == QUICK_EPOCHS
    assert quick.data.synth_preset == "tiny" and quick.data.synth_cases == QUICK_CASES


def test_quick_demo_plans_on_generated_synthetic_data(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="unet-small", feature_size=4, structures=SynthConfig().base_structures,
                      preprocess=PreprocessConfig(spacing=(8.0, 8.0, 8.0), roi=(32, 32, 32)))  # fmt: skip
    model = save_model(build_model(cfg), tmp_path / "tiny.pt")
    p = plan(demo_protocol(quick=True), out=tmp_path / "demo", model=str(model))
    info = json.loads((tmp_path / "demo" / "data" / "synth.json").read_text(encoding="utf-8"))
    assert info["preset"] == "tiny" and info["cases"] == QUICK_CASES
    liver = p.task("liver")
    # the target-site cases, in case-id order: the last 2 are queries, the others the support pool
    assert [c.site for c in (*liver.pool, *liver.queries)] == ["t"] * 4
    assert [c.case_id for c in liver.queries] == ["synth_t_002", "synth_t_003"]
    # zero-shot runs on the base task only; one cell per (task, method) at k = 1
    assert [(c.task, c.label) for c in p.cells] == [
        ("liver", "zero-shot"), ("liver", "linear-probe"), ("liver", "spatial-adapter"), ("liver", "lora (lr 1e-2)"),
        ("liver", "full-ft (lr 3e-3)"), ("duodenum", "linear-probe"), ("duodenum", "spatial-adapter"),
        ("duodenum", "lora (lr 1e-2)"), ("duodenum", "full-ft (lr 3e-3)"),
    ]  # fmt: skip


@pytest.mark.skipif(DEFAULT_MODEL in MODELS, reason="the bundled model is installed")
def test_demo_without_bundled_model_says_what_to_do(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --model FILE" in err
