"""Safe checkpoint loading, fseft's model file format and ``load_pretrained`` (names: :mod:`.hub`).

Model file format (one ``torch.save`` file, loadable with ``weights_only=True``; suffix ``.pt``)::

    {"format": "fseft-model", "version": 1, "config": ModelConfig.to_dict(),
     "state_dict": {name: tensor}, "extra": JSON-able dict}

Every checkpoint is read with ``torch.load(..., weights_only=True)``: a file holding pickled code or
arbitrary objects is refused with :class:`CheckpointError`, never executed.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..io_utils import save_torch_atomic
from .config import ModelConfig
from .foundation import FoundationModel, build_model, start_absent
from .keymaps import LAYOUTS, extract_state_dict

log = logging.getLogger(__name__)

FORMAT = "fseft-model"
VERSION = 1
_HEAD_KEYS = ("head.weight", "head.bias")


def safe_torch_load(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors.

    Raises:
        CheckpointError: naming the file when it is missing, unreadable, or holds pickled code /
            objects that weights-only loading does not allow (the payload is never executed).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: checkpoint file not found")
    try:
        return torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+)", str(e))
        if named or "global" in str(e).lower():  # the pickle names a callable/class: code, refused unexecuted
            what = f" ({named.group(1)})" if named else ""
            raise CheckpointError(
                f"{p}: refused to load: it holds pickled code or objects other than tensors and plain "
                f"containers{what}; nothing in it was run. Only load checkpoints saved as plain state dicts"
            ) from None
        raise CheckpointError(f"{p}: not a readable PyTorch checkpoint ({_torch_reason(e)})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointError(f"{p}: not a readable PyTorch checkpoint ({_torch_reason(e)})") from None


def _torch_reason(error: BaseException) -> str:
    """The first line of a torch loading error that states a fact, not torch's advice on unsafe loading."""
    advice = ("weights_only", "weights only", "can still be loaded", "trust the source", "safe_globals")
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(error).splitlines()]
    facts = [ln for ln in lines if ln and not any(a in ln.lower() for a in advice)]
    return facts[0] if facts else type(error).__name__


