"""Pre-training step benchmark: time per step and peak memory per backbone / size / precision.

Runs the real training step (FoundationModel forward, partial-label Dice + BCE, backward, AdamW) on
random volumes with all 29 universal structures annotated, and prints a table. Also measures, on
CPU, the throughput of 2-process DDP (gloo) relative to one process.

    python perf/train_step.py                 # CPU: unet-small-16 vs resunet-8 at 64^3 (ratio), SwinUNETR-12, DDP
    python perf/train_step.py --full          # + SwinUNETR-48 96^3 on CPU
    python perf/train_step.py --device cuda   # every backbone and size, fp32 and bf16

Every case trains batches of 2 crops (one step of ``fseft pretrain --batch-size 2 --num-samples 1``;
with batch 1, PyTorch's CPU heuristic sends small 3D convolutions to its slow native kernel
instead of oneDNN). On CPU the table ends with each case's crops per second relative to
``unet-small``-16 at 64^3, the baseline measured in the same run. Time is the median over
``--steps`` steps after ``--warmup`` steps. Peak memory is
``torch.cuda.max_memory_allocated`` on GPU and the peak growth of the process RSS (sampled every
2 ms) over the model's creation and steps on CPU.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch
import torch.multiprocessing as mp
from rich.console import Console
from rich.table import Table

from fseft.anatomy import UNIVERSAL_29
from fseft.config import PreprocessConfig
from fseft.models import ModelConfig, build_model
from fseft.runtime import autocast, seed_everything
from fseft.training.losses import PartialLabelLoss


@dataclass(frozen=True)
class Case:
    arch: str
    feature_size: int
    roi: int
    amp: str = "off"
    batch: int = 2
    channels_last: bool = False

    @property
    def name(self) -> str:
        return f"{self.arch}-{self.feature_size}" + (" (channels_last)" if self.channels_last else "")


@dataclass(frozen=True)
class Result:
    case: Case
    seconds: float
    peak_mib: float


class RssPeak:
    """Peak RSS growth of this process while the context is open (sampled in a thread)."""

    def __enter__(self) -> RssPeak:
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def make_step(case: Case, device: torch.device, ddp: bool = False) -> Callable[[], None]:
    """A zero-argument training step for ``case`` (model, loss, optimiser and batch built once)."""
    seed_everything(0)
    cfg = ModelConfig(
        arch=case.arch,
        feature_size=case.feature_size,
        structures=UNIVERSAL_29,
        preprocess=PreprocessConfig(roi=(case.roi,) * 3),
    )
    model = build_model(cfg).to(device)
    memory_format = torch.channels_last_3d if case.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    loss_fn = PartialLabelLoss()
    scaler = torch.amp.GradScaler("cuda", enabled=case.amp == "fp16")
    shape = (case.batch, 1, case.roi, case.roi, case.roi)
    image = torch.rand(shape, device=device).contiguous(memory_format=memory_format)
    label = (torch.rand((case.batch, len(UNIVERSAL_29), *shape[2:]), device=device) > 0.9).float()
    annotated = torch.ones(case.batch, len(UNIVERSAL_29), dtype=torch.bool, device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(device, case.amp):
            logits = net(image)
        scaler.scale(loss_fn(logits, label, annotated)).backward()
        scaler.step(opt)
        scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return step


def time_steps(step: Callable[[], None], warmup: int, steps: int) -> float:
    """Median seconds of ``steps`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(case: Case, device: torch.device, warmup: int, steps: int) -> Result:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        seconds = time_steps(make_step(case, device), warmup, steps)
        return Result(case, seconds, torch.cuda.max_memory_allocated(device) / 2**20)
    with RssPeak() as mem:
        seconds = time_steps(make_step(case, device), warmup, steps)
    return Result(case, seconds, mem.mib)


def _ddp_worker(rank: int, world: int, port: int, case: Case, warmup: int, steps: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        seconds = time_steps(make_step(case, torch.device("cpu"), ddp=True), warmup, steps)
        out[rank] = seconds
    finally:
        torch.distributed.destroy_process_group()


def ddp_ratio(case: Case, warmup: int, steps: int) -> tuple[float, float, float]:
    """(1-process s/step, 2-process s/step, throughput ratio) on CPU with gloo."""
    single = time_steps(make_step(case, torch.device("cpu")), warmup, steps)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_ddp_worker, args=(2, port, case, warmup, steps, out), nprocs=2, join=True)
        double = max(out.values())
    return single, double, 2 * single / double


#: The reference of the CPU ratios: the pre-training step of ``unet-small``-16 at 64^3.
BASELINE = Case("unet-small", 16, 64)


def cases_for(device: torch.device, full: bool) -> list[Case]:
    if device.type == "cuda":
        sizes = [Case("unet-small", 16, 96), Case("unet3d", 64, 96), Case("swinunetr", 12, 64),
                 Case("swinunetr", 48, 96)]  # fmt: skip
        return [Case(c.arch, c.feature_size, c.roi, amp) for c in sizes for amp in ("off", "bf16")]
    cases = [BASELINE, Case("resunet", 8, 64), Case("resunet", 8, 64, channels_last=True),
             Case("resunet", 12, 64, channels_last=True), Case("swinunetr", 12, 64)]  # fmt: skip
    return cases + ([Case("unet-small", 16, 96), Case("swinunetr", 48, 96)] if full else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--full", action="store_true", help="include SwinUNETR-48 at 96^3 on CPU")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--no-ddp", action="store_true", help="skip the CPU DDP throughput ratio")
    args = parser.parse_args()
    name = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = torch.device("cpu" if name == "auto" else name)
    console = Console()
    what = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    table = Table(title=f"pre-training step (2 crops, 29 structures) on {what}")
    for col in ("backbone", "roi", "precision", "s/step", "crops/s", "peak MiB", "x baseline"):
        table.add_column(col, justify="right" if col not in ("backbone", "precision") else "left")
    results = [bench(case, device, args.warmup, args.steps) for case in cases_for(device, args.full)]
    base = next((r for r in results if r.case == BASELINE), None)
    for r in results:
        case = r.case
        precision = "fp32" if case.amp == "off" else case.amp
        ratio = f"{base.seconds / r.seconds:.2f}" if base is not None else "-"
        table.add_row(case.name, f"{case.roi}^3", precision, f"{r.seconds:.3f}", f"{case.batch / r.seconds:.2f}",
                      f"{r.peak_mib:.0f}", ratio)  # fmt: skip
    console.print(table)
    if device.type == "cpu" and not args.no_ddp:
        case = Case("unet-small", 16, 64)
        single, double, ratio = ddp_ratio(case, args.warmup, args.steps)
        console.print(
            f"DDP on CPU (gloo), {case.name} {case.roi}^3: 1 process {single:.3f} s/step, "
            f"2 processes {double:.3f} s/step -> throughput x{ratio:.2f}"
        )


if __name__ == "__main__":
    main()
