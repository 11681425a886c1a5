"""Pre-training: sampler, schedule, RNG snapshots, the loop, checkpoints and exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.transforms import Compose, RandFlipd, RandSpatialCropSamplesd

from fseft.config import PreprocessConfig
from fseft.errors import CheckpointError, ConfigError, DataError, TrainingError
from fseft.models.config import ModelConfig
from fseft.models.foundation import FoundationModel, build_model
from fseft.runtime import DistContext, capture_rng_state, restore_rng_state, seed_everything
from fseft.training.checkpointing import TrainLog, load_checkpoint
from fseft.training.config import TrainConfig
from fseft.training.pretrain import StepReport, pretrain
from fseft.training.sampling import BalancedSampler, StepBatches
from fseft.training.schedule import warmup_cosine
from fseft.training.validation import validation_dice

STRUCTURES = ("liver", "spleen", "kidney_left")
ROI = (32, 32, 32)


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """Tiny 3D nets run faster (and reproducibly) on one thread, especially on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ToyCases:
    """In-memory volumes with sphere labels and MONAI random crops + flips (a case dataset)."""

    def __init__(self, n: int, annotated: tuple[bool, ...], seed: int = 0, size: int = 36, crops: int = 2):
        rng = np.random.default_rng(seed)
        grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"))
        self.items = []
        for _ in range(n):
            label = np.zeros((len(annotated), size, size, size), dtype=np.float32)
            for s in range(len(annotated)):
                centre = rng.uniform(5, size - 5, size=3)[:, None, None, None]
                label[s] = ((grid - centre) ** 2).sum(0) < rng.uniform(9, 25)
            image = (label * np.arange(1, len(annotated) + 1)[:, None, None, None]).sum(0, keepdims=True)
            image = (image / len(annotated) + 0.1 * rng.standard_normal(image.shape)).astype(np.float32)
            self.items.append((image, label, np.asarray(annotated)))
        self.transform = Compose(
            [
                RandSpatialCropSamplesd(["image", "label"], ROI, num_samples=crops, random_size=False),
                RandFlipd(["image", "label"], prob=0.5, spatial_axis=0),
            ]
        )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> list[dict[str, Any]]:
        image, label, annotated = self.items[i]
        crops = self.transform({"image": image, "label": label})
        return [{**c, "annotated": torch.as_tensor(annotated)} for c in crops]

    def eval_samples(self) -> list[dict[str, Any]]:
        return [{"image": im, "label": lb, "annotated": an} for im, lb, an in self.items]


def toy_sources() -> list[ToyCases]:
    return [ToyCases(3, (True, True, False), seed=1), ToyCases(2, (False, False, True), seed=2)]


def tiny_model(seed: int = 0, dropout: float = 0.1) -> FoundationModel:
    seed_everything(seed)
    cfg = ModelConfig(
        arch="unet-small",
        feature_size=4,
        structures=STRUCTURES,
        preprocess=PreprocessConfig(roi=ROI),
        dropout=dropout,
    )
    return build_model(cfg)


def test_sampler_is_deterministic_balanced_and_sharded() -> None:
    sampler = BalancedSampler([1, 50], seed=3, batch_size=2, world_size=2)
    assert sampler.draw(7) == BalancedSampler([1, 50], seed=3, batch_size=2, world_size=2).draw(7)
    assert sampler.draw(7) != sampler.draw(8)
    counts = np.zeros(2)
    for step in range(500):
        slots = sampler.draw(step)
        assert sampler.indices(step, 0) + sampler.indices(step, 1) == slots
        big = [c for d, c in slots if d == 1]
        assert len(big) == len(set(big))  # distinct cases of the same dataset within a step
        for d, c in slots:
            counts[d] += 1
            assert 0 <= c < [1, 50][d]
    assert abs(counts[0] / counts.sum() - 0.5) < 0.05  # the 1-case dataset is drawn as often as the big one
    weighted = BalancedSampler([5, 5], weights=[3, 1], seed=0, batch_size=4)
    share = np.mean([d == 0 for s in range(300) for d, _ in weighted.draw(s)])
    assert abs(share - 0.75) < 0.05
    with pytest.raises(CheckpointError, match="seed"):
        sampler.load_state_dict(BalancedSampler([1, 50], seed=4, batch_size=2, world_size=2).state_dict())
    with pytest.raises(ConfigError, match="at least one case"):
        BalancedSampler([3, 0])


