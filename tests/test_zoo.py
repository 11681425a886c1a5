"""Public checkpoint layouts, load reports, the zoo registry, resumable downloads and ``fseft zoo``."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import pathlib
import threading
from collections.abc import Iterator

import pytest
import torch
from monai.networks.nets import SwinUNETR

from fseft.anatomy import UNIVERSAL_29
from fseft.cli import main
from fseft.config import PreprocessConfig
from fseft.errors import CheckpointError, ConfigError
from fseft.models import ModelConfig, build_model, load_model, load_pretrained, zoo
from fseft.models.download import download
from fseft.models.keymaps import extract_state_dict
from fseft.models.unet3d import UNet3D

BTCV = zoo.get_entry("swinunetr48.monai-btcv").label_template


def swin_model(structures: tuple[str, ...]):
    cfg = ModelConfig(
        arch="swinunetr", feature_size=12, structures=structures, preprocess=PreprocessConfig(roi=(64,) * 3)
    )
    return build_model(cfg)


@pytest.fixture(scope="module")
def monai_swin() -> dict[str, torch.Tensor]:
    """Random MONAI SwinUNETR (feature 12, 14 outputs) weights in MONAI's own key names."""
    torch.manual_seed(3)
    net = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
    return {k: v.clone() for k, v in net.state_dict().items()}


def assert_landed(model, expected: dict[str, torch.Tensor]) -> None:
    """Every expected tensor equals the model's tensor of that (fseft) name."""
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


def test_monai_btcv_layout_maps_backbone_and_head_rows_by_name(monai_swin) -> None:
    model = swin_model(("liver", "spleen", "duodenum"))
    report = load_pretrained(
        model, {"state_dict": monai_swin, "epoch": 5}, "monai-btcv-swin", label_template=BTCV
    )
    backbone = {f"backbone.{k}": v for k, v in monai_swin.items() if not k.startswith("out.")}
    assert_landed(model, backbone)
    w, b = monai_swin["out.conv.conv.weight"], monai_swin["out.conv.conv.bias"]
    assert torch.equal(model.head.weight[0], w[6]) and torch.equal(
        model.head.bias[0], b[6]
    )  # liver = label 6
    assert torch.equal(model.head.weight[1], w[1]) and torch.equal(
        model.head.bias[1], b[1]
    )  # spleen = label 1
    assert not model.head.weight[2].any()  # not in BTCV: no trained row, zero weights (deterministic)
    assert model.untrained_head_rows == ("duodenum",)
    assert report.ok and report.head_rows == {"liver": "liver", "spleen": "spleen"}
    assert report.new_head_rows == ["duodenum"] and len(report.loaded) == len(backbone)
    assert "head rows mapped 2, new 1 (duodenum)" in report.summary()


def test_fseft_reference_layout(monai_swin) -> None:
    torch.manual_seed(4)
    head_w, head_b = torch.randn(29, 12, 1, 1, 1), torch.randn(29)
    src = {f"module.{k}": v for k, v in monai_swin.items() if not k.startswith("out.")}
    src |= {"module.classifier.weight": head_w, "module.classifier.bias": head_b}
    model = swin_model(("kidney_left", "liver"))
    report = load_pretrained(model, {"state_dict": src}, "fseft-reference", label_template=UNIVERSAL_29)
    assert_landed(model, {f"backbone.{k[7:]}": v for k, v in src.items() if "classifier" not in k})
    assert torch.equal(model.head.weight[0], head_w[2]) and torch.equal(model.head.weight[1], head_w[5])
    assert torch.equal(model.head.bias, head_b[[2, 5]])
    assert report.ok and not report.new_head_rows


