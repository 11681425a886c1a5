"""Constrained transductive inference: size priors, penalties, per-query and batch refinement."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fseft.adapt import apply_method, load_adapter, read_adapter_header, save_adapter
from fseft.adapt.adapter_io import transductive_options
from fseft.adapt.support import SupportVolume
from fseft.adapt.trainer import AdaptTrainConfig, fit
from fseft.adapt.transductive import (
    BatchConstraint,
    PerQueryRefiner,
    QueryFeatures,
    TransductiveConfig,
    query_features,
    refine,
)
from fseft.adapt.transductive.constraints import (
    get_constraint,
    hinge_penalty,
    in_band,
    log_barrier_extension,
    log_barrier_penalty,
)
from fseft.adapt.transductive.features import (
    band_distance,
    penalty,
    predicted_proportions,
    query_prior,
    soft_and_mask_proportions,
)
from fseft.adapt.transductive.priors import (
    SizePrior,
    largest_component,
    priors_from_header,
    priors_to_record,
    robust_mean,
    size_priors,
)
from fseft.errors import CheckpointError, ConfigError, DataError

ROI = (32, 32, 32)
SHAPE = (36, 36, 32)


def blob_volume(case_id: str, radius: int, stray: bool = False, body: int = 14) -> SupportVolume:
    """A cubic body (image 0.5 inside, 0 outside) holding a cube of ``(2 radius)^3`` voxels (label 1)."""
    image = np.zeros(SHAPE, np.float32)
    c = np.array(SHAPE) // 2
    image[c[0] - body : c[0] + body, c[1] - body : c[1] + body, c[2] - body : c[2] + body] = 0.5
    label = np.zeros(SHAPE, np.uint8)
    label[c[0] - radius : c[0] + radius, c[1] - radius : c[1] + radius, c[2] - radius : c[2] + radius] = 1
    if stray:
        label[c[0] + body - 2, c[1] + body - 2, c[2] + body - 2] = 1  # a separate voxel: not the largest CC
    return SupportVolume(case_id, torch.from_numpy(image)[None], torch.from_numpy(label)[None])


def spheres(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(0.4, 0.05, SHAPE).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij"))
    centre = rng.integers(10, np.array(SHAPE) - 10)
    inside = ((grid - centre[:, None, None, None]) ** 2).sum(0) < 6**2
    image[inside] = 0.8
    return image, inside.astype(np.uint8)


# --- size priors ------------------------------------------------------------------------------------


def test_size_prior_uses_the_largest_component_body_proportion_and_ml():
    vol = blob_volume("a", radius=4, stray=True)
    assert largest_component(vol.label[0].numpy() == 1).sum() == 8**3
    (prior,) = size_priors([vol], ["liver"], spacing=(2.0, 2.0, 2.0))
    assert prior.volume_voxels == 8**3 and prior.volume_ml == pytest.approx(8**3 * 8 / 1000)
    assert prior.proportion == pytest.approx(8**3 / 28**3) and prior.n_used == 1
    assert json.loads(json.dumps(prior.to_dict())) == prior.to_dict()
    assert SizePrior.from_dict(prior.to_dict()) == prior


def test_proportion_is_stable_across_fields_of_view():
    small = size_priors([blob_volume("a", 4, body=10)], ["liver"], (1, 1, 1))[0]
    large = size_priors([blob_volume("b", 4, body=14)], ["liver"], (1, 1, 1))[0]
    assert small.volume_voxels == large.volume_voxels  # same organ ...
    assert small.proportion == pytest.approx(8**3 / 20**3) and large.proportion == pytest.approx(8**3 / 28**3)


def test_outliers_are_discarded_from_five_volumes_only():
    assert robust_mean([0.1, 0.11, 0.09, 0.1, 0.5]) == (pytest.approx(0.1), (True, True, True, True, False))
    assert robust_mean([0.1, 0.11, 0.09, 0.5])[0] == pytest.approx(0.2)  # k < 5: plain mean
    vols = [blob_volume(f"c{i}", r) for i, r in enumerate([4, 4, 4, 4, 9])]
    (prior,) = size_priors(vols, ["liver"], (1, 1, 1))
    assert prior.n_used == 4 and prior.kept == (True,) * 4 + (False,)
    assert prior.volume_voxels == 8**3 and prior.proportion == pytest.approx(8**3 / 28**3)
    assert prior.values[-1] == pytest.approx(18**3 / 28**3)


def test_one_prior_per_structure_and_missing_structures_fail():
    vol = blob_volume("a", 3)
    label = vol.label.clone()
    label[0, 0:2, 0:2, 0:2] = 2  # a smaller component outside the body
    label[0, 8:12, 8:12, 8:12] = 2
    two = SupportVolume("a", vol.image, label)
    liver, spleen = size_priors([two], ["liver", "spleen"], (1, 1, 1))
    assert (liver.structure, spleen.structure) == ("liver", "spleen")
    assert spleen.proportion == pytest.approx(4**3 / 28**3)
    with pytest.raises(DataError, match="no support volume \\(a\\) contains kidney_left"):
        size_priors([vol], ["liver", "kidney_left"], (1, 1, 1))


def test_priors_round_trip_through_the_adapter_file(tiny_base, tmp_path):
    adapted = apply_method(tiny_base, "linear-probe", ["liver"])
    prior = size_priors([blob_volume("a", 4)], ["liver"], (1, 1, 1))
    tx = TransductiveConfig(mode="per-query", constraint="log-barrier")
    path = save_adapter(adapted, tmp_path / "a.safetensors", {"k": 1}, size_priors=prior, transductive=tx)
    header = read_adapter_header(path)
    assert header["version"] == 2 and header["record"] == {"k": 1}  # format fields, not provenance
    assert priors_from_header(header, str(path)) == prior and transductive_options(header, path) == tx
    bare = save_adapter(adapted, tmp_path / "b.safetensors", {"k": 1})
    with pytest.raises(
        CheckpointError, match="b.safetensors: the adapter holds no size prior; store one with"
    ):
        priors_from_header(read_adapter_header(bare), str(bare))


def test_version_1_adapter_files_still_load_with_their_priors(tiny_base, tmp_path):
    """Version 1 kept the priors and options in the record; they are read into the version 2 fields."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    adapted = apply_method(tiny_base, "linear-probe", ["liver"])
    prior = size_priors([blob_volume("a", 4)], ["liver"], (1, 1, 1))
    v2 = save_adapter(adapted, tmp_path / "v2.safetensors", {"k": 1}, size_priors=prior)
    with safe_open(str(v2), framework="pt") as f:
        header = json.loads(f.metadata()["fseft"])
    for key in ("size_priors", "transductive"):
        del header[key]
    tx = TransductiveConfig(mode="per-query", margin=0.2)
    header.update(version=1, record={"k": 1, **priors_to_record(prior),
                                     "transductive": {"config": tx.__dict__, "constraint_steps": 0}})  # fmt: skip
    v1 = tmp_path / "v1.safetensors"
    save_file(load_file(str(v2)), str(v1), metadata={"fseft": json.dumps(header)})
    loaded = read_adapter_header(v1)
    assert loaded["version"] == 1 and priors_from_header(loaded, str(v1)) == prior
    assert transductive_options(loaded, v1) == tx
    assert torch.equal(load_adapter(v1, tiny_base).head.weight, adapted.head.weight)


