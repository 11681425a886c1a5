"""Runtime plumbing: device choice, seeding, mixed precision, RNG snapshots and torch.distributed.

Nothing here runs at import time; every function acts only when called.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

#: accepted values of ``--amp``.
AMP_MODES = ("off", "bf16", "fp16")


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """Turn a device name into a :class:`torch.device`.

    Args:
        name: ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        local_rank: GPU index used for ``"auto"``/``"cuda"`` under ``torchrun``.

    Returns:
        The device.

    Raises:
        ConfigError: if CUDA is requested but not available, or the name is not a device.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise ConfigError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def machine_summary() -> str:
    """This machine in one line (processor, cores, memory, GPU), for results that say where they ran."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.is_file() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {gpu}"


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global RNG and torch (all CUDA devices too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_amp(amp: str, device: torch.device) -> str:
    """The mixed-precision mode that will actually run on ``device``.

    Autocast is used only on CUDA: on CPU bf16 autocast is 10-600x slower for 3D convolutions,
    so a request for it is ignored with a warning.

    Args:
        amp: ``"off"``, ``"bf16"`` or ``"fp16"``.
        device: Where the model runs.

    Returns:
        ``amp`` on CUDA, ``"off"`` on CPU.

    Raises:
        ConfigError: on an unknown mode, or bf16 on a GPU without bf16 support.
    """
    if amp not in AMP_MODES:
        raise ConfigError(f"unknown amp mode {amp!r}; valid: {list(AMP_MODES)}")
    if amp == "off":
        return amp
    if device.type != "cuda":
        log.warning(
            "mixed precision (%s) ignored on %s: autocast is much slower than fp32 there", amp, device
        )
        return "off"
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("amp bf16 requested but this GPU does not support bfloat16; use --amp fp16")
    return amp


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager[Any]:
    """An autocast context for ``amp`` (from :func:`resolve_amp`), or a no-op when it is ``"off"``."""
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def capture_rng_state() -> dict[str, Any]:
    """Snapshot python, numpy, torch and CUDA RNG states in a ``weights_only``-loadable form.

    Returns:
        A dict of tensors, lists and scalars (no numpy arrays, no tuples of objects).
    """
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "kind": np_kind,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore a snapshot taken by :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state((npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a (possibly single-process) job.

    Args:
        rank: Global rank.
        world_size: Number of processes.
        local_rank: Rank on this node (selects the GPU).
        device: This process's device.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and logs progress."""
        return self.rank == 0


def init_distributed(device: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Join the process group that ``torchrun`` describes in the environment, if any.

    Uses ``nccl`` on CUDA and ``gloo`` on CPU. Without ``WORLD_SIZE`` > 1 in the environment this is
    a single-process context and no process group is created.

    Args:
        device: Device name (see :func:`resolve_device`); CUDA ranks use GPU ``LOCAL_RANK``.
        timeout_s: Collective timeout.

    Returns:
        The context of this process.

    Raises:
        ConfigError: on an invalid device, or a CUDA job with more local ranks than GPUs.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size <= 1:
        return DistContext(device=dev)
    if dev.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible")
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    log.debug("rank %d/%d joined (%s on %s)", rank, world_size, backend, dev)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.distributed and torch.distributed.is_initialized():
        if ctx.device.type == "cuda":
            torch.distributed.barrier(device_ids=[ctx.device.index])
        else:
            torch.distributed.barrier()


def teardown_distributed(ctx: DistContext) -> None:
    """Barrier, then destroy the process group (no-op in a single process)."""
    if ctx.distributed and torch.distributed.is_initialized():
        barrier(ctx)
        torch.distributed.destroy_process_group()


@contextlib.contextmanager
def distributed_session(device: str = "auto") -> Iterator[DistContext]:
    """:func:`init_distributed` on entry, :func:`teardown_distributed` on a clean exit.

    On an exception the process group is destroyed without a barrier (the other ranks may be gone).
    """
    ctx = init_distributed(device)
    try:
        yield ctx
    except BaseException:
        if ctx.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise
    teardown_distributed(ctx)