def test_step_batches_replay_exactly_per_step() -> None:
    sources = toy_sources()
    batches = StepBatches(sources, BalancedSampler([3, 2], seed=0, batch_size=2), rank=0, steps=10)
    first = batches[4]
    assert first["image"].shape == (4, 1, *ROI) and first["label"].shape == (4, 3, *ROI)
    assert first["annotated"].dtype == torch.bool and first["annotated"].shape == (4, 3)
    _ = batches[5], batches[1]
    again = batches[4]
    for key in first:
        assert torch.equal(first[key], again[key])
    assert not torch.equal(batches[5]["image"], first["image"])
    other_rank = StepBatches(sources, BalancedSampler([3, 2], seed=0, batch_size=2, world_size=2), 1, 10)[4]
    assert not torch.equal(other_rank["image"], first["image"])


def test_warmup_cosine_schedule_and_state_round_trip(tmp_path: Path) -> None:
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, warmup=4, total=14, min_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] > 0.1 and lrs[-1] < 0.15
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    torch.save(sched.state_dict(), tmp_path / "s.pt")
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = warmup_cosine(opt2, warmup=0, total=2)
    sched2.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert sched2.get_last_lr() == sched.get_last_lr()
    with pytest.raises(ConfigError, match="warmup"):
        warmup_cosine(opt, warmup=5, total=5)