# --- penalties --------------------------------------------------------------------------------------


def grad_of(fn, p_hat: float, prior: float = 0.1, margin: float = 0.3, **kw) -> tuple[float, float]:
    x = torch.tensor(p_hat, requires_grad=True)
    value = fn(x, torch.tensor(prior), margin, **kw)
    value.backward()
    return float(value.detach()), float(x.grad)


def test_hinge_is_zero_inside_the_band_and_symmetric():
    for p in (0.071, 0.1, 0.129):
        assert grad_of(hinge_penalty, p) == (0.0, 0.0)
    over, g_over = grad_of(hinge_penalty, 0.15)
    under, g_under = grad_of(hinge_penalty, 0.05)
    assert over == pytest.approx(0.2**2) and under == pytest.approx(0.2**2)  # |0.5| - 0.3, both ways
    assert g_over == pytest.approx(2 * 0.2 / 0.1) and g_under == pytest.approx(-2 * 0.2 / 0.1)
    assert in_band(torch.tensor([0.069, 0.07, 0.13, 0.131]), torch.tensor(0.1), 0.3).tolist() == [
        False,
        True,
        True,
        False,
    ]


def test_log_barrier_extension_formula_continuity_and_signs():
    t = 5.0
    z = torch.tensor([-0.5, -1 / t**2, 0.0, 0.3])
    psi = log_barrier_extension(z, t)
    assert psi[0] == pytest.approx(-math.log(0.5) / t)
    assert psi[2] == pytest.approx(-math.log(1 / t**2) / t + 1 / t) and psi[3] == pytest.approx(
        t * 0.3 + psi[2]
    )
    edge = torch.tensor(-1 / t**2)
    assert float(log_barrier_extension(edge - 1e-6, t)) == pytest.approx(
        float(log_barrier_extension(edge + 1e-6, t)), abs=1e-4
    )
    _, g_over = grad_of(log_barrier_penalty, 0.2, t=t)
    _, g_under = grad_of(log_barrier_penalty, 0.02, t=t)
    _, g_centre = grad_of(log_barrier_penalty, 0.1, t=t)
    _, g_high = grad_of(log_barrier_penalty, 0.12, t=t)
    _, g_high_later = grad_of(log_barrier_penalty, 0.12, t=t * 10)
    assert g_over > 0 and g_under < 0 and g_centre == pytest.approx(0.0, abs=1e-4)
    assert g_high > g_high_later > 0  # inside: a gentle pull to the centre that fades as t grows
    with pytest.raises(ConfigError, match="t must be positive"):
        log_barrier_extension(z, 0.0)