def test_universal_model_swin_layout_drops_dynamic_heads(monai_swin) -> None:
    extras = {
        "module.precls_conv.0.weight": torch.ones(12),
        "module.GAP.3.weight": torch.ones(8, 192, 1, 1, 1),
        "module.controller.weight": torch.ones(153, 512, 1, 1, 1),
        "module.organ_embedding.weight": torch.ones(32, 256),
    }
    src = {f"module.backbone.{k}": v for k, v in monai_swin.items()} | extras
    model = swin_model(("liver",))
    report = load_pretrained(model, {"net": src, "epoch": 3}, "universal-model-swin")
    assert_landed(model, {f"backbone.{k}": v for k, v in monai_swin.items() if not k.startswith("out.")})
    assert set(report.dropped) == set(extras) | {
        "module.backbone.out.conv.conv.weight",
        "module.backbone.out.conv.conv.bias",
    }
    assert report.missing == ["head.weight", "head.bias"] and not report.unexpected and not report.mismatched
    assert report.new_head_rows == ["liver"]


def test_universal_model_unet_layout() -> None:
    torch.manual_seed(5)
    unet = {k: v.clone() for k, v in UNet3D(base=4).state_dict().items()}
    src = {f"module.backbone.{k}": v for k, v in unet.items()}
    src |= {
        "module.backbone.out_tr.final_conv.weight": torch.ones(1, 8, 1, 1, 1),
        "module.precls_conv.2.weight": torch.ones(8, 8, 1, 1, 1),
    }
    cfg = ModelConfig(
        arch="unet3d", feature_size=8, structures=("liver",), preprocess=PreprocessConfig(roi=(32,) * 3)
    )
    model = build_model(cfg)
    report = load_pretrained(model, {"net": src}, "universal-model-unet")
    assert_landed(model, {f"backbone.{k}": v for k, v in unet.items()})
    assert len(report.dropped) == 2 and report.missing == ["head.weight", "head.bias"]


@pytest.mark.parametrize("variant", ["module", "swin_vit"])
def test_monai_ssl_layout_loads_encoder_only(monai_swin, variant: str) -> None:
    vit = {k[len("swinViT.") :]: v for k, v in monai_swin.items() if k.startswith("swinViT.")}

    def public(k: str) -> str:
        k = k.replace(".mlp.linear1.", ".mlp.fc1.").replace(".mlp.linear2.", ".mlp.fc2.")
        return f"module.{k}" if variant == "module" else f"swin_vit.{k}"

    pretext = {
        "module.rotation_head.weight": torch.ones(4, 192),
        "module.contrastive_head.weight": torch.ones(512, 192),
        "module.convTrans3d.weight": torch.ones(192, 1, 32, 32, 32),
        "module.norm.weight": torch.ones(192),
    }
    src = {public(k): v for k, v in vit.items()} | pretext
    model = swin_model(("liver",))
    decoder_before = model.backbone.decoder1.conv_block.conv1.conv.weight.clone()
    report = load_pretrained(model, {"state_dict": src}, "monai-ssl-swin")
    assert_landed(model, {f"backbone.swinViT.{k}": v for k, v in vit.items()})
    assert set(report.dropped) == set(pretext) and not report.unexpected
    assert "backbone.decoder1.conv_block.conv1.conv.weight" in report.missing
    assert torch.equal(model.backbone.decoder1.conv_block.conv1.conv.weight, decoder_before)


def test_mismatches_are_reported_and_strict_refuses(monai_swin) -> None:
    model = swin_model(("liver",))
    report = load_pretrained(model, monai_swin, "monai-btcv-swin", allow_partial=True)  # 14-row head, no template
    assert ("head.weight", (14, 12, 1, 1, 1), (1, 12, 1, 1, 1)) in report.mismatched
    assert report.new_head_rows == ["liver"] and not report.ok
    with pytest.raises(CheckpointError, match=r"shape-mismatched 2 \(head\.weight.*--allow-partial-load"):
        load_pretrained(model, monai_swin, "monai-btcv-swin")
    unet = build_model(
        ModelConfig(
            arch="unet-small",
            feature_size=8,
            structures=("liver",),
            preprocess=PreprocessConfig(roi=(32,) * 3),
        )
    )
    with pytest.raises(CheckpointError, match="holds swinunetr weights, the model is unet-small"):
        load_pretrained(unet, monai_swin, "monai-btcv-swin")
    with pytest.raises(ConfigError, match="unknown checkpoint layout 'nope'"):
        load_pretrained(unet, monai_swin, "nope")


