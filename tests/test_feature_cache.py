"""FeatureCache: sliding-window features of whole volumes, in memory or memory-mapped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fseft.adapt.feature_cache import FeatureCache
from fseft.errors import ConfigError

ROI = (32, 32, 32)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [
        torch.from_numpy(rng.random((1, *shape), dtype=np.float32)) for shape in [(48, 48, 48), (32, 40, 36)]
    ]


def test_features_match_a_crop_computed_alone_where_one_window_covers_it(tiny_base, images):
    with FeatureCache.build(tiny_base.features, images[:1], ROI, overlap=0.5, sw_batch_size=4) as cache:
        cached = cache.crops(0, [(0, 0, 0)], ROI)[0]
    with torch.no_grad():
        alone = tiny_base.features(images[0][None, :, :32, :32, :32])[0]
    assert cached.shape == (tiny_base.feature_channels, *ROI) and cached.dtype == torch.float32
    # 48 voxels, ROI 32, overlap 0.5: windows start at 0 and 16, so [0, 16) is seen by one window only
    inner = (slice(None), slice(0, 16), slice(0, 16), slice(0, 16))
    torch.testing.assert_close(cached[inner], alone[inner], atol=2e-3, rtol=2e-3)  # float16 storage
    # beyond it windows are blended: close, but not equal (instance norm sees another context)
    blended = (cached - alone).norm() / alone.norm()
    assert 0 < blended < 0.5


def test_memory_budget_spills_to_memmap_and_close_removes_it(tiny_base, images, tmp_path):
    calls = []
    with torch.no_grad():
        ram = FeatureCache.build(tiny_base.features, images, ROI, overlap=0.25)
        disk = FeatureCache.build(
            tiny_base.features,
            images,
            ROI,
            overlap=0.25,
            memory_budget_bytes=0,
            directory=tmp_path,
            progress=lambda i, n: calls.append((i, n)),
        )
    assert calls == [(1, 2), (2, 2)]
    assert ram.disk_bytes == 0 and ram.memory_bytes > 0 and ram.directory is None
    assert disk.memory_bytes == 0 and disk.disk_bytes == ram.memory_bytes
    assert all(isinstance(m, np.memmap) and m.dtype == np.float16 for m in disk.maps)
    assert [m.shape for m in disk.maps] == [(4, 48, 48, 48), (4, 32, 40, 36)]
    starts = [(0, 8, 4), (0, 0, 0)]
    torch.testing.assert_close(disk.crops(1, starts, ROI), ram.crops(1, starts, ROI))
    torch.testing.assert_close(disk.volume(0), ram.volume(0))
    folder = disk.directory
    assert folder is not None and folder.parent == tmp_path and any(folder.iterdir())
    disk.close()
    assert not folder.exists() and tmp_path.exists()


def test_partial_budget_keeps_what_fits_in_memory(tiny_base, images):
    first = 4 * 48 * 48 * 48 * 2  # float16 bytes of the first map
    with FeatureCache.build(tiny_base.features, images, ROI, overlap=0.25, memory_budget_bytes=first) as cache:
        assert not isinstance(cache.maps[0], np.memmap) and isinstance(cache.maps[1], np.memmap)
        assert cache.channels == 4 and len(cache) == 2


def test_negative_budget_is_refused(tiny_base, images):
    with pytest.raises(ConfigError, match="budget"):
        FeatureCache.build(tiny_base.features, images, ROI, memory_budget_bytes=-1)