def test_constraint_registry_and_config_validation():
    assert get_constraint("hinge") is hinge_penalty
    with pytest.raises(ConfigError, match="unknown size constraint 'l2'; choose one of: hinge, log-barrier"):
        get_constraint("l2")
    with pytest.raises(ConfigError, match="unknown transductive mode"):
        TransductiveConfig(mode="all")
    with pytest.raises(ConfigError, match="margin must be > 0"):
        TransductiveConfig(constraint="log-barrier", margin=0.0)
    assert TransductiveConfig().temperature(2) == pytest.approx(5 * 1.1**2)


# --- refinement on a biased head ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def probe(tiny_base):
    """A linear probe whose head gives a non-degenerate proportion, and one query's features."""
    torch.manual_seed(1)
    adapted = apply_method(tiny_base, "linear-probe", ["liver"])
    image, _ = spheres(3)
    cfg = TransductiveConfig(pool=1)
    (query,) = query_features(adapted, [torch.from_numpy(image)[None]], ["q"], cfg)
    with torch.no_grad():  # centre the bias so that about a third of the body is predicted
        logits = adapted.forward_features(query.features)
        adapted.head.bias -= torch.quantile(logits.flatten(), 0.66)
    return adapted, query


def proportion(adapted, query) -> float:
    with torch.no_grad():
        return float(predicted_proportions(adapted, query)[0])


def with_bias(adapted, shift: float):
    import copy

    shifted = copy.deepcopy(adapted)
    with torch.no_grad():
        shifted.head.bias += shift
    return shifted


