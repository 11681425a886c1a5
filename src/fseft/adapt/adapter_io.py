"""Adapter files: only what a method trained, plus what it takes to rebuild it on its base model.

Format: one safetensors file (suffix ``.safetensors``). Its tensors are
:meth:`AdaptedModel.trainable_state_dict`; its metadata key ``"fseft"`` holds a JSON header::

    {"format": "fseft-adapter", "version": 2, "method": NAME, "config": {...}, "structures": [...],
     "task": "binary" | "multiclass", "arch": ..., "feature_size": ..., "preprocess": {...},
     "base_fingerprint": "<16 hex>", "num_trainable": N,
     "size_priors": [SizePrior.to_dict(), ...], "transductive": TransductiveConfig dict | null,
     "record": {...}}

Version 2 made the size priors and the transductive options format fields (version 1 kept them in
the provenance ``record``); :func:`read_adapter_header` reads version 1 files into the version 2 shape.

Loading re-applies the method to the base model (same structure, same names) and copies the tensors
in; a base whose fingerprint differs from the recorded one is refused. safetensors holds no code, so
loading never executes anything. Loading refuses structure names outside the anatomy catalogue (a
typo in a header would otherwise name the outputs) and tensors holding NaN or infinite values (they
would give silently empty masks).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..anatomy import canonical
from ..config import from_dict, to_dict
from ..errors import CheckpointError, ConfigError
from ..io_utils import atomic_path
from ..models import FoundationModel
from .methods import get_method
from .model import AdaptedModel, apply_method
from .transductive.config import TransductiveConfig
from .transductive.priors import PRIORS_KEY, SizePrior

FORMAT = "fseft-adapter"
VERSION = 2
#: Header key of the stored :class:`TransductiveConfig` (version 2).
TRANSDUCTIVE_KEY = "transductive"
_META_KEY = "fseft"


def save_adapter(
    adapted: AdaptedModel,
    path: str | os.PathLike[str],
    record: dict[str, Any] | None = None,
    *,
    size_priors: Sequence[SizePrior] = (),
    transductive: TransductiveConfig | None = None,
) -> Path:
    """Write ``adapted``'s trained tensors and header to ``path`` atomically.

    Args:
        adapted: The adapted model (trained or not).
        path: Output file (conventionally ``*.safetensors``).
        record: JSON-able description of the run (support cases, epochs, timings...).
        size_priors: Size priors of the targets, for per-query transductive prediction.
        transductive: The transductive options the adapter was made with.

    Returns:
        The path written.

    Raises:
        ConfigError: when ``record`` is not JSON-serialisable, a structure is not a catalogue name, or
            a trained tensor holds NaN or infinite values.
    """
    unknown = _unknown_structures(adapted.structures)
    if unknown:
        raise ConfigError(f"{path}: adapters are written for catalogue structures: {'; '.join(unknown)}")
    base = adapted.base
    header = {
        "format": FORMAT,
        "version": VERSION,
        "method": adapted.method_name,
        "config": to_dict(adapted.config),
        "structures": list(adapted.structures),
        "task": adapted.task,
        "arch": base.config.arch,
        "feature_size": base.config.feature_size,
        "preprocess": to_dict(base.config.preprocess),
        "base_fingerprint": adapted.base_fingerprint,
        "num_trainable": adapted.num_trainable(),
        PRIORS_KEY: [p.to_dict() for p in size_priors],
        TRANSDUCTIVE_KEY: to_dict(transductive) if transductive is not None else None,
        "record": record or {},
    }
    try:
        meta = json.dumps(header)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"adapter record for {path} is not JSON-serialisable: {e}") from None
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in adapted.trainable_state_dict().items()}
    bad = _non_finite(tensors)
    if bad:
        raise ConfigError(f"{path}: not written: {bad}")
    final = Path(path)
    with atomic_path(final) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: meta})
    return final


def read_adapter_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON header of an adapter file (method, config, structures, task, preprocessing, priors, record...).

    A version 1 header is returned in the version 2 shape (its priors and transductive options
    copied out of its record).

    Raises:
        CheckpointError: naming the file when it is missing, unreadable, not an fseft adapter, or its
            structures are not catalogue names.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: adapter file not found")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(
            f"{p}: not a readable safetensors adapter file ({str(e).splitlines()[0]})"
        ) from None
    try:
        header = json.loads(meta[_META_KEY])
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{p}: not an fseft adapter file (no '{_META_KEY}' header)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{p}: not an fseft adapter file")
    if not isinstance(header.get("version"), int) or header["version"] > VERSION:
        raise CheckpointError(
            f"{p}: adapter format version {header.get('version')!r} is newer than supported ({VERSION})"
        )
    structures = header.get("structures")
    if not isinstance(structures, list) or not structures or not all(isinstance(s, str) for s in structures):
        raise CheckpointError(f"{p}: the adapter header lists no structure names")
    unknown = _unknown_structures(structures)
    if unknown:
        raise CheckpointError(f"{p}: the adapter header names {'; '.join(unknown)}")
    return _upgrade_v1(header) if header["version"] == 1 else header


def _upgrade_v1(header: dict[str, Any]) -> dict[str, Any]:
    """A version 1 header in the version 2 shape: priors and options moved from the record to fields."""
    record = header.get("record") or {}
    options = (record.get(TRANSDUCTIVE_KEY) or {}).get("config")
    return {**header, PRIORS_KEY: record.get(PRIORS_KEY) or [], TRANSDUCTIVE_KEY: options}


def transductive_options(header: dict[str, Any], path: str | os.PathLike[str]) -> TransductiveConfig | None:
    """The transductive options stored in an adapter header (None: made without them).

    Args:
        header: :func:`read_adapter_header` of the file.
        path: The file (for error messages).

    Raises:
        CheckpointError: invalid stored options.
    """
    stored = header.get(TRANSDUCTIVE_KEY)
    try:
        return from_dict(TransductiveConfig, stored) if stored else None
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _unknown_structures(names: Sequence[str]) -> list[str]:
    """The names that are not canonical catalogue names, with the closest ones when any."""
    unknown = []
    for name in names:
        try:
            if canonical(name) == name:
                continue
            unknown.append(f"{name!r} (canonical: {canonical(name)!r})")
        except ConfigError as e:
            unknown.append(str(e))
    return unknown


def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """``"tensor NAME holds N NaN/infinite value(s)"`` for the first such tensor, if any."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            count = int((~torch.isfinite(tensor)).sum())
            if count:
                return f"tensor {name} holds {count} NaN or infinite value(s)"
    return None