def test_extract_state_dict_reports_top_level_keys() -> None:
    with pytest.raises(CheckpointError, match=r"ck\.pt: no state dict found \(top-level keys: epoch, args\)"):
        extract_state_dict({"epoch": 1, "args": "x"}, "ck.pt")


def test_zoo_entries_are_consistent() -> None:
    from fseft.models.keymaps import LAYOUTS

    assert {
        "swinunetr48.fseft",
        "swinunetr48.clip-driven",
        "swinunetr48.suprem",
        "unet3d.suprem",
        "swinunetr48.monai-ssl",
        "swinunetr48.monai-btcv",
    } <= set(zoo.ZOO.names())
    for name in zoo.ZOO.names():
        e = zoo.get_entry(name)
        assert e.url.startswith("https://") and LAYOUTS.get(e.layout).arch == e.arch
        ModelConfig(
            arch=e.arch,
            feature_size=e.feature_size,
            structures=e.structures or ("liver",),
            preprocess=e.preprocess,
        )
    assert zoo.get_entry("swinunetr48.fseft").structures == UNIVERSAL_29
    assert BTCV[0] is None and len(BTCV) == 14


# --- downloads -----------------------------------------------------------------------------------


class _Server(http.server.ThreadingHTTPServer):
    files: dict[str, tuple[bytes, str]]
    ranges: list[str | None]
    honor_range: bool = True
    cut_after: int | None = None  # close the connection after this many bytes (once)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802
        if self.path not in self.server.files:
            self.send_error(404)
            return
        data, ctype = self.server.files[self.path]
        rng = self.headers.get("Range")
        self.server.ranges.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng and self.server.honor_range else 0
        if start >= len(data) and start:
            self.send_response(416)
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if self.server.cut_after is not None:
            body, self.server.cut_after = body[: self.server.cut_after], None
            self.wfile.write(body)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files, srv.ranges = {}, []
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url(srv: _Server, path: str) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


DATA = bytes(range(256)) * 4099  # ~1 MiB, not a multiple of the chunk size


def test_download_with_progress_and_checksum(server: _Server, tmp_path: pathlib.Path) -> None:
    server.files["/w.pt"] = (DATA, "application/octet-stream")
    seen: list[tuple[int, int | None]] = []
    out = download(
        url(server, "/w.pt"),
        tmp_path / "w.pt",
        sha256=hashlib.sha256(DATA).hexdigest(),
        progress=lambda d, t: seen.append((d, t)),
    )
    assert out.read_bytes() == DATA and not (tmp_path / "w.pt.part").exists()
    assert seen[0] == (0, len(DATA)) and seen[-1] == (len(DATA), len(DATA))
    assert download(url(server, "/w.pt"), out) == out and len(server.ranges) == 1  # cached: no request


def test_interrupted_download_resumes_with_range(server: _Server, tmp_path: pathlib.Path) -> None:
    server.files["/w.pt"] = (DATA, "application/octet-stream")
    server.cut_after = 300_000
    with pytest.raises(
        CheckpointError, match="transfer ended at 300000 of 1049344 bytes; run again to resume"
    ):
        download(url(server, "/w.pt"), tmp_path / "w.pt")
    part = tmp_path / "w.pt.part"
    assert part.stat().st_size == 300_000
    out = download(url(server, "/w.pt"), tmp_path / "w.pt", sha256=hashlib.sha256(DATA).hexdigest())
    assert server.ranges == [None, "bytes=300000-"] and out.read_bytes() == DATA