@pytest.mark.parametrize("constraint", ["hinge", "log-barrier"])
@pytest.mark.parametrize("shift", [2.0, -2.0])
def test_constraint_moves_a_biased_prediction_into_the_band(probe, constraint, shift):
    adapted, query = probe
    p0 = proportion(adapted, query)
    prior = (SizePrior("liver", p0, 1.0, 1.0, 1, (p0,), (True,)),)
    biased = with_bias(adapted, shift)
    start = proportion(biased, query)
    assert (start > 1.3 * p0) if shift > 0 else (start < 0.7 * p0)
    cfg = TransductiveConfig(constraint=constraint, steps=40, lr=0.1)
    report = refine(biased, query, prior, cfg)
    end = proportion(biased, query)
    assert report.before[0] == pytest.approx(start) and report.after[0] == pytest.approx(end)
    assert 0.7 * p0 <= end <= 1.3 * p0, (start, end, p0)
    if constraint == "hinge":
        assert report.steps < cfg.steps  # stopped as soon as it entered the band


def test_hinge_leaves_an_in_band_prediction_exactly_unchanged(probe):
    adapted, query = probe
    p0 = proportion(adapted, query)
    prior = (SizePrior("liver", p0 * 1.2, 1.0, 1.0, 1, (p0,), (True,)),)
    model = with_bias(adapted, 0.0)
    before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    report = refine(model, query, prior, TransductiveConfig(steps=20, lr=0.05))
    assert report.steps == 0 and report.after == report.before
    assert all(torch.equal(before[k], v) for k, v in model.trainable_state_dict().items())


@pytest.mark.parametrize("constraint", ["hinge", "log-barrier"])
def test_an_overshooting_refinement_keeps_the_iterate_closest_to_the_band(probe, constraint):
    """A step size far too large jumps over the band into saturation; the best iterate is kept."""
    adapted, query = probe
    p0 = proportion(adapted, query)
    prior = (SizePrior("liver", p0, 1.0, 1.0, 1, (p0,), (True,)),)
    biased = with_bias(adapted, 2.0)
    report = refine(biased, query, prior, TransductiveConfig(constraint=constraint, steps=5, lr=50.0))
    with torch.no_grad():
        soft, mask = soft_and_mask_proportions(biased, query)
    # the written mask never ends further from the band than it started, and the report is the model's
    distance = lambda values: band_distance(torch.tensor(values), torch.tensor([p0]), 0.3)  # noqa: E731
    assert distance(report.mask_after) <= distance(report.mask_before) and report.mask_after[0] > 0
    assert report.after[0] == pytest.approx(float(soft[0])) and report.mask_after[0] == pytest.approx(float(mask[0]))
    assert 0 <= report.steps <= 5
    # without the safeguard this step size collapses the mask (checked on a copy, by plain Adam)
    raw = with_bias(adapted, 2.0)
    params = [p for p in raw.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=50.0)
    with torch.enable_grad():
        for step in range(5):
            loss = penalty(predicted_proportions(raw, query), torch.tensor([p0]),
                           TransductiveConfig(constraint=constraint), step)  # fmt: skip
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    assert not 0.7 * p0 <= proportion(raw, query) <= 1.3 * p0


def test_per_query_rate_defaults_to_the_methods_own(probe):
    adapted, query = probe
    p0 = proportion(adapted, query)
    prior = (SizePrior("liver", p0, 1.0, 1.0, 1, (p0,), (True,)),)
    assert TransductiveConfig().lr is None and adapted.lr == 1e-2
    default, explicit = with_bias(adapted, 2.0), with_bias(adapted, 2.0)
    refine(default, query, prior, TransductiveConfig(steps=3))
    refine(explicit, query, prior, TransductiveConfig(steps=3, lr=1e-2))
    assert torch.equal(default.head.bias, explicit.head.bias)


def test_per_query_refinement_starts_fresh_and_restores_the_adapter(probe):
    adapted, _ = probe
    model = with_bias(adapted, 2.0)
    original = {k: v.clone() for k, v in model.trainable_state_dict().items()}
    images = [torch.from_numpy(spheres(s)[0])[None] for s in (4, 5)]
    prior = (
        SizePrior(
            "liver",
            proportion(adapted, query_features(adapted, images[:1], ["q"], TransductiveConfig())[0]),
            1,
            1,
            1,
            (0.1,),
            (True,),
        ),
    )
    cfg = TransductiveConfig(mode="per-query", steps=30, lr=0.05)
    with PerQueryRefiner(model, prior, cfg) as refiner:
        first = refiner.refine("a", images[0])
        refiner.refine("b", images[1])
        assert not torch.equal(model.head.bias, original["head.bias"])  # left refined for predicting "b"
        again = refiner.refine("a", images[0])
    assert again.after == pytest.approx(first.after) and again.steps == first.steps
    assert [r.query for r in refiner.reports] == ["a", "b", "a"]
    assert all(torch.equal(original[k], v) for k, v in model.trainable_state_dict().items())


