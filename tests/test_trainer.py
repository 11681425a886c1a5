"""Few-shot trainer: support sampling, crops, early stopping, naive vs cached paths, tasks, the API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import fseft
from fseft.adapt import apply_method, get_method
from fseft.adapt.api import AdaptRecord, adapt
from fseft.adapt.early_stopping import PlateauStopper
from fseft.adapt.methods.base import NEW_HEAD_ROW_LR
from fseft.adapt.support import CropSampler, SupportVolume, eligible_cases, sample_support
from fseft.adapt.trainer import AdaptTrainConfig, fit, heldout_dice, resolve_path
from fseft.data.cases import Case, LabelSource
from fseft.data.image import Image
from fseft.data.io import write_image
from fseft.errors import ConfigError, DataError

ROI = (32, 32, 32)
SHAPE = (40, 40, 36)
FAST = dict(num_samples=2, device="cpu")


def spheres(seed: int, n: int = 1, shape: tuple[int, int, int] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A noisy body with ``n`` bright spheres; label ``i + 1`` marks sphere ``i``."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0.4, 0.05, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    for i in range(n):
        centre = rng.integers(10, np.array(shape) - 10)
        inside = ((grid - centre[:, None, None, None]) ** 2).sum(0) < 6**2
        image[inside] = 0.8 if i == 0 else 0.05
        label[inside & (label == 0)] = i + 1
    return image, label


def volume(seed: int, n: int = 1) -> SupportVolume:
    image, label = spheres(seed, n)
    return SupportVolume(f"case{seed}", torch.from_numpy(image)[None], torch.from_numpy(label)[None])


def cases(n: int, root: Path = Path("/data")) -> list[Case]:
    out = []
    for i in range(n):
        declared = ("pancreas", "spleen") if i % 3 else ("spleen",)
        out.append(
            Case(
                f"c{i:02d}",
                root / f"c{i:02d}.nii.gz",
                (LabelSource(root / f"l{i:02d}.nii.gz", "synth"),),
                structures=declared,
            )
        )
    return out


# --- support sampling -----------------------------------------------------------------------------


def test_support_is_deterministic_independent_of_row_order_and_eligible_only():
    pool = cases(12)
    eligible = {c.case_id for c in eligible_cases(pool, ["Pancreas"])}
    assert eligible == {c.case_id for c in pool if "pancreas" in c.structures}
    a = sample_support(pool, ["pancreas"], 3, seed=7)
    b = sample_support(list(reversed(pool)), ["pancreas"], 3, seed=7)
    assert a.case_ids == b.case_ids and set(a.case_ids) <= eligible and a.pool_size == len(eligible) == 8
    assert len({sample_support(pool, ["pancreas"], 3, seed=s).case_ids for s in range(6)}) > 1
    held = sample_support(pool, ["pancreas"], 3, seed=7, validation=True)
    assert (
        held.case_ids == a.case_ids
        and held.validation is not None
        and held.validation.case_id not in a.case_ids
    )
    named = sample_support(pool, ["pancreas"], 7, seed=1, validation="c01")
    assert named.validation.case_id == "c01" and "c01" not in named.case_ids


def test_support_errors_name_the_numbers_and_skip_empty_cases():
    pool = cases(12)
    with pytest.raises(ConfigError, match=r"k=9 is larger than the 8 cases that annotate pancreas"):
        sample_support(pool, ["pancreas"], 9, seed=0)
    with pytest.raises(ConfigError, match="not in the manifest"):
        sample_support(pool, ["pancreas"], 2, seed=0, validation="nope")
    with pytest.raises(ConfigError, match="does not annotate"):
        sample_support(pool, ["pancreas"], 2, seed=0, validation="c00")
    empty = {"c01", "c02"}
    picked = sample_support(pool, ["pancreas"], 6, seed=0, has_foreground=lambda c: c.case_id not in empty)
    assert not empty & set(picked.case_ids) and len(picked.case_ids) == 6
    with pytest.raises(DataError, match="only 6 of the 8"):
        sample_support(pool, ["pancreas"], 7, seed=0, has_foreground=lambda c: c.case_id not in empty)


def test_crop_sampler_is_seeded_balanced_and_in_bounds():
    vol = volume(3)
    sampler = CropSampler(vol.label, vol.image, ROI, num_samples=40, pos=1, neg=1)
    starts = np.array(sampler.draw(0, 0, 0))
    assert starts.min() >= 0 and (starts + ROI <= np.array(SHAPE)).all()
    assert sampler.draw(0, 0, 0) == CropSampler(vol.label, vol.image, ROI, 40, 1, 1).draw(0, 0, 0)
    assert sampler.draw(0, 1, 0) != sampler.draw(0, 0, 0)
    only_pos = CropSampler(vol.label, vol.image, ROI, 10, pos=1, neg=0).draw(0, 0, 0)
    assert all(vol.label[0, s[0] : s[0] + 32, s[1] : s[1] + 32, s[2] : s[2] + 32].any() for s in only_pos)


# --- early stopping --------------------------------------------------------------------------------


def test_plateau_rule_on_a_synthetic_curve():
    stopper = PlateauStopper(window=10, patience=20, min_delta=1e-3)
    curve = [1.0 - 0.02 * min(e, 30) for e in range(100)]  # falls for 30 epochs, then flat
    stops = [stopper.update(x) for x in curve]
    # the moving average is flat from epoch 40 (index 39); 20 epochs later nothing improved
    assert stops.index(True) == 59
    falling = PlateauStopper()
    assert not any(falling.update(1.0 - 0.01 * e) for e in range(100))
    assert PlateauStopper().update(float("nan"))
    with pytest.raises(ConfigError):
        PlateauStopper(window=0)


# --- training --------------------------------------------------------------------------------------


def test_trainer_learns_an_unknown_structure_zero_shot_cannot(tiny_base):
    with pytest.raises(ConfigError, match="not in this model's head"):
        apply_method(tiny_base, "zero-shot", ["pancreas"], "binary")
    support, query = [volume(0), volume(1)], [volume(10), volume(11)]
    torch.manual_seed(0)
    adapted = apply_method(tiny_base, "spatial-adapter", ["pancreas"], "binary")
    untrained = heldout_dice(adapted, query)["pancreas"]
    reports = []
    cfg = AdaptTrainConfig(max_epochs=20, **FAST)
    result = fit(adapted, support, cfg, lr=1e-2, seed=0, path="cached", progress=reports.append)
    assert result.epochs_run == 20 == len(result.loss_curve) and result.stop_reason == "max-epochs"
    assert result.loss_curve[-1] < result.loss_curve[0] - 0.3
    assert [r.epoch for r in reports if r.stage == "train"] == list(range(1, 21))
    assert [r.epoch for r in reports if r.stage == "features"] == [1, 2]
    trained = heldout_dice(adapted, query)["pancreas"]
    assert trained > 0.6 and trained > untrained + 0.4
    assert not adapted.training


def test_naive_and_cached_paths_reach_the_same_dice(tiny_base):
    support, query = [volume(0), volume(1)], [volume(10), volume(11)]
    cfg = AdaptTrainConfig(max_epochs=6, **FAST)
    out = {}
    for path in ("naive", "cached"):
        torch.manual_seed(0)
        adapted = apply_method(tiny_base, "linear-probe", ["pancreas"], "binary")
        result = fit(adapted, support, cfg, lr=0.1, seed=3, path=path)
        out[path] = (result.loss_curve, heldout_dice(adapted, query)["pancreas"])
    (naive_curve, naive_dice), (cached_curve, cached_dice) = out["naive"], out["cached"]
    assert naive_curve[-1] < naive_curve[0]  # it learned something, in both paths alike
    np.testing.assert_allclose(naive_curve, cached_curve, atol=0.03)
    assert abs(naive_dice - cached_dice) < 0.05


def test_multiclass_task_trains_a_softmax_head_with_background(tiny_base):
    support, query = [volume(0, n=2), volume(1, n=2)], [volume(10, n=2)]
    torch.manual_seed(0)
    adapted = apply_method(tiny_base, "spatial-adapter", ["pancreas", "spleen"], "multiclass")
    assert adapted.head.out_channels == 3
    validation = volume(5, n=2)
    result = fit(
        adapted,
        support,
        AdaptTrainConfig(max_epochs=60, **FAST),  # both rows start absent: 30 epochs learn pancreas only
        lr=1e-2,
        seed=0,
        path="cached",
        validation=validation,
    )
    assert (
        len(result.val_loss_curve) == result.epochs_run
        and result.val_loss_curve[-1] < result.val_loss_curve[0]
    )
    assert result.loss_curve[-1] < result.loss_curve[0] - 0.2
    dice = heldout_dice(adapted, query)
    assert set(dice) == {"pancreas", "spleen"} and min(dice.values()) > 0.3


def test_a_new_head_row_trains_at_least_at_the_probe_rate(tiny_base):
    lora = get_method("lora").config_cls
    adapted = apply_method(tiny_base, "lora", ["pancreas"], config=lora(decoder="fine-tuned"))
    assert adapted.new_head_rows == ("pancreas",) and adapted.lr == 1e-4
    groups = adapted.param_groups(1e-4)
    assert [g["lr"] for g in groups] == [1e-4, NEW_HEAD_ROW_LR] and groups[1]["params"] == list(adapted.head.parameters())
    assert sum(len(g["params"]) for g in groups) == len(adapted.trainable_parameters())
    before = {n: p.detach().clone() for n, p in adapted.trainable_parameters().items()}
    fit(adapted, [volume(0)], AdaptTrainConfig(max_epochs=3, warmup_epochs=0, **FAST), lr=1e-8, seed=0, path="naive")
    moved = {n: float((p.detach() - before[n]).abs().max()) for n, p in adapted.trainable_parameters().items()}
    assert moved["head.bias"] > 1e-3  # AdamW moves each weight by about its rate per step
    assert max(v for n, v in moved.items() if not n.startswith("head.")) < 1e-6
    # a trained row keeps the method's one rate; the config's head_lr overrides either way
    known = apply_method(tiny_base, "lora", ["liver"], config=lora(decoder="fine-tuned"))
    assert known.new_head_rows == () and [g["lr"] for g in known.param_groups(1e-4)] == [1e-4]
    set_rate = apply_method(tiny_base, "lora", ["pancreas"], config=lora(decoder="fine-tuned", head_lr=3e-3))
    assert [g["lr"] for g in set_rate.param_groups(1e-4)] == [1e-4, 3e-3]
    probe = apply_method(tiny_base, "linear-probe", ["pancreas"])  # already at 1e-2: one group
    assert [g["lr"] for g in probe.param_groups(probe.lr)] == [1e-2]
    new_decoder = apply_method(tiny_base, "lora", ["liver"], config=lora(decoder="new"))
    assert new_decoder.new_head_rows == ("liver",) and len(new_decoder.param_groups(1e-4)) == 2
    with pytest.raises(ConfigError, match="head_lr must be positive, got 0"):
        lora(head_lr=0)


def test_max_steps_is_a_fixed_budget_whatever_k(tiny_base):
    cfg = AdaptTrainConfig(max_epochs=100, max_steps=12, **FAST)
    assert [cfg.epochs_for(k) for k in (1, 3, 5, 12, 20)] == [12, 4, 3, 1, 1]  # rounded up to whole epochs
    assert AdaptTrainConfig(max_epochs=4, max_steps=12).epochs_for(1) == 4  # max_epochs still bounds it
    assert AdaptTrainConfig(max_epochs=7).epochs_for(10) == 7
    with pytest.raises(ConfigError, match="max_steps"):
        AdaptTrainConfig(max_steps=0)
    adapted = apply_method(tiny_base, "linear-probe", ["pancreas"], "binary")
    reports = []
    result = fit(adapted, [volume(0), volume(1), volume(2)], cfg, lr=1e-2, seed=0, path="cached",
                 progress=reports.append)  # fmt: skip
    assert result.epochs_run == 4 and result.stop_reason == "max-epochs"
    assert {r.total for r in reports if r.stage == "train"} == {4}


def test_zero_shot_trains_nothing(tiny_base):
    adapted = apply_method(tiny_base, "zero-shot", ["liver"], "binary")
    result = fit(adapted, [volume(0)], AdaptTrainConfig(**FAST), lr=0.0, seed=0, path="cached")
    assert result.stop_reason == "nothing-to-train" and result.epochs_run == 0 and not result.loss_curve


def test_path_resolution_and_config_validation(tiny_base):
    probe = apply_method(tiny_base, "linear-probe", ["pancreas"], "binary")
    assert resolve_path(probe, "auto") == "cached" and resolve_path(probe, "off") == "naive"
    from fseft.adapt.methods import get_method

    tuned = apply_method(
        tiny_base,
        "linear-probe",
        ["pancreas"],
        "binary",
        get_method("linear-probe").config_cls(decoder="fine-tuned"),
    )
    assert resolve_path(tuned, "auto") == "naive"
    with pytest.raises(ConfigError, match="black-box"):
        resolve_path(tuned, "on")
    with pytest.raises(ConfigError, match="validation"):
        fit(probe, [volume(0)], AdaptTrainConfig(monitor="val", **FAST), lr=0.1, seed=0, path="cached")
    with pytest.raises(ConfigError, match="feature_cache"):
        AdaptTrainConfig(feature_cache="maybe")


# --- the API on files ------------------------------------------------------------------------------


def write_cases(root: Path, n: int) -> list[Case]:
    """Tiny NIfTI cases (1.5 mm, body at 40 HU) with a bright 'pancreas' sphere, synth template."""
    affine = np.diag([1.5, 1.5, 1.5, 1.0])
    out = []
    for i in range(n):
        image, label = spheres(i)
        hu = np.where(label > 0, 200.0, 40.0) + (image - 0.4) * 400
        write_image(Image(hu.astype(np.int16), affine), root / f"img{i}.nii.gz")
        write_image(Image((label * 6).astype(np.uint8), affine), root / f"lab{i}.nii.gz")  # 6 = pancreas
        source = LabelSource(root / f"lab{i}.nii.gz", "synth")
        out.append(
            Case(f"case{i}", root / f"img{i}.nii.gz", (source,), dataset="tiny", structures=("pancreas",))
        )
    return out


def test_adapt_api_end_to_end_records_the_run(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setenv("FSEFT_CACHE", str(tmp_path / "cache"))
    pool = write_cases(tmp_path, 4)
    cfg = AdaptTrainConfig(max_epochs=3, **FAST)
    result = fseft.adapt(
        tiny_base, pool, "Pancreas", k=2, seed=1, method="linear-probe", train_config=cfg, validation=True
    )
    adapted, record = result.model, result.record
    assert result.transductive is None and result.refiner() is None
    expected = sample_support(pool, ["pancreas"], 2, seed=1, validation=True)
    assert record.support_case_ids == list(expected.case_ids)
    assert record.validation_case_id == expected.validation.case_id
    assert (
        record.path == "cached"
        and record.epochs_run == 3
        and len(record.loss_curve) == 3 == len(record.val_loss_curve)
    )
    assert record.trainable_params == 4 + 1 == adapted.num_trainable() and record.lr == 1e-2
    assert record.base_fingerprint == tiny_base.fingerprint() and record.peak_memory_bytes > 0
    assert record.wall_time_s >= record.train_time_s + record.feature_time_s > 0
    assert record.train_config["num_samples"] == 2 and record.method_config["decoder"] == "frozen"
    saved = AdaptRecord.from_dict(json.loads(record.save(tmp_path / "r.json").read_text(encoding="utf-8")))
    assert saved == record
    naive = adapt(
        tiny_base,
        pool,
        ["pancreas"],
        k=2,
        seed=1,
        method="linear-probe",
        train_config=AdaptTrainConfig(max_epochs=1, feature_cache="off", **FAST),
    ).record
    assert naive.path == "naive" and naive.support_case_ids == record.support_case_ids
    with pytest.raises(ConfigError, match="k=5 is larger than the 4"):
        adapt(tiny_base, pool, ["pancreas"], k=5)
    with pytest.raises(ConfigError, match="unknown task"):
        adapt(tiny_base, pool, ["pancreas"], task="regression")