def test_server_ignoring_range_restarts_cleanly(server: _Server, tmp_path: pathlib.Path) -> None:
    server.files["/w.pt"], server.honor_range = (DATA, "application/octet-stream"), False
    (tmp_path / "w.pt.part").write_bytes(DATA[:1000])
    out = download(url(server, "/w.pt"), tmp_path / "w.pt")
    assert out.read_bytes() == DATA


def test_checksum_mismatch_deletes_and_raises(server: _Server, tmp_path: pathlib.Path) -> None:
    server.files["/w.pt"] = (DATA, "application/octet-stream")
    with pytest.raises(CheckpointError, match=rf"w\.pt\.part: size mismatch .*expected 5 bytes, got {len(DATA)}\); file deleted"):
        download(url(server, "/w.pt"), tmp_path / "w.pt", size=5)
    with pytest.raises(CheckpointError, match=r"w\.pt\.part: sha256 mismatch .*file deleted"):
        download(url(server, "/w.pt"), tmp_path / "w.pt", sha256="0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_html_page_instead_of_file_is_refused(server: _Server, tmp_path: pathlib.Path) -> None:
    server.files["/w.pt"] = (b"<html>confirm download</html>", "text/html; charset=utf-8")
    with pytest.raises(CheckpointError, match="web page instead of the file"):
        download(url(server, "/w.pt"), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="HTTP 404"):
        download(url(server, "/missing.pt"), tmp_path / "m.pt")


def test_cli_zoo_download_then_load_model(
    server: _Server, tmp_path: pathlib.Path, monkeypatch, monai_swin, capsys
) -> None:
    ckpt = tmp_path / "btcv.pt"
    torch.save({"epoch": 10, "state_dict": monai_swin}, ckpt)
    data = ckpt.read_bytes()
    server.files["/btcv.pt"] = (data, "application/octet-stream")
    entry = dataclasses.replace(
        zoo.get_entry("swinunetr48.monai-btcv"),
        url=url(server, "/btcv.pt"),
        feature_size=12,
        sha256=hashlib.sha256(data).hexdigest(),
        preprocess=PreprocessConfig(roi=(64,) * 3),
    )
    monkeypatch.setattr(zoo, "get_entry", lambda name: entry)
    monkeypatch.setenv("FSEFT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        CheckpointError, match="is not downloaded; run 'fseft zoo download swinunetr48.monai-btcv'"
    ):
        load_model("swinunetr48.monai-btcv")
    assert main(["zoo", "download", "swinunetr48.monai-btcv"]) == 0
    assert "sha256 verified" in capsys.readouterr().out
    assert (tmp_path / "cache" / entry.filename).read_bytes() == data
    model = load_model("swinunetr48.monai-btcv")
    assert model.structures == BTCV[1:] and model.extra["zoo"] == "swinunetr48.monai-btcv"
    assert torch.equal(model.head.weight, monai_swin["out.conv.conv.weight"][1:])
    assert main(["zoo", "info", "swinunetr48.monai-btcv"]) == 0
    assert "downloaded" in capsys.readouterr().out


def test_cli_zoo_list_and_unknown_name(capsys, tmp_path: pathlib.Path) -> None:
    assert main(["zoo", "list", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "swinunetr48.fseft" in out and "unet3d.suprem" in out
    assert "legacy" in out and "unpinned" in out and "checked for completeness only" in " ".join(out.split())
    assert main(["zoo", "info", "swinunetr48.suprem", "--cache-dir", str(tmp_path)]) == 0
    info = " ".join(capsys.readouterr().out.split())
    assert "MONAI v0.9 (legacy)" in info and "unknown (unpinned)" in info
    assert main(["zoo", "info", "nope"]) == 2
    assert "fseft: error: unknown zoo checkpoint 'nope'; choose one of:" in capsys.readouterr().err