def test_methods_that_train_the_backbone_or_nothing_are_refused(tiny_base):
    image = torch.from_numpy(spheres(0)[0])[None]
    with pytest.raises(ConfigError, match="needs a black-box method .* 'bitfit'"):
        query_features(apply_method(tiny_base, "bitfit", ["liver"]), [image], ["q"], TransductiveConfig())
    with pytest.raises(ConfigError, match="'zero-shot' trains nothing"):
        query_features(apply_method(tiny_base, "zero-shot", ["liver"]), [image], ["q"], TransductiveConfig())


def test_pooled_proportion_matches_full_resolution_for_a_constant_head(probe):
    adapted, query = probe
    model = with_bias(adapted, 0.0)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(0.0)
    pooled = QueryFeatures(
        "q",
        torch.nn.functional.avg_pool3d(query.features, 2, ceil_mode=True),
        torch.nn.functional.avg_pool3d(query.weights, 2, ceil_mode=True),
        query.body_ml,
    )
    assert proportion(model, pooled) == pytest.approx(0.5) == proportion(model, query)


def test_volume_prior_follows_each_querys_field_of_view_and_is_stored(tiny_base, tmp_path):
    """The same organ (8^3 voxels) in queries showing 20^3 and 28^3 voxels of body: the proportion
    prior holds both to the support's proportion, the volume prior to each query's own."""
    spacing = tiny_base.config.preprocess.spacing
    adapted = apply_method(tiny_base, "linear-probe", ["liver"])
    priors = size_priors([blob_volume("s", 4, body=12)], ["liver"], spacing)
    images = [blob_volume(f"q{b}", 4, body=b).image for b in (10, 14)]
    queries = query_features(adapted, images, ["q10", "q14"], TransductiveConfig(pool=1))
    assert queries[0].body_ml == pytest.approx(20**3 * np.prod(spacing) / 1000)
    proportion = [float(query_prior(adapted, priors, q, "proportion")[0]) for q in queries]
    volume = [float(query_prior(adapted, priors, q, "volume")[0]) for q in queries]
    assert proportion == pytest.approx([8**3 / 24**3] * 2)
    assert volume == pytest.approx([8**3 / 20**3, 8**3 / 28**3])
    reports = {kind: [refine(adapted, q, priors, TransductiveConfig(prior=kind, steps=1)).prior[0] for q in queries]
               for kind in ("proportion", "volume")}  # fmt: skip
    assert reports["proportion"] == pytest.approx(proportion) and reports["volume"] == pytest.approx(volume)
    path = save_adapter(adapted, tmp_path / "a.safetensors", {}, size_priors=priors,
                        transductive=TransductiveConfig(mode="per-query", prior="volume"))  # fmt: skip
    assert transductive_options(read_adapter_header(path), path).prior == "volume"
    with pytest.raises(ConfigError, match="unknown size prior 'area'"):
        TransductiveConfig(prior="area")


# --- batch mode during training ------------------------------------------------------------------------


def support(seed: int) -> SupportVolume:
    image, label = spheres(seed)
    return SupportVolume(f"s{seed}", torch.from_numpy(image)[None], torch.from_numpy(label)[None])


