"""Sliding-window logits over a whole volume, shared by validation and inference."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..errors import ConfigError
from .foundation import FoundationModel


def sliding_window_logits(
    model: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    roi: Sequence[int],
    overlap: float = 0.5,
    sw_batch_size: int = 1,
    mode: str = "gaussian",
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Logits of ``model`` over ``image`` by overlapping ROI-sized windows (MONAI
    :func:`~monai.inferers.sliding_window_inference`). Volumes smaller than the ROI are padded and
    the padding removed from the output.

    Gradients follow the caller's mode: wrap the call in ``torch.no_grad()`` for plain inference.

    Args:
        model: Maps ``[N, C, *roi]`` to ``[N, S, *roi]`` (a :class:`FoundationModel` or any wrapper).
        image: ``[B, C, X, Y, Z]`` preprocessed volume(s).
        roi: Window size (voxels); must be legal for the backbone when ``model`` is a FoundationModel.
        overlap: Fraction of overlap between neighbouring windows, in ``[0, 1)``.
        sw_batch_size: Windows per forward pass.
        mode: Blending of overlapping windows, ``"gaussian"`` or ``"constant"``.
        device: Where the stitched output lives (default: the image's device).

    Returns:
        ``[B, S, X, Y, Z]`` logits on ``device``.

    Raises:
        ConfigError: on an illegal ROI, overlap, batch size, mode or image rank.
    """
    from monai.inferers import sliding_window_inference

    if image.ndim != 5:
        raise ConfigError(f"sliding_window_logits expects an image [B, C, X, Y, Z], got {list(image.shape)}")
    roi = tuple(int(r) for r in roi)
    if isinstance(model, FoundationModel):
        model.spec.check_shape(roi, what="sliding-window roi")
    elif len(roi) != 3 or min(roi) < 1:
        raise ConfigError(f"roi must be three positive sizes, got {roi}")
    if not 0.0 <= overlap < 1.0:
        raise ConfigError(f"overlap must be in [0, 1), got {overlap}")
    if sw_batch_size < 1:
        raise ConfigError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
    if mode not in ("gaussian", "constant"):
        raise ConfigError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    out = sliding_window_inference(
        image,
        roi_size=roi,
        sw_batch_size=sw_batch_size,
        predictor=model,
        overlap=overlap,
        mode=mode,
        device=device,
    )
    return out.as_tensor() if hasattr(out, "as_tensor") else out
