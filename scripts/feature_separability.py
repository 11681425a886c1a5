"""Can a head on a foundation model's frozen features tell a structure from everything else?

    python scripts/feature_separability.py --model resunet.openkbp --task larynx
    python scripts/feature_separability.py --model resunet.openkbp --task brainstem

Takes the ``openkbp`` protocol's support pool for ``--task``, computes the model's decoder feature
map (the input of its head, what black-box methods see) on the first ``--train`` cases and on the
next one, fits Fisher's linear discriminant (structure vs every other voxel) on the first ones and
prints, for the training cases and for the held-out case: the ROC AUC, and the precision of the
top-scored voxels when as many are kept as the structure has (1.0: a linear head could segment it;
near 0: the structure is not linearly separable in these features, so a linear probe cannot learn
it, however long it trains). ``--decoder-stages`` adds the outputs of the decoder's coarser stages,
upsampled (a resunet's ``backbone.up`` blocks: 16, 32 and 64 more channels for resunet-8), to ask
whether what the last stage lost is still there one level up. A diagnostic of the model, not of an
adaptation method.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from fseft.adapt.support import load_support_volumes
from fseft.benchmark import load_protocol, plan
from fseft.models import load_model
from fseft.models.predict import sliding_window_logits


def auc(score: torch.Tensor, target: torch.Tensor) -> float:
    """ROC AUC by ranks (Mann-Whitney)."""
    ranks = torch.empty(len(score), dtype=torch.float64)
    ranks[torch.argsort(score)] = torch.arange(1, len(score) + 1, dtype=torch.float64)
    pos = int(target.sum())
    return float((ranks[target].sum() - pos * (pos + 1) / 2) / (pos * (len(score) - pos)))


def precision_at_size(score: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of the structure among the ``|structure|`` top-scored voxels."""
    return float(target[torch.topk(score, int(target.sum())).indices].float().mean())


def stage_features(base, x: torch.Tensor, stages: bool) -> torch.Tensor:
    """The final feature map of ``x``, with the decoder stages' outputs upsampled onto it when ``stages``."""
    if not stages:
        return base.features(x)
    ups = getattr(base.backbone, "up", None)
    if ups is None:
        raise SystemExit(f"--decoder-stages needs a backbone with 'up' blocks (resunet), not {base.config.arch}")
    outs: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda _m, _i, out: outs.append(out)) for block in ups]
    try:
        final = base.features(x)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([final, *(F.interpolate(o, size=x.shape[2:], mode="trilinear", align_corners=False) for o in outs)], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(os.environ.get("FSEFT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument("--data-root", type=Path, default=shared / "openkbp", help="folder holding OpenKBP's cases.csv")
    parser.add_argument("--model", default="resunet.openkbp", help="model name or file")
    parser.add_argument("--task", required=True, help="a task of the openkbp protocol")
    parser.add_argument("--train", type=int, default=3, help="support cases the discriminant is fitted on")
    parser.add_argument("--decoder-stages", action="store_true", help="add the coarser decoder stages' outputs")
    parser.add_argument("--negatives", type=float, default=1.0,
                        help="fraction of background voxels of the training cases kept for the fit (memory)")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    p = plan(load_protocol("openkbp"), data_root=args.data_root, out=".", model=args.model, check_methods=False)
    task = p.task(args.task)
    base = load_model(args.model).eval()
    pre = base.config.preprocess
    volumes = load_support_volumes(task.pool[: args.train + 1], task.spec.structures, pre)
    feats, labels = [], []
    draw = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for v in volumes:
            f = sliding_window_logits(lambda t: stage_features(base, t, args.decoder_stages), v.image[None],
                                      pre.roi, overlap=0.5, sw_batch_size=2)[0]  # fmt: skip
            f, lab = f.reshape(f.shape[0], -1).T, v.label.reshape(-1) == 1
            if len(feats) < args.train:  # training case: every structure voxel, a share of the rest
                keep = lab | (torch.rand(len(lab), generator=draw) < args.negatives)
                f, lab = f[keep], lab[keep]
            feats.append(f.double())
            labels.append(lab)
    x, y = torch.cat(feats[:-1]), torch.cat(labels[:-1])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z = (x - mu) / sd
    within = torch.cov(z[~y].T) + 1e-3 * torch.eye(z.shape[1], dtype=z.dtype)
    w = torch.linalg.solve(within, z[y].mean(0) - z[~y].mean(0))
    held = ((feats[-1] - mu) / sd) @ w
    print(f"{args.model}: {x.shape[1]} feature channels; task {args.task} ({', '.join(task.spec.structures)})")
    print(f"  fitted on {args.train} cases (the kept voxels): AUC {auc(z @ w, y):.3f}, precision at structure size "
          f"{precision_at_size(z @ w, y):.3f}")  # fmt: skip
    print(f"  held-out case {volumes[-1].case_id}: AUC {auc(held, labels[-1]):.3f}, precision at structure "
          f"size {precision_at_size(held, labels[-1]):.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