#: missing keys that never fail a load: buffers every SwinUNETR recomputes from its window size
RECOMPUTED_SUFFIXES = ("relative_position_index",)


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did.

    Attributes:
        source: File or description of the weights.
        layout: Layout name used to rename keys.
        expected_missing: Key prefixes the layout leaves at initialisation by design
            (:attr:`fseft.models.keymaps.Layout.expected_missing`).
        loaded: Model keys that received a tensor.
        missing: Model keys the checkpoint did not provide (left at initialisation).
        unexpected: Checkpoint keys with no counterpart in the model.
        mismatched: ``(key, checkpoint shape, model shape)`` for same-named tensors of other shapes.
        dropped: Checkpoint keys the layout discards by design (other heads, pretext heads).
        head_rows: Model structure -> checkpoint label whose head row it received.
        new_head_rows: Model structures whose head row has no trained weights (zero weights, prior
            bias: deterministic, so the model's fingerprint is too).
    """

    source: str
    layout: str
    expected_missing: tuple[str, ...] = ()
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    head_rows: dict[str, str] = field(default_factory=dict)
    new_head_rows: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No missing, unexpected or shape-mismatched key."""
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def unintended_missing(self) -> list[str]:
        """Missing keys the layout does not leave missing by design."""
        return [
            k for k in self.missing
            if not k.startswith(self.expected_missing) and not k.endswith(RECOMPUTED_SUFFIXES)
        ]  # fmt: skip

    @property
    def intended(self) -> bool:
        """True when every difference is one the layout expects (no unexpected or mismatched key)."""
        return not (self.unintended_missing or self.unexpected or self.mismatched)

    @property
    def mismatch_names(self) -> list[str]:
        """``key (checkpoint shape)!=(model shape)`` for each shape-mismatched key."""
        return [f"{k} {tuple(a)}!={tuple(b)}" for k, a, b in self.mismatched]

    def summary(self, first: int = 3) -> str:
        """One line: counts and the first few names of each problem."""
        mism = self.mismatch_names
        parts = [
            f"layout {self.layout}: loaded {len(self.loaded)}",
            f"missing {len(self.missing)}{_few(self.missing, first)}",
            f"unexpected {len(self.unexpected)}{_few(self.unexpected, first)}",
            f"shape-mismatched {len(self.mismatched)}{_few(mism, first)}",
            f"dropped {len(self.dropped)}",
        ]
        if self.head_rows or self.new_head_rows:
            parts.append(
                f"head rows mapped {len(self.head_rows)}, new {len(self.new_head_rows)}{_few(self.new_head_rows, first)}"
            )
        return ", ".join(parts)

    def warnings(self, first: int = 3) -> list[str]:
        """One line per kind of difference (empty when the weights matched exactly), for the CLI."""
        lines = []
        if self.missing:
            bad = self.unintended_missing
            why = f", {len(bad)} not expected by the layout{_few(bad, first)}" if bad else ", all expected by the layout"
            lines.append(f"missing {len(self.missing)} keys, left at initialisation{_few(self.missing, first)}{why}")
        if self.unexpected:
            lines.append(f"unexpected {len(self.unexpected)} checkpoint keys, ignored{_few(self.unexpected, first)}")
        if self.mismatched:
            mism = _few(self.mismatch_names, first)
            lines.append(f"shape-mismatched {len(self.mismatched)} keys, left at initialisation{mism}")
        if self.new_head_rows:
            lines.append(
                f"no trained head row for {len(self.new_head_rows)} structure(s){_few(self.new_head_rows, first)}: "
                "they need training (zero-shot refuses them)"
            )
        return [f"{self.source}: {line}" for line in lines]


def _few(names: Sequence[Any], first: int) -> str:
    """`` (a, b, c, ...)``: the first few names, or nothing when there are none."""
    shown = ", ".join(str(n) for n in names[:first])
    return f" ({shown}{', ...' if len(names) > first else ''})" if names else ""


def load_pretrained(
    model: FoundationModel,
    source: Mapping[str, torch.Tensor] | str | os.PathLike[str],
    layout: str = "native",
    *,
    allow_partial: bool = False,
    label_template: Sequence[str | None] | None = None,
    source_name: str | None = None,
) -> LoadReport:
    """Copy weights in a known layout into ``model`` and report exactly what landed where.

    A load fails unless every difference between the checkpoint and the model is one the layout
    expects (e.g. a headless checkpoint's missing head): an unexpected key, a shape mismatch or a
    missing key outside the layout's :attr:`~fseft.models.keymaps.Layout.expected_missing` raises,
    naming the keys, unless ``allow_partial``. Head rows without trained weights are zero weights with
    the prior bias, and the model's ``extra["untrained_head_rows"]`` lists them.

    Args:
        model: The model to fill (in place).
        source: A state dict, a loaded checkpoint mapping, or a checkpoint path (weights-only load).
        layout: Key layout name from :data:`fseft.models.keymaps.LAYOUTS`.
        allow_partial: Load what fits even when keys are unexpected, mismatched or missing.
        label_template: Structure name of each row of the checkpoint's head (``None`` for rows that
            are no structure, e.g. background). Rows are copied to the model's structures by name.
        source_name: Name used in messages (defaults to the path or ``"state dict"``).

    Returns:
        The :class:`LoadReport` (also logged).

    Raises:
        CheckpointError: unsafe/unreadable file, wrong backbone, or (unless ``allow_partial``) a
            difference the layout does not expect.
        ConfigError: unknown layout.
    """
    lay = LAYOUTS.get(layout)
    name = source_name or (str(source) if isinstance(source, (str, os.PathLike)) else "state dict")
    raw = safe_torch_load(source) if isinstance(source, (str, os.PathLike)) else source
    if lay.arch is not None and lay.arch != model.config.arch:
        raise CheckpointError(
            f"{name}: layout {layout!r} holds {lay.arch} weights, the model is {model.config.arch}"
        )
    state, dropped = lay.convert(extract_state_dict(raw, name))
    report = LoadReport(source=name, layout=layout, expected_missing=lay.expected_missing, dropped=dropped)
    target = model.state_dict()
    head_src = {k: state.pop(k) for k in _HEAD_KEYS if k in state}
    if label_template is not None and head_src:
        rows = _map_head_rows(model, head_src, label_template, name, report)
    else:
        state.update(head_src)
        rows = None
    to_load: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in target:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(target[key].shape)))
        else:
            to_load[key] = value
    handled = set(to_load) | ({*_HEAD_KEYS} if rows is not None else set())
    report.missing = [k for k in target if k not in handled and k not in {m[0] for m in report.mismatched}]
    report.loaded = sorted(to_load)
    if rows is None and not all(k in to_load for k in _HEAD_KEYS):
        report.new_head_rows = list(model.structures)
    if not allow_partial and not report.intended:
        raise CheckpointError(
            f"{name}: does not match the model: {report.summary()}; "
            "if this is the layout you meant, load anyway with allow_partial (--allow-partial-load)"
        )
    model.load_state_dict(to_load, strict=False)
    with torch.no_grad():
        for i, (w, b) in (rows or {}).items():
            model.head.weight[i].copy_(w)
            model.head.bias[i].copy_(b)
    start_absent(model.head, [model.structures.index(s) for s in report.new_head_rows])
    if report.new_head_rows:
        model.extra["untrained_head_rows"] = list(report.new_head_rows)
    log.info("loaded %s: %s", name, report.summary())
    return report


