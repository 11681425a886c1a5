"""Frozen-backbone features of preprocessed volumes, window by window, computed once and reused.

A black-box adapter (zero-shot, linear probe, spatial adapters) runs on the frozen backbone's
decoder features, so those features are the same in every benchmark cell, command and seed that
uses the same foundation model. :class:`FeatureStore` keeps the backbone's output on each sliding
window of a volume, keyed by content: the model's fingerprint, the bytes and shape of the
preprocessed volume, the window size, the overlap and the compute variant (mixed precision). A
bounded in-memory LRU sits in front of an on-disk cache (atomic writes, least recently used files
removed beyond a byte bound), so shards run at different times on one machine share it.

Why windows and not one blended feature map: prediction blends the *logits* of overlapping
windows. For an adapter that is affine per voxel (the 1x1x1 head of zero-shot and linear probe)
blending the features first is the same up to rounding, but the spatial adapter's 3x3x3
convolutions see each window's zero padding and its ReLU is not linear, so only replaying the
windows (:func:`blend_windows`) gives exactly today's predictions (``tests/test_feature_store.py``
measures both). Whole-volume features (training crops, transductive query features) are the same
windows blended with the identity.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io_utils import is_unfinished, save_torch_atomic
from .predict import sliding_window_logits

logger = logging.getLogger(__name__)

#: Bump when the stored layout or the way windows are computed changes.
STORE_VERSION = 1

Backbone = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FeatureStoreConfig:
    """Where and how much the store keeps.

    Args:
        directory: On-disk cache folder (None: memory only).
        memory_gb: In-memory LRU bound in GiB.
        disk_gb: On-disk bound in GiB (least recently used files are removed beyond it).

    Raises:
        ConfigError: on negative bounds.
    """

    directory: str | None = None
    memory_gb: float = 1.0
    disk_gb: float = 8.0

    def __post_init__(self) -> None:
        if self.memory_gb < 0 or self.disk_gb < 0:
            raise ConfigError(f"feature store bounds must be >= 0 GiB, got {self.memory_gb}, {self.disk_gb}")

    @classmethod
    def from_env(cls) -> FeatureStoreConfig:
        """``$FSEFT_CACHE/features`` (default ``~/.cache/fseft/features``), bounded by
        ``FSEFT_FEATURE_MEMORY_GB`` (default 1) and ``FSEFT_FEATURE_DISK_GB`` (default 8)."""
        root = os.environ.get("FSEFT_CACHE")
        folder = (Path(root) if root else Path.home() / ".cache" / "fseft") / "features"
        try:
            memory = float(os.environ.get("FSEFT_FEATURE_MEMORY_GB", cls.memory_gb))
            disk = float(os.environ.get("FSEFT_FEATURE_DISK_GB", cls.disk_gb))
        except ValueError as e:
            raise ConfigError(f"FSEFT_FEATURE_MEMORY_GB / FSEFT_FEATURE_DISK_GB: {e}") from None
        return cls(str(folder), memory, disk)


def volume_key(
    fingerprint: str, x: torch.Tensor, roi: Sequence[int], overlap: float, variant: str = ""
) -> str:
    """Content key of the windows of ``x`` ([1, C, X, Y, Z]) under a model and a window layout."""
    spec = {"v": STORE_VERSION, "model": fingerprint, "shape": list(x.shape), "dtype": str(x.dtype),
            "roi": [int(r) for r in roi], "overlap": float(overlap), "variant": variant}  # fmt: skip
    sha = hashlib.sha1(json.dumps(spec, sort_keys=True).encode())
    sha.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


@torch.no_grad()
def compute_windows(
    backbone: Backbone, x: torch.Tensor, roi: Sequence[int], *, overlap: float, sw_batch_size: int = 1
) -> torch.Tensor:
    """The backbone's output on every sliding window of ``x``, in MONAI's window order.

    Returns:
        ``[N, F, *roi]`` float tensor on the CPU (N windows).
    """
    recorded: list[torch.Tensor] = []

    def record(window: torch.Tensor) -> torch.Tensor:
        recorded.append(backbone(window).detach().cpu())
        return window.new_zeros((window.shape[0], 1, *window.shape[2:]))

    sliding_window_logits(record, x, roi, overlap=overlap, sw_batch_size=sw_batch_size, mode="constant")
    return torch.cat(recorded)


class _Replay:
    """A sliding-window predictor that returns ``head(stored window)`` in window order."""

    def __init__(self, windows: torch.Tensor, head: Backbone) -> None:
        self.windows = windows
        self.head = head
        self.next = 0

    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        n = window.shape[0]
        stored = self.windows[self.next : self.next + n]
        if stored.shape[0] != n or tuple(stored.shape[2:]) != tuple(window.shape[2:]):
            raise ConfigError("stored feature windows do not match this volume's sliding windows")
        self.next += n
        # a copy: MONAI weights the predictor's output in place, and the stored windows are reused
        return self.head(stored.to(window.device, copy=True))


@torch.no_grad()
def blend_windows(
    windows: torch.Tensor,
    head: Backbone,
    x: torch.Tensor,
    roi: Sequence[int],
    *,
    overlap: float,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``head`` applied to every stored window of ``x``, blended like the sliding window.

    Args:
        windows: :func:`compute_windows` of ``x`` with the same ``roi`` and ``overlap``.
        head: Maps ``[n, F, *roi]`` to ``[n, C, *roi]`` (the identity for whole-volume features).
        x: ``[1, C, X, Y, Z]`` the volume the windows came from (gives the layout).
        roi: Window size.
        overlap: Window overlap.
        sw_batch_size: Windows per call of ``head``.
        mode: Blending, ``"gaussian"`` or ``"constant"``.
        device: Where the blended output lives.

    Returns:
        ``[1, C, X, Y, Z]`` blended output.

    Raises:
        ConfigError: when the windows do not belong to this layout.
    """
    replay = _Replay(windows, head)
    out = sliding_window_logits(replay, x, roi, overlap=overlap, sw_batch_size=sw_batch_size, mode=mode,
                                device=device)  # fmt: skip
    if replay.next != len(windows):
        raise ConfigError("stored feature windows do not match this volume's sliding windows")
    return out


