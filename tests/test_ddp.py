"""DDP pre-training under ``torchrun`` (gloo on CPU): ranks stay in sync, only rank 0 writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fseft.training.checkpointing import load_checkpoint

_SCRIPT = """
import json, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_pretrain import STRUCTURES, _cfg, tiny_model, toy_sources
from fseft.runtime import distributed_session
from fseft.training.pretrain import pretrain

out = Path(sys.argv[1])
with distributed_session("cpu") as ctx:
    sources = toy_sources()
    result = pretrain(tiny_model(seed=ctx.rank), sources, STRUCTURES, _cfg(steps=4), out / "run", ctx=ctx,
                      val_samples=sources[0].eval_samples(), roi=(32, 32, 32))
    (out / f"rank{{ctx.rank}}.json").write_text(
        json.dumps({{"hash": result.model.fingerprint(), "world": ctx.world_size, "val": result.val_dice}})
    )
"""


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical(tmp_path: Path) -> None:
    script = tmp_path / "ddp.py"
    script.write_text(_SCRIPT.format(tests=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(tmp_path),
    ]
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    # different initialisations per rank: DDP broadcasts rank 0's, and the updates stay in sync
    assert ranks[0]["hash"] == ranks[1]["hash"]
    assert ranks[0]["val"] == ranks[1]["val"] and set(ranks[0]["val"]) == {"liver", "spleen"}
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert state["step"] == 4 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # each rank its own
    lines = (tmp_path / "run" / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]  # written once, by rank 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "train_log.jsonl"]
