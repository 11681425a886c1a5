"""Frozen feature maps of the support volumes, computed once for cached black-box training.

When nothing upstream of the decoder output trains (zero-shot, linear probe, spatial adapters: the
paper's black-box setting), the backbone's output for a support volume never changes during
adaptation. :class:`FeatureCache` runs it once per volume (sliding window over the whole
preprocessed volume, base in eval mode, :func:`fseft.models.sliding_window_logits`) and keeps the
``[F, X, Y, Z]`` maps in float16, in memory up to a byte budget and in ``np.memmap`` files beyond it.
Training then only runs the adapter and head on crops of these maps.

Features near window borders come from a Gaussian blend of overlapping windows, so they differ
slightly from the features of a crop computed alone; the trainer's tests compare the final Dice of
both paths rather than expecting identical numbers.

With a :class:`~fseft.models.feature_store.FeatureStore` the backbone's windows of a volume are
computed once per (model, volume content, window layout) and reused across adaptations (every
method, k and seed of a benchmark); the maps are those same windows blended, bit-equal to computing
them afresh.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..models.feature_store import FeatureStore, blend_windows
from ..models.predict import sliding_window_logits

logger = logging.getLogger(__name__)

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


class FeatureCache:
    """Float16 feature maps, one per volume, each ``[F, X, Y, Z]``; in memory or memory-mapped.

    Build with :meth:`build`; release disk files with :meth:`close` (or use it as a context manager).

    Args:
        maps: One array per volume (``np.ndarray`` in memory or ``np.memmap`` on disk), float16.
        directory: Folder holding the memmap files, removed by :meth:`close` when ``owns_directory``.
        owns_directory: Whether :meth:`close` deletes ``directory``.
    """

    def __init__(
        self, maps: Sequence[np.ndarray], directory: Path | None = None, owns_directory: bool = False
    ) -> None:
        self.maps = list(maps)
        self.directory = directory
        self.owns_directory = owns_directory

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        features: FeatureFn,
        images: Sequence[torch.Tensor],
        roi: Sequence[int],
        *,
        overlap: float = 0.5,
        sw_batch_size: int = 2,
        device: torch.device | str = "cpu",
        memory_budget_bytes: int = 8 << 30,
        directory: str | os.PathLike[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
        store: FeatureStore | None = None,
        fingerprint: str | None = None,
    ) -> FeatureCache:
        """Compute the feature maps of ``images``.

        Args:
            features: Maps ``[N, C, *roi]`` to ``[N, F, *roi]`` (the frozen backbone in eval mode).
            images: ``[C, X, Y, Z]`` preprocessed volumes (at least ``roi`` on every side).
            roi: Sliding-window size (the model's ROI).
            overlap: Window overlap in ``[0, 1)``.
            sw_batch_size: Windows per forward pass.
            device: Where the backbone runs (maps are stitched and stored on the CPU).
            memory_budget_bytes: Maps are kept in memory while their total stays within this budget;
                the rest go to ``np.memmap`` files.
            directory: Where the temporary memmap folder is created (default: the system temp folder);
                :meth:`close` removes it.
            progress: Called with ``(volumes done, total)`` after each volume.
            store: Reuse (and keep) the backbone's windows there; needs ``fingerprint``.
            fingerprint: Fingerprint of the model whose frozen features ``features`` computes.

        Returns:
            The cache.

        Raises:
            ConfigError: on a negative budget, an illegal ROI / overlap, or a store without fingerprint.
        """
        if memory_budget_bytes < 0:
            raise ConfigError(f"feature memory budget must be >= 0 bytes, got {memory_budget_bytes}")
        if store is not None and fingerprint is None:
            raise ConfigError("a feature store needs the fingerprint of the model computing the features")
        device = torch.device(device)
        in_memory = 0
        folder: Path | None = None
        maps: list[np.ndarray] = []
        for i, image in enumerate(images):
            x = image[None].to(device)
            if store is not None:
                windows = store.windows(features, str(fingerprint), x, roi, overlap=overlap, sw_batch_size=sw_batch_size)
                out = blend_windows(windows, _identity, x, roi, overlap=overlap, sw_batch_size=sw_batch_size,
                                    mode="gaussian", device=torch.device("cpu"))[0]  # fmt: skip
            else:
                out = sliding_window_logits(features, x, roi, overlap=overlap, sw_batch_size=sw_batch_size,
                                            mode="gaussian", device=torch.device("cpu"))[0]  # fmt: skip
            half = out.to(torch.float16).numpy()
            del out
            if in_memory + half.nbytes <= memory_budget_bytes:
                in_memory += half.nbytes
                maps.append(half)
            else:
                if folder is None:
                    if directory is not None:
                        Path(directory).mkdir(parents=True, exist_ok=True)
                    folder = Path(tempfile.mkdtemp(prefix="fseft-features-", dir=directory))
                mm = np.lib.format.open_memmap(
                    folder / f"features_{i:03d}.npy", mode="w+", dtype=np.float16, shape=half.shape
                )
                mm[...] = half
                mm.flush()
                maps.append(mm)
            if progress is not None:
                progress(i + 1, len(images))
        cache = cls(maps, folder, owns_directory=folder is not None)
        logger.info(
            "cached features of %d volume(s): %.1f MiB in memory, %.1f MiB on disk%s",
            len(maps), cache.memory_bytes / 2**20, cache.disk_bytes / 2**20, f" ({folder})" if cache.disk_bytes else "",
        )  # fmt: skip
        return cache

    def __len__(self) -> int:
        return len(self.maps)

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def channels(self) -> int:
        """Feature channels ``F``."""
        return int(self.maps[0].shape[0])

    @property
    def memory_bytes(self) -> int:
        """Bytes of the maps held in memory."""
        return sum(m.nbytes for m in self.maps if not isinstance(m, np.memmap))

    @property
    def disk_bytes(self) -> int:
        """Bytes of the maps held in memmap files."""
        return sum(m.nbytes for m in self.maps if isinstance(m, np.memmap))

    def crops(self, index: int, starts: Sequence[Sequence[int]], roi: Sequence[int]) -> torch.Tensor:
        """Float32 crops ``[N, F, *roi]`` of volume ``index`` at the start corners ``starts``."""
        out = []
        for start in starts:
            sl = tuple(slice(int(s), int(s) + int(r)) for s, r in zip(start, roi, strict=True))
            out.append(torch.from_numpy(np.array(self.maps[index][(slice(None), *sl)], dtype=np.float32)))
        return torch.stack(out)

    def volume(self, index: int) -> torch.Tensor:
        """The whole float32 map ``[F, X, Y, Z]`` of volume ``index``."""
        return torch.from_numpy(np.array(self.maps[index], dtype=np.float32))

    def close(self) -> None:
        """Drop the maps and delete the memmap folder this cache created."""
        self.maps = []
        if self.owns_directory and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


__all__ = ["FeatureCache"]
