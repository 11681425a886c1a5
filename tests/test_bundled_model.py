"""The bundled default model: registered, loadable, recipe recorded, novel structures kept out."""

from __future__ import annotations

import hashlib

import torch

from fseft.data.synth import SynthConfig
from fseft.models import DEFAULT_MODEL, MODELS, load_model
from fseft.models.bundled_models import BUNDLED_DIR, recipe


def test_bundled_model_loads_with_its_recipe() -> None:
    assert DEFAULT_MODEL in MODELS
    model = load_model(DEFAULT_MODEL)
    info = recipe(DEFAULT_MODEL)
    path = BUNDLED_DIR / f"{DEFAULT_MODEL}.pt"
    assert path.stat().st_size < 25e6
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
    assert any(c.startswith("fseft pretrain") for c in info["commands"])
    assert any(c.startswith("fseft synth") for c in info["commands"])
    assert tuple(info["structures"]) == model.structures
    roi = model.config.preprocess.roi
    with torch.no_grad():
        out = model(torch.zeros(1, 1, *roi))
    assert out.shape == (1, len(model.structures), *roi)


def test_structures_no_source_site_annotates_stay_out_of_the_head() -> None:
    model = load_model(DEFAULT_MODEL)
    cfg = SynthConfig.from_preset("default")
    assert set(model.structures) == set(cfg.base_structures)
    assert not set(model.structures) & set(cfg.novel_structures)