def _map_head_rows(
    model: FoundationModel,
    head: dict[str, torch.Tensor],
    template: Sequence[str | None],
    name: str,
    report: LoadReport,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Head rows of ``head`` (public channel order ``template``) keyed by the model's head index."""
    from ..anatomy import canonical

    weight, bias = head.get("head.weight"), head.get("head.bias")
    if weight is None or bias is None or weight.shape[0] != len(template) or bias.shape[0] != len(template):
        shape = None if weight is None else tuple(weight.shape)
        raise CheckpointError(
            f"{name}: head {shape} does not match its label template of {len(template)} rows"
        )
    if tuple(weight.shape[1:]) != tuple(model.head.weight.shape[1:]):
        report.mismatched.append(("head.weight", tuple(weight.shape), tuple(model.head.weight.shape)))
        report.new_head_rows = list(model.structures)
        return {}
    index = {canonical(label): j for j, label in enumerate(template) if label is not None}
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for i, structure in enumerate(model.structures):
        j = index.get(structure)
        if j is None:
            report.new_head_rows.append(structure)
        else:
            rows[i] = (weight[j], bias[j])
            report.head_rows[structure] = str(template[j])
    return rows


def save_model(
    model: FoundationModel, path: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write ``model`` (config + weights + ``extra``) atomically in fseft's model format.

    Args:
        model: The model to save.
        path: Destination file (``.pt``).
        extra: JSON-able metadata (training history, data summary); defaults to ``model.extra``.

    Returns:
        The written path.

    Raises:
        ConfigError: when ``extra`` is not JSON-able.
    """
    extra = dict(model.extra if extra is None else extra)
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"save_model extra must be JSON-able: {e}") from None
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "extra": extra,
    }
    save_torch_atomic(payload, path)
    return Path(path)


def load_model_file(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu", allow_partial: bool = False
) -> FoundationModel:
    """Load a model saved by :func:`save_model` (every key must match unless ``allow_partial``).

    Raises:
        CheckpointError: naming the file when it is unsafe, unreadable, not in fseft's format, or its
            weights do not match its config or hold NaN or infinite values.
    """
    p = Path(path)
    obj = safe_torch_load(p)
    if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{p}: not an fseft model file (public checkpoints load with load_pretrained or 'fseft zoo')"
        )
    if not isinstance(obj.get("version"), int) or obj["version"] > VERSION:
        raise CheckpointError(
            f"{p}: model format version {obj.get('version')!r} is newer than supported ({VERSION})"
        )
    try:
        cfg = ModelConfig.from_dict(obj["config"])
        model = build_model(cfg)
    except ConfigError as e:
        raise CheckpointError(f"{p}: invalid model config: {e}") from None
    state = obj.get("state_dict")
    broken = [
        k for k, v in (state.items() if isinstance(state, Mapping) else ())
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]  # fmt: skip
    if broken:
        raise CheckpointError(f"{p}: weight(s) {', '.join(broken[:3])} hold NaN or infinite values")
    load_pretrained(model, obj["state_dict"], "native", allow_partial=allow_partial, source_name=str(p))
    model.extra = {**model.extra, **dict(obj.get("extra") or {})}
    return model.to(torch.device(map_location))