def train(tiny_base, prior: float | None, margin: float = 0.3, constraint: str = "hinge"):
    torch.manual_seed(0)
    adapted = apply_method(tiny_base, "linear-probe", ["liver"])
    cfg = AdaptTrainConfig(max_epochs=5, num_samples=2, early_stopping=False, device="cpu")
    images = [torch.from_numpy(spheres(s)[0])[None] for s in (7, 8)]
    if prior is None:
        fit(adapted, [support(1)], cfg, lr=0.05, seed=0, path="cached")
        return adapted, None
    tx = TransductiveConfig(constraint=constraint, margin=margin, warmup_epochs=2, lam=1.0, pool=1)
    queries = query_features(adapted, images, ["q7", "q8"], tx)
    priors = (SizePrior("liver", prior, 1.0, 1.0, 1, (prior,), (True,)),)
    with BatchConstraint(adapted, queries, priors, tx) as constraint_steps:
        fit(adapted, [support(1)], cfg, lr=0.05, seed=0, path="cached", hook=constraint_steps)
    return adapted, constraint_steps


def test_batch_constraint_is_a_no_op_inside_the_band_and_pulls_otherwise(tiny_base):
    plain, _ = train(tiny_base, None)
    wide, steps = train(tiny_base, prior=0.5, margin=0.999)
    assert steps.applied == 3 and steps.computed == 4  # epochs 2..5; the last one is never applied
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            plain.trainable_state_dict().values(), wide.trainable_state_dict().values(), strict=True
        )
    )
    _, tight = train(tiny_base, prior=1e-4, margin=0.3)
    reports = tight.reports()
    assert [r.query for r in reports] == ["q7", "q8"] and reports[0].steps == 3
    assert all(r.after[0] < r.before[0] for r in reports)  # pushed towards the (tiny) prior


def test_batch_constraint_starts_at_the_supervised_plateau_and_gets_its_own_phase(tiny_base):
    torch.manual_seed(0)
    adapted = apply_method(tiny_base, "linear-probe", ["liver"])
    # min_delta this large: the plateau rule fires as soon as it can, at epoch 2 of each phase
    cfg = AdaptTrainConfig(
        max_epochs=8, num_samples=2, es_window=1, es_patience=1, es_min_delta=1e9, device="cpu"
    )
    tx = TransductiveConfig(warmup_epochs=1000, lam=1.0, pool=1)
    queries = query_features(adapted, [torch.from_numpy(spheres(7)[0])[None]], ["q7"], tx)
    priors = (SizePrior("liver", 1e-4, 1.0, 1.0, 1, (1e-4,), (True,)),)
    plain = fit(
        apply_method(tiny_base, "linear-probe", ["liver"]), [support(1)], cfg, lr=0.05, seed=0, path="cached"
    )
    assert plain.epochs_run == 2 and plain.stop_reason == "plateau"
    with BatchConstraint(adapted, queries, priors, tx) as steps:
        result = fit(adapted, [support(1)], cfg, lr=0.05, seed=0, path="cached", hook=steps)
    # supervised plateau at epoch 2 starts the constraint; the restarted rule fires again at epoch 4
    assert result.epochs_run == 4 and result.stop_reason == "plateau"
    assert steps.computed == 3 and steps.applied == 2  # epochs 2, 3, 4; the last one is never applied


def test_a_short_budget_still_gets_its_constrained_half(tiny_base):
    torch.manual_seed(0)
    adapted = apply_method(tiny_base, "linear-probe", ["liver"])
    cfg = AdaptTrainConfig(max_epochs=6, num_samples=2, early_stopping=False, device="cpu")
    tx = TransductiveConfig(warmup_epochs=1000, lam=1.0, pool=1)  # longer than the whole run
    queries = query_features(adapted, [torch.from_numpy(spheres(7)[0])[None]], ["q7"], tx)
    priors = (SizePrior("liver", 1e-4, 1.0, 1.0, 1, (1e-4,), (True,)),)
    with BatchConstraint(adapted, queries, priors, tx) as steps:
        fit(adapted, [support(1)], cfg, lr=0.05, seed=0, path="cached", hook=steps)
    assert steps.computed == 4 and steps.applied == 3  # epochs 3..6 of 6; the last one is never applied