def load_adapter(path: str | os.PathLike[str], base: FoundationModel) -> AdaptedModel:
    """Rebuild the adapted model saved in ``path`` on ``base`` (which is not modified).

    Args:
        path: An adapter file written by :func:`save_adapter`.
        base: The foundation model the adapter was trained on.

    Returns:
        The :class:`AdaptedModel` (eval mode), on ``base``'s device.

    Raises:
        CheckpointError: naming the file when it is unreadable, names unknown structures, was trained
            on a different base model, or its tensors do not match what the method trains or hold NaN
            or infinite values.
    """
    p = Path(path)
    header = read_adapter_header(p)
    fingerprint = base.fingerprint()
    if header.get("base_fingerprint") != fingerprint:
        raise CheckpointError(
            f"adapter {p} was trained on base model {header.get('base_fingerprint')}, this model is {fingerprint}"
        )
    try:
        method_cls = get_method(header["method"])
        config = from_dict(method_cls.config_cls, header["config"])
        adapted = apply_method(
            base, header["method"], header["structures"], header["task"], config, base_fingerprint=fingerprint
        )
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{p}: cannot rebuild the adapter: {e}") from None
    tensors = load_file(str(p))
    expected = adapted.trainable_state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{p}: tensors do not match method {header['method']!r}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    bad = [k for k, v in tensors.items() if v.shape != expected[k].shape or v.dtype != expected[k].dtype]
    if bad:
        got, want = tensors[bad[0]], expected[bad[0]]
        raise CheckpointError(
            f"{p}: tensor {bad[0]} is {tuple(got.shape)} {got.dtype}, expected {tuple(want.shape)} {want.dtype}"
        )
    bad = _non_finite(tensors)
    if bad:
        raise CheckpointError(f"{p}: {bad}; the adapter is unusable (was its training diverging?)")
    with torch.no_grad():
        adapted.load_state_dict(tensors, strict=False)
    return adapted.eval()