def test_rng_state_round_trips_through_weights_only_load(tmp_path: Path) -> None:
    import random

    seed_everything(11)
    torch.save(capture_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_runtime_devices_and_amp_policy(caplog: pytest.LogCaptureFixture) -> None:
    from fseft.runtime import autocast, resolve_amp, resolve_device

    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="device"):
        resolve_device("tpu")
    with caplog.at_level("WARNING"):
        assert resolve_amp("bf16", cpu) == "off"
    assert "ignored on cpu" in caplog.text
    with pytest.raises(ConfigError, match="amp"):
        resolve_amp("fp8", cpu)
    with autocast(cpu, "off"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


def test_validation_dice_scores_annotated_structures_only() -> None:
    sample = ToyCases(1, (True, False, True), seed=5).eval_samples()[0]
    label = torch.as_tensor(sample["label"])

    class Oracle(torch.nn.Module):
        """Predicts the true label of channel 0, the opposite of channel 2 (sliding window aside)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.full((x.shape[0], 3, *x.shape[2:]), -10.0)
            out[:, 0] = torch.where(x[:, 0] > 0.2, 10.0, -10.0)
            out[:, 2] = 10.0
            return out

    sample = {**sample, "image": (label[0:1] > 0).float() * 0.33}
    dice = validation_dice(Oracle(), [sample], STRUCTURES, ROI, DistContext())
    assert set(dice) == {"liver", "kidney_left"}
    assert dice["liver"] == pytest.approx(1.0)
    expected = 2 * label[2].sum() / (label[2].sum() + label[2].numel())
    assert dice["kidney_left"] == pytest.approx(float(expected), rel=1e-5)


def _cfg(**kw: Any) -> TrainConfig:
    base = dict(steps=6, batch_size=1, lr=3e-3, warmup=1, seed=0, ckpt_every=2, log_every=1, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_pretrain_trains_logs_checkpoints_and_validates(tmp_path: Path) -> None:
    sources = toy_sources()
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reports: list[StepReport] = []
    result = pretrain(
        model, sources, STRUCTURES, _cfg(val_every=3), tmp_path, val_samples=sources[0].eval_samples(),
        roi=ROI, callback=reports.append,
    )  # fmt: skip
    assert result.step == 6 and [r.step for r in reports] == list(range(1, 7))
    assert all(np.isfinite(r.loss) and r.volumes_per_s > 0 for r in reports)
    assert reports[0].lr == pytest.approx(3e-3) and reports[-1].lr < 1e-3
    assert [r.step for r in reports if r.val_dice is not None] == [3, 6]
    assert set(result.val_dice) == {"liver", "spleen"}  # kidney_left is not annotated in the val cases
    changed = [
        k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])
    ]
    assert any(k.startswith("head.") for k in changed) and any(k.startswith("backbone.") for k in changed)
    records = TrainLog(tmp_path / "train_log.jsonl").records()
    assert [r["step"] for r in records] == list(range(1, 7))
    assert records[2]["val_dice"].keys() == {"liver", "spleen"}
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 6 and len(state["rng"]) == 1
    for k, v in model.state_dict().items():
        assert torch.equal(state["model"][k], v)
    with pytest.raises(ConfigError, match="exists"):
        pretrain(tiny_model(), sources, STRUCTURES, _cfg(), tmp_path)
    with pytest.raises(CheckpointError, match="lr"):
        pretrain(tiny_model(), sources, STRUCTURES, _cfg(lr=1e-3), tmp_path, resume=True)


def test_non_finite_loss_stops_with_an_error_and_no_checkpoint(tmp_path: Path, monkeypatch) -> None:
    import fseft.training.pretrain as loop

    real = loop.PartialLabelLoss

    class Diverging(real):
        def forward(self, *args: Any) -> torch.Tensor:
            return super().forward(*args) * float("nan")

    monkeypatch.setattr(loop, "PartialLabelLoss", Diverging)
    with pytest.raises(TrainingError, match="step 1: the loss is nan .*nothing was written"):
        pretrain(tiny_model(), toy_sources(), STRUCTURES, _cfg(), tmp_path)
    assert not (tmp_path / "checkpoint.pt").exists()


class _Crash(Exception):
    pass


def test_resume_after_crash_matches_uninterrupted_run(tmp_path: Path) -> None:
    full = pretrain(tiny_model(), toy_sources(), STRUCTURES, _cfg(), tmp_path / "full").model

    def crash(report: StepReport) -> None:
        if report.step == 3:
            raise _Crash

    with pytest.raises(_Crash):
        pretrain(tiny_model(), toy_sources(), STRUCTURES, _cfg(), tmp_path / "crash", callback=crash)
    assert load_checkpoint(tmp_path / "crash" / "checkpoint.pt")["step"] == 2
    # a different initialisation proves the weights come from the checkpoint
    resumed = pretrain(tiny_model(seed=9), toy_sources(), STRUCTURES, _cfg(), tmp_path / "crash", resume=True)
    assert resumed.resumed_from == 2
    for k, v in full.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[k], v, rtol=0, atol=0)
    log = TrainLog(tmp_path / "crash" / "train_log.jsonl").records()
    assert [r["step"] for r in log] == list(range(1, 7))
    full_log = TrainLog(tmp_path / "full" / "train_log.jsonl").records()
    assert [r["loss"] for r in log] == [r["loss"] for r in full_log]
    # training time adds up over the resume: a learning curve in compute time needs no gaps
    elapsed = [r["elapsed_s"] for r in log]
    assert elapsed == sorted(elapsed) and resumed.elapsed_s == pytest.approx(elapsed[-1], abs=0.1)
    assert load_checkpoint(tmp_path / "crash" / "checkpoint.pt")["elapsed_s"] == resumed.elapsed_s


def test_channels_last_training_matches_contiguous(tmp_path: Path) -> None:
    def model() -> FoundationModel:
        seed_everything(0)
        return build_model(ModelConfig(arch="resunet", feature_size=4, structures=STRUCTURES,
                                       preprocess=PreprocessConfig(roi=ROI)))  # fmt: skip

    plain = pretrain(model(), toy_sources(), STRUCTURES, _cfg(steps=3), tmp_path / "a").model
    fast = pretrain(model(), toy_sources(), STRUCTURES, _cfg(steps=3, channels_last=True), tmp_path / "b").model
    assert fast.head.weight.is_contiguous(memory_format=torch.channels_last_3d)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[k], v, rtol=1e-3, atol=1e-4)


@pytest.fixture(scope="module")
def synth_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fseft.data.synth import generate_assembly

    return generate_assembly(tmp_path_factory.mktemp("synth"), cases=6, preset="tiny", workers=1).manifest


def _cli_args(manifest: Path, out: Path, cache: Path, steps: int = 4) -> list[str]:
    return [
        "pretrain", "--manifest", str(manifest), "--splits", "pretrain", "--val-cases", "1",
        "--model-arch", "unet-small", "--feature-size", "4", "--spacing", "8", "8", "8", "--roi", "32", "32", "32",
        "--num-samples", "1", "--steps", str(steps), "--lr", "3e-3", "--ckpt-every", "1", "--log-every", "1",
        "--device", "cpu", "--cache-dir", str(cache), "--out", str(out),
    ]  # fmt: skip


@pytest.mark.slow
def test_cli_pretrain_writes_model_log_and_refuses_to_overwrite(
    synth_manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fseft.cli import main
    from fseft.models import load_model

    out = tmp_path / "run"
    assert main(_cli_args(synth_manifest, out, tmp_path / "cache")) == 0
    model = load_model(out / "model.pt")
    # union of the pre-training sites' structures, in the paper's universal order
    assert model.structures[:4] == ("spleen", "kidney_right", "kidney_left", "gallbladder")
    assert "duodenum" not in model.structures  # a novel structure, annotated only at the target site
    extra = model.extra
    assert extra["steps"] == 4 and extra["seed"] == 0 and extra["command"].startswith("fseft pretrain")
    assert set(extra["val_dice"]) <= set(model.structures) and extra["val_dice"]
    assert sum(extra["datasets"].values()) == 3 and extra["data"]["val_cases"] == 1
    assert [r["step"] for r in TrainLog(out / "train_log.jsonl").records()] == [1, 2, 3, 4]
    capsys.readouterr()
    assert main(_cli_args(synth_manifest, out, tmp_path / "cache")) == 2
    err = capsys.readouterr().err
    assert "fseft: error:" in err and "checkpoint.pt: already exists; pass --resume" in err


@pytest.mark.slow
def test_library_pretraining_is_the_road_the_cli_takes(synth_manifest: Path, tmp_path: Path) -> None:
    """pretrain_foundation on the typed job the CLI builds gives the same weights as 'fseft pretrain'."""
    from fseft.cli import main
    from fseft.models import load_model
    from fseft.training.api import PretrainJob, pretrain_foundation
    from fseft.training.assembly import AssemblyConfig, DatasetSpec

    assert main(_cli_args(synth_manifest, tmp_path / "cli", tmp_path / "cache", steps=2)) == 0
    job = PretrainJob(
        assembly=AssemblyConfig((DatasetSpec(synth_manifest, splits=("pretrain",)),), val_cases=1),
        preprocess=PreprocessConfig(spacing=(8.0, 8.0, 8.0), roi=(32, 32, 32), num_samples=1),
        train=TrainConfig(steps=2, lr=3e-3, ckpt_every=1, log_every=1, device="cpu"),
        out=tmp_path / "api", arch="unet-small", feature_size=4, cache_dir=tmp_path / "cache",
    )  # fmt: skip
    outcome = pretrain_foundation(job, extra={"by": "test"})
    assert outcome.path == tmp_path / "api" / "model.pt"
    cli, api = load_model(tmp_path / "cli" / "model.pt"), load_model(outcome.path)
    assert api.config == cli.config and api.extra["by"] == "test" and api.extra["steps"] == 2
    for k, v in cli.state_dict().items():
        torch.testing.assert_close(api.state_dict()[k], v, rtol=0, atol=0)


@pytest.mark.slow
def test_cli_resume_after_sigkill_matches_uninterrupted_run(synth_manifest: Path, tmp_path: Path) -> None:
    from fseft.cli import main

    cache = tmp_path / "cache"
    steps = 12
    assert main(_cli_args(synth_manifest, tmp_path / "full", cache, steps)) == 0
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "fseft", *_cli_args(synth_manifest, killed, cache, steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert load_checkpoint(killed / "checkpoint.pt")["step"] < steps and not (killed / "model.pt").exists()
    subprocess.run([*cmd, "--resume"], env=env, check=True, stdout=subprocess.DEVNULL)
    a = torch.load(tmp_path / "full" / "model.pt", weights_only=True)["state_dict"]
    b = torch.load(killed / "model.pt", weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)
    steps_logged = [
        json.loads(line)["step"] for line in (killed / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert steps_logged == list(range(1, steps + 1))


def test_assembly_yaml_subsets_weights_and_holds_out(synth_manifest: Path, tmp_path: Path) -> None:
    from fseft.training.assembly import load_assembly, resolve_assembly

    rel = os.path.relpath(synth_manifest, tmp_path)
    (tmp_path / "asm.yaml").write_text(
        f"val_cases: 1\ndatasets:\n"
        f"  - {{manifest: {rel}, splits: [pretrain], structures: [Liver, spleen], weight: 2}}\n"
        f"  - {{manifest: {rel}, splits: [target], template: synth}}\n"
    )
    cfg = load_assembly(tmp_path / "asm.yaml")
    assert cfg.datasets[0].manifest == tmp_path / rel and cfg.datasets[0].structures == ("Liver", "spleen")
    asm = resolve_assembly(cfg, seed=0)
    names = [name for name, _ in asm.groups]
    assert names == ["manifest:synth_a", "manifest:synth_b", "manifest:synth_c", "manifest:synth_t"]
    assert asm.weights == (2.0, 2.0, 2.0, 1.0)
    for _, cases in asm.groups[:3]:
        assert all(set(c.structures) <= {"liver", "spleen"} for c in cases)
    assert "duodenum" in asm.structures and asm.structures[:2] == ("spleen", "kidney_right")
    assert len(asm.val_cases) == 1 and all(len(cases) >= 1 for _, cases in asm.groups)
    assert sum(len(c) for _, c in asm.groups) + 1 == 6
    (tmp_path / "bad.yaml").write_text(f"datasets:\n  - {{manifest: {rel}, wieght: 2}}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: .*wieght"):
        load_assembly(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text(f"- manifest: {rel}\n  splits: [nope]\n")
    with pytest.raises(DataError, match="no labelled training cases"):
        resolve_assembly(load_assembly(tmp_path / "list.yaml"))
