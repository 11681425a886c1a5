"""Stored frozen-backbone windows give the same predictions as running the backbone, and are reused."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fseft.adapt.feature_cache import FeatureCache
from fseft.adapt.model import apply_method
from fseft.adapt.transductive import PerQueryRefiner, SizePrior, TransductiveConfig
from fseft.data.image import Image
from fseft.inference import PredictConfig, predict_image
from fseft.inference.predictor import preprocess_image
from fseft.models.feature_store import FeatureStore, FeatureStoreConfig, blend_windows, compute_windows
from fseft.models.predict import sliding_window_logits

ROI = (32, 32, 32)


@pytest.fixture(scope="module")
def base(make_tiny_model):
    return make_tiny_model(("liver",), spacing=2.0)


def adapted(base, method: str):
    """``method`` applied to ``base`` with non-trivial adapter weights (the spatial adapter starts as the identity)."""
    torch.manual_seed(1)
    model = apply_method(base, method, ["liver"])
    with torch.no_grad():
        for p in model.adapter.parameters():
            p.normal_(0, 0.3)
        model.head.weight.normal_(0, 1.0)
    return model.eval()


def query(seed: int = 0, shape=(41, 37, 35)) -> Image:
    """A body-like volume larger than the ROI on every side, so windows overlap and blend."""
    rng = np.random.default_rng(seed)
    hu = rng.normal(40, 60, shape).astype(np.float32)
    return Image(hu, np.diag([2.0, 2.0, 2.0, 1.0]))


CONFIG = PredictConfig(overlap=0.5, device="cpu", probabilities=True)


@pytest.mark.parametrize("method", ["zero-shot", "linear-probe", "spatial-adapter"])
def test_stored_windows_predict_bit_equal_to_the_backbone(base, method, tmp_path):
    model, image = adapted(base, method), query()
    plain = predict_image(model, image, config=CONFIG)
    store = FeatureStore(FeatureStoreConfig(str(tmp_path)))
    first = predict_image(model, image, config=CONFIG, features=store)  # computes and stores
    again = predict_image(model, image, config=CONFIG, features=store)  # from memory
    from_disk = predict_image(model, image, config=CONFIG, features=FeatureStore(FeatureStoreConfig(str(tmp_path))))
    assert (store.misses, store.hits) == (1, 1)
    for other in (first, again, from_disk):
        assert np.array_equal(other.label.array, plain.label.array)
        assert np.array_equal(other.probabilities["liver"].array, plain.probabilities["liver"].array)


def test_gaussian_tta_and_constant_blending_also_replay_exactly(base):
    model, image = adapted(base, "spatial-adapter"), query(1)
    for config in (PredictConfig(overlap=0.25, blend="constant", device="cpu", probabilities=True),
                   PredictConfig(overlap=0.5, tta=True, device="cpu", probabilities=True)):  # fmt: skip
        plain = predict_image(model, image, config=config)
        cached = predict_image(model, image, config=config, features=FeatureStore())
        assert np.array_equal(cached.probabilities["liver"].array, plain.probabilities["liver"].array)


def test_blending_features_first_is_exact_only_for_a_per_voxel_affine_head(base):
    """Why the store keeps windows: the head of a linear probe commutes with the blending, the
    spatial adapter (3x3x3 convolutions on zero-padded windows, ReLU) does not."""
    image = query(2)
    x, _ = preprocess_image(image, base.config.preprocess, base.structures)
    windows = compute_windows(base.features, x, ROI, overlap=0.5)
    assert windows.shape[0] > 1
    blended = blend_windows(windows, lambda f: f, x, ROI, overlap=0.5)
    gaps = {}
    for method in ("linear-probe", "spatial-adapter"):
        model = adapted(base, method)
        with torch.no_grad():
            per_window = sliding_window_logits(model, x, ROI, overlap=0.5)
            features_first = model.forward_features(blended)
        gaps[method] = float((per_window - features_first).abs().max())
    assert gaps["linear-probe"] < 1e-4 and gaps["spatial-adapter"] > 1e-2


def test_support_feature_maps_from_the_store_equal_fresh_ones(base, tmp_path):
    images = [preprocess_image(query(s), base.config.preprocess, base.structures)[0][0] for s in (3, 4)]
    fresh = FeatureCache.build(base.features, images, ROI, overlap=0.5)
    store = FeatureStore(FeatureStoreConfig(str(tmp_path)))
    for _ in range(2):
        stored = FeatureCache.build(base.features, images, ROI, overlap=0.5, store=store, fingerprint=base.fingerprint())
        assert all(np.array_equal(a, b) for a, b in zip(fresh.maps, stored.maps, strict=True))
    assert (store.misses, store.hits) == (2, 2)


def test_per_query_refinement_and_prediction_run_the_backbone_once(base, monkeypatch):
    model = adapted(base, "linear-probe")
    calls = []
    real = model.base.features
    monkeypatch.setattr(model.base, "features", lambda x: calls.append(x.shape[0]) or real(x))
    prior = SizePrior("liver", 0.05, 10.0, 100.0, 1, (0.05,), (True,))
    cfg = TransductiveConfig(mode="per-query", steps=2, feature_overlap=0.5)
    store = FeatureStore()
    image = query(5)
    with PerQueryRefiner(model, [prior], cfg, features=store) as refiner:
        predict_image(model, image, config=CONFIG, refine=lambda x: refiner.refine("q", x), features=store)
    x, _ = preprocess_image(image, base.config.preprocess, base.structures)
    windows = compute_windows(real, x, ROI, overlap=0.5)
    assert sum(calls) == windows.shape[0] and (store.misses, store.hits) == (1, 1)


def test_disk_bound_removes_the_least_recently_used(base, tmp_path):
    x = torch.rand(1, 1, 40, 36, 34)
    one = compute_windows(base.features, x, ROI, overlap=0.5).nbytes
    store = FeatureStore(FeatureStoreConfig(str(tmp_path), memory_gb=0, disk_gb=1.5 * one / 2**30))
    writing = tmp_path / ".k.pt.x1y2.tmp.pt"  # another process's write in progress: not the store's to evict
    writing.write_bytes(b"\0" * one)
    os.utime(writing, (1, 1))
    for i in range(3):
        store.windows(base.features, "m", x + i, ROI, overlap=0.5)
    assert len([p for p in tmp_path.glob("*.pt") if p != writing]) == 1 and list(tmp_path.glob(".*")) == [writing]
    store.windows(base.features, "m", x + 2, ROI, overlap=0.5)  # the newest is still there
    assert (store.misses, store.hits) == (3, 1)
