"""The paper protocols follow the reference code (jusiro/fewshot-finetuning, commit c3ef03f): FLARE
organ set, case lists, the reference's support draw and its LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest

from fseft.adapt import apply_method
from fseft.adapt.methods.lora import LoRAConfig
from fseft.adapt.support import sample_support
from fseft.anatomy import canonical
from fseft.benchmark.protocol import load_protocol, parse_protocol
from fseft.config import PreprocessConfig, load_yaml
from fseft.data.cases import Case, LabelSource
from fseft.errors import ConfigError
from fseft.models import ModelConfig, build_model
from fseft.protocols import shipped_protocol

# fseft/datasets/configs.py, organ == "selected"; templates: lkidney = kidney_left, gall = gallbladder
REFERENCE_FLARE_ORGANS = ["spleen", "lkidney", "gall", "esophagus", "liver", "pancreas", "stomach", "duodenum", "aorta"]
# local_data/partitions/transferability/flare/_train.txt (FLARE22_Tr_0001 ... 0050, in this order) and _test.txt
FLARE_TRAIN = [f"FLARE22_Tr_{i:04d}" for i in range(1, 51)]
FLARE_TEST = ["FLARETs_0001", "FLARETs_0006", "FLARETs_0007", "FLARETs_0010", "FLARETs_0011", "FLARETs_0013",
              "FLARETs_0015", "FLARETs_0016", "FLARETs_0022", "FLARETs_0028", "FLARETs_0030", "FLARETs_0031",
              "FLARETs_0032", "FLARETs_0033", "FLARETs_0034", "FLARETs_0039", "FLARETs_0040", "FLARETs_0044",
              "FLARETs_0046", "FLARETs_0048", "FLARETs_0049", "FLARETs_0050"]  # fmt: skip
# local_data/partitions/transferability/totalseg_selected/duodenum_train.txt, in the file's order
DUODENUM_TRAIN = ["s0739", "s0765", "s0370", "s0371", "s0350", "s0807", "s0928", "s0884", "s0885", "s0904",
                  "s0910", "s0915", "s0916", "s0618", "s0619", "s0621", "s0629", "s0635", "s0637", "s0300",
                  "s0446", "s0447", "s0472", "s0483", "s0484", "s0190", "s0930", "s0939", "s0959", "s0961"]  # fmt: skip
# random.seed(fold - 1); random.sample(train_list, min(k + 1, 30)) for folds 1, 2, 3 (dataset.py),
# computed once and pinned: the support is all but the last drawn case
REFERENCE_DRAWS = {
    ("flare", 1, 0): ["FLARE22_Tr_0025", "FLARE22_Tr_0049"],
    ("flare", 5, 1): ["FLARE22_Tr_0009", "FLARE22_Tr_0037", "FLARE22_Tr_0005", "FLARE22_Tr_0017",
                      "FLARE22_Tr_0008", "FLARE22_Tr_0032"],
    ("flare", 10, 2): ["FLARE22_Tr_0004", "FLARE22_Tr_0006", "FLARE22_Tr_0049", "FLARE22_Tr_0024",
                       "FLARE22_Tr_0011", "FLARE22_Tr_0043", "FLARE22_Tr_0020", "FLARE22_Tr_0017",
                       "FLARE22_Tr_0039", "FLARE22_Tr_0014", "FLARE22_Tr_0042"],
    ("duodenum", 5, 0): ["s0939", "s0916", "s0484", "s0618", "s0765", "s0885"],
    ("duodenum", 10, 1): ["s0350", "s0637", "s0939", "s0190", "s0484", "s0370", "s0885", "s0371", "s0621",
                          "s0619", "s0447"],
}  # fmt: skip


def cases(ids: list[str], structure: str) -> list[Case]:
    """Label-only stand-ins (no files are read by the draw)."""
    return [Case(i, Path(f"{i}.nii.gz"), (LabelSource(Path(f"{i}_seg.nii.gz"), "synth"),), structures=(structure,))
            for i in ids]  # fmt: skip


def test_flare22_protocol_is_the_reference_task() -> None:
    protocol = load_protocol(shipped_protocol("flare22"))
    (task,) = protocol.tasks
    reference = {"lkidney": "kidney_left", "gall": "gallbladder"}
    assert list(task.structures) == [canonical(reference.get(o, o)) for o in REFERENCE_FLARE_ORGANS]
    assert task.task == "multiclass" and list(task.support_cases) == FLARE_TRAIN
    assert list(task.query_cases) == FLARE_TEST
    assert protocol.support_draw == "reference" and protocol.seeds == (0, 1, 2)
    lora = [m for m in protocol.methods if m.method == "lora"]
    assert [m.method_config().variant for m in lora] == ["reference"]


def test_totalsegmentator_protocol_keeps_the_partition_order_and_draws_as_the_reference() -> None:
    protocol = load_protocol(shipped_protocol("totalsegmentator"))
    duodenum = next(t for t in protocol.tasks if t.name == "duodenum")
    assert list(duodenum.support_cases) == DUODENUM_TRAIN and protocol.support_draw == "reference"


@pytest.mark.parametrize(("pool", "k", "seed"), list(REFERENCE_DRAWS))
def test_reference_support_draw(pool: str, k: int, seed: int) -> None:
    ids, structure = (FLARE_TRAIN, "liver") if pool == "flare" else (DUODENUM_TRAIN, "duodenum")
    drawn = REFERENCE_DRAWS[(pool, k, seed)]
    chosen = sample_support(cases(ids, structure), [structure], k, seed, validation=True, draw="reference")
    assert list(chosen.case_ids) == drawn[:-1] and chosen.validation.case_id == drawn[-1]
    plain = sample_support(cases(ids, structure), [structure], k, seed, draw="reference")
    assert plain.case_ids == chosen.case_ids and plain.validation is None
    assert sample_support(cases(ids, structure), [structure], k, seed).case_ids != chosen.case_ids


def test_reference_draw_all_train_and_errors() -> None:
    flare = cases(FLARE_TRAIN, "liver")
    assert len(sample_support(flare, ["liver"], 50, 0, draw="reference").support) == 29  # reference: min(k+1, 30) - 1
    small = cases(DUODENUM_TRAIN[:6], "duodenum")
    assert len(sample_support(small, ["duodenum"], 6, 0, draw="reference").support) == 5
    with pytest.raises(ConfigError, match="k=5 plus the reference draw's validation case is larger than the 4"):
        sample_support(small[:5], ["duodenum"], 5, 0, draw="reference", validation="s0350")
    with pytest.raises(ConfigError, match="support draw must be one of permutation, reference"):
        sample_support(small, ["duodenum"], 1, 0, draw="numpy")
    data = {**load_yaml(shipped_protocol("flare22")), "support_draw": "numpy"}
    with pytest.raises(ConfigError, match="p.yaml: support_draw: must be one of permutation, reference"):
        parse_protocol(data, "p.yaml")


def test_lora_reference_variant_has_the_reference_parameter_count() -> None:
    model = build_model(ModelConfig(arch="swinunetr", feature_size=12, structures=("liver",),
                                    preprocess=PreprocessConfig(roi=(64,) * 3)))  # fmt: skip
    qkv = list(model.role("qkv").values())
    rank = 4
    # LoRA.py: w_a = Linear(qkv.in_features, rank * 3), w_b = Linear(rank * 3, qkv.out_features), no bias
    reference = sum(q.in_features * rank * 3 + rank * 3 * q.out_features for q in qkv)
    head = 12 + 1
    fused = apply_method(model, "lora", ["liver"])
    assert fused.num_trainable() - head == sum(rank * (q.in_features + q.out_features) for q in qkv)
    ref = apply_method(model, "lora", ["liver"], config=LoRAConfig(variant="reference"))
    assert ref.num_trainable() - head == reference == sum(12 * rank * q.in_features for q in qkv)
    unet = build_model(ModelConfig(arch="unet-small", feature_size=4, structures=("liver",),
                                   preprocess=PreprocessConfig(roi=(32,) * 3)))  # fmt: skip
    with pytest.raises(ConfigError, match="lora variant 'reference' is for SwinUNETR"):
        apply_method(unet, "lora", ["liver"], config=LoRAConfig(variant="reference"))