class FeatureStore:
    """Content-keyed frozen-backbone windows: a memory LRU in front of a bounded on-disk cache.

    Args:
        config: Folder and bounds.

    Attributes:
        hits: Volumes served from memory or disk.
        misses: Volumes whose windows were computed.
    """

    def __init__(self, config: FeatureStoreConfig | None = None) -> None:
        self.config = config or FeatureStoreConfig()
        self.directory = Path(self.config.directory) if self.config.directory else None
        self.memory_bytes = int(self.config.memory_gb * 2**30)
        self.disk_bytes = int(self.config.disk_gb * 2**30)
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._held = 0
        self.hits = 0
        self.misses = 0

    def windows(
        self,
        backbone: Backbone,
        fingerprint: str,
        x: torch.Tensor,
        roi: Sequence[int],
        *,
        overlap: float,
        sw_batch_size: int = 1,
        variant: str = "",
    ) -> torch.Tensor:
        """The backbone's windows of ``x`` ([1, C, X, Y, Z]): stored, or computed and stored.

        Args:
            backbone: The frozen feature function (``features`` of the model ``fingerprint`` names).
            fingerprint: Fingerprint of the model whose features ``backbone`` computes.
            x: The preprocessed volume.
            roi: Window size.
            overlap: Window overlap.
            sw_batch_size: Windows per backbone call when computing.
            variant: Anything else the features depend on (e.g. mixed precision).

        Returns:
            ``[N, F, *roi]`` CPU tensor (do not modify it).
        """
        key = volume_key(fingerprint, x, roi, overlap, variant)
        found = self._get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        out = compute_windows(backbone, x, roi, overlap=overlap, sw_batch_size=sw_batch_size)
        self._put(key, out)
        return out

    def _path(self, key: str) -> Path | None:
        return None if self.directory is None else self.directory / f"{key}.pt"

    def _get(self, key: str) -> torch.Tensor | None:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._path(key)
        if path is None or not path.is_file():
            return None
        try:
            out = torch.load(path, map_location="cpu", weights_only=True)
            os.utime(path)  # recently used: evicted last
        except Exception as e:  # a torn, foreign or concurrently evicted entry is recomputed
            logger.warning("%s: unreadable feature cache entry (%s); recomputing", path, type(e).__name__)
            return None
        self._remember(key, out)
        return out

    def _put(self, key: str, windows: torch.Tensor) -> None:
        self._remember(key, windows)
        path = self._path(key)
        if path is None or windows.nbytes > self.disk_bytes:
            return
        save_torch_atomic(windows, path)
        self._prune_disk()

    def _remember(self, key: str, windows: torch.Tensor) -> None:
        if windows.nbytes > self.memory_bytes:
            return
        self._memory[key] = windows
        self._held += windows.nbytes
        while self._held > self.memory_bytes:
            _, old = self._memory.popitem(last=False)
            self._held -= old.nbytes

    def _prune_disk(self) -> None:
        """Remove the least recently used files beyond the disk bound."""
        assert self.directory is not None
        entries = []
        for path in self.directory.glob("*.pt"):
            if is_unfinished(path):  # another process's write in progress
                continue
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((stat.st_mtime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.disk_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


__all__ = ["FeatureStore", "FeatureStoreConfig", "blend_windows", "compute_windows", "volume_key"]
