"""Backbone loading: embedded ViT, local checkpoints (.safetensors / .pth / Google .npz), clear errors."""
from __future__ import annotations

import time

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from mlae.backbones import (EMBEDDED, WEIGHTS_FILE, BackboneError, backbone_input_size, create_backbone,
                            embedded_card, load_checkpoint)

# A tiny timm ViT so the tests run in seconds; `arch` + timm kwargs rebuild it for loading.
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
ARCH = "vit_tiny_patch16_224"


def tiny(num_classes: int = 5, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(ARCH, pretrained=False, num_classes=num_classes, **{**TINY, **kw}).eval()


def load_tiny(path, num_classes: int = 5) -> torch.nn.Module:
    model = timm.create_model(ARCH, pretrained=False, num_classes=num_classes, **TINY).eval()
    return load_checkpoint(model, path)


def body(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def assert_same_body(a, b) -> None:
    sa, sb = body(a), body(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], msg=k)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.forward_features(x), b.forward_features(x), rtol=1e-4, atol=1e-5)


def to_google_npz(model, path) -> None:
    """A timm ViT in the layout of Google's ViT-B_16.npz (what timm's `VisionTransformer.load_pretrained` reads)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    d = model.embed_dim
    h = model.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
        "embedding/bias": sd["patch_embed.proj.bias"],
        "cls": sd["cls_token"],
        "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
        "Transformer/encoder_norm/scale": sd["norm.weight"],
        "Transformer/encoder_norm/bias": sd["norm.bias"],
        "head/kernel": sd["head.weight"].T,
        "head/bias": sd["head.bias"],
    }
    for i in range(len(model.blocks)):
        p, g = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        out[g + "LayerNorm_0/scale"], out[g + "LayerNorm_0/bias"] = sd[p + "norm1.weight"], sd[p + "norm1.bias"]
        out[g + "LayerNorm_2/scale"], out[g + "LayerNorm_2/bias"] = sd[p + "norm2.weight"], sd[p + "norm2.bias"]
        qkv_w, qkv_b = sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            w = qkv_w[j * d:(j + 1) * d]  # [out, in]
            out[g + f"MultiHeadDotProductAttention_1/{name}/kernel"] = w.T.reshape(d, h, d // h)
            out[g + f"MultiHeadDotProductAttention_1/{name}/bias"] = qkv_b[j * d:(j + 1) * d].reshape(h, d // h)
        out[g + "MultiHeadDotProductAttention_1/out/kernel"] = \
            sd[p + "attn.proj.weight"].reshape(d, h, d // h).transpose(1, 2, 0)
        out[g + "MultiHeadDotProductAttention_1/out/bias"] = sd[p + "attn.proj.bias"]
        for r in range(2):
            out[g + f"MlpBlock_3/Dense_{r}/kernel"] = sd[p + f"mlp.fc{r + 1}.weight"].T
            out[g + f"MlpBlock_3/Dense_{r}/bias"] = sd[p + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **out)


# ------------------------------------------------------------------------------------------ embedded
@pytest.mark.parametrize("pretrained", [True, False])
def test_embedded_backbone_builds_with_new_head(pretrained):
    model = create_backbone(None, num_classes=7, pretrained=pretrained)
    assert backbone_input_size(model) == 32
    with torch.no_grad():
        y = model.eval()(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 7) and torch.isfinite(y).all()


def test_embedded_pretrained_differs_from_random_and_is_deterministic():
    a = create_backbone(EMBEDDED, num_classes=3)
    b = create_backbone("embedded", num_classes=3)
    r = create_backbone(EMBEDDED, num_classes=3, pretrained=False)
    w = "blocks.0.attn.qkv.weight"
    torch.testing.assert_close(a.state_dict()[w], b.state_dict()[w])
    assert not torch.allclose(a.state_dict()[w], r.state_dict()[w])


def test_embedded_card_describes_architecture():
    card = embedded_card()
    assert card["arch"]["img_size"] == 32 and card["arch"]["depth"] <= 12 and card["arch"]["embed_dim"] <= 192
    assert 0 < card["pretraining"]["heldout_top1"] <= 1


def test_embedded_rejects_other_geometry():
    with pytest.raises(BackboneError, match="fixed architecture"):
        create_backbone(EMBEDDED, num_classes=3, img_size=224)


# -------------------------------------------------------------------------------------- local files
def test_safetensors_round_trip(tmp_path):
    src = tiny()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert_same_body(src, load_tiny(tmp_path / "w.safetensors", num_classes=9))


def test_create_backbone_from_path_resets_head(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model(ARCH, num_classes=5, img_size=32, patch_size=8).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    model = create_backbone(str(path), num_classes=4, arch=ARCH, img_size=32, patch_size=8).eval()
    assert model.head.out_features == 4 and backbone_input_size(model) == 32
    assert_same_body(src, model)


def test_pth_round_trip_and_wrapped_state_dict(tmp_path):
    src = tiny()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    assert_same_body(src, load_tiny(tmp_path / "w.pth"))
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "w2.bin")
    assert_same_body(src, load_tiny(tmp_path / "w2.bin"))


def test_google_npz_round_trip(tmp_path):
    src = tiny(num_classes=5)
    to_google_npz(src, tmp_path / "ViT-tiny.npz")
    loaded = load_tiny(tmp_path / "ViT-tiny.npz", num_classes=5)
    assert_same_body(src, loaded)
    # same class count as the file: the head is still new, never the file's
    assert not torch.allclose(loaded.head.weight, src.head.weight)


class Evil:  # a custom object: weights_only=True must refuse to unpickle it
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pth_refuses_pickled_objects(tmp_path):
    torch.save({"state_dict": tiny().state_dict(), "evil": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(BackboneError, match="refusing to unpickle"):
        load_tiny(tmp_path / "evil.pth")


def test_mismatch_names_keys_and_shapes(tmp_path):
    src = tiny(embed_dim=48, num_heads=2)  # wrong width
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(BackboneError, match=r"wrong shape.*cls_token \(1, 1, 48\) vs \(1, 1, 32\)"):
        load_tiny(tmp_path / "w.safetensors")
    deeper = tiny(depth=3)
    save_file({k: v.contiguous() for k, v in deeper.state_dict().items()}, str(tmp_path / "d.safetensors"))
    with pytest.raises(BackboneError, match=r"unexpected in the checkpoint: blocks\.2\."):
        load_tiny(tmp_path / "d.safetensors")
    shallow = {k: v for k, v in tiny().state_dict().items() if not k.startswith("blocks.1.")}
    save_file({k: v.contiguous() for k, v in shallow.items()}, str(tmp_path / "s.safetensors"))
    with pytest.raises(BackboneError, match=r"missing from the checkpoint: blocks\.1\."):
        load_tiny(tmp_path / "s.safetensors")


def test_npz_mismatch_names_keys(tmp_path):
    to_google_npz(tiny(depth=3), tmp_path / "deep.npz")
    with pytest.raises(BackboneError, match=r"unexpected in the checkpoint: Transformer/encoderblock_2"):
        load_tiny(tmp_path / "deep.npz")
    to_google_npz(tiny(embed_dim=48), tmp_path / "wide.npz")
    with pytest.raises(BackboneError, match=r"embedding/kernel \(8, 8, 3, 48\) vs \(8, 8, 3, 32\)"):
        load_tiny(tmp_path / "wide.npz")


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(BackboneError, match="not found.*nope.safetensors"):
        load_tiny(tmp_path / "nope.safetensors")
    with pytest.raises(BackboneError, match="not found"):
        create_backbone(str(tmp_path / "nope.npz"), num_classes=3)
    for name in ("bad.safetensors", "bad.pth", "bad.npz"):
        (tmp_path / name).write_bytes(b"this is not a checkpoint" * 10)
        with pytest.raises(BackboneError, match="cannot read"):
            load_tiny(tmp_path / name)


def test_unknown_timm_name():
    with pytest.raises(BackboneError, match="unknown backbone"):
        create_backbone("no_such_model_xyz", num_classes=3)


def test_timm_name_without_network_gives_helpful_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import timm.models._builder as builder

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co' (offline)")

    monkeypatch.setattr(builder, "load_pretrained", offline)
    with pytest.raises(BackboneError, match="could not download.*local checkpoint"):
        create_backbone("vit_base_patch16_224.orig_in21k", num_classes=3)


def test_timm_name_random_init_and_input_size():
    model = create_backbone("vit_tiny_patch16_224", num_classes=3, pretrained=False, img_size=64)
    assert backbone_input_size(model) == 64 and model.head.out_features == 3


def test_unreachable_hub_fails_in_seconds_and_suggests_offline_mode(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: no network, as offline
    start = time.monotonic()
    with pytest.raises(BackboneError, match=r"cannot reach the Hugging Face hub \(127\.0\.0\.1:9.*HF_HUB_OFFLINE=1"):
        create_backbone("vit_tiny_patch16_224.augreg_in21k", num_classes=3)
    assert time.monotonic() - start < 10


def test_pretrain_output_folder_is_a_backbone_with_its_card(tmp_path):
    from mlae.cli import main

    assert main(["pretrain", "--classes", "3", "--per-class", "4", "--eval-per-class", "1", "--epochs", "1",
                 "--steps", "1", "--batch-size", "4", "--depth", "1", "--dim", "32", "--heads", "2",
                 "--img-size", "16", "--patch-size", "8", "--out", str(tmp_path / "bb"), "--quiet"]) == 0
    for name in (tmp_path / "bb", tmp_path / "bb" / WEIGHTS_FILE):
        model = create_backbone(name, num_classes=5)
        assert (len(model.blocks), model.embed_dim, backbone_input_size(model)) == (1, 32, 16)
        assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and model.head.out_features == 5
    weights = load_file(str(tmp_path / "bb" / WEIGHTS_FILE))
    assert torch.equal(model.blocks[0].attn.qkv.weight, weights["blocks.0.attn.qkv.weight"].float())
    with pytest.raises(BackboneError, match="fixed architecture of its card"):
        create_backbone(tmp_path / "bb", num_classes=5, img_size=32)
    (tmp_path / "plain").mkdir()
    with pytest.raises(BackboneError, match="folder without embedded_vit.json"):
        create_backbone(tmp_path / "plain", num_classes=5)


def test_npz_into_a_model_that_is_not_a_vit(tmp_path):
    to_google_npz(tiny(), tmp_path / "ViT-tiny.npz")
    with pytest.raises(BackboneError, match=r"VisionTransformer models only, not Sequential; pick a ViT"):
        load_checkpoint(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path / "ViT-tiny.npz")


def test_embedded_versions_are_selectable_by_name():
    from mlae.backbones import DEFAULT_EMBEDDED, EMBEDDED_VERSIONS
    from mlae.engine import resolve_normalize

    assert DEFAULT_EMBEDDED in EMBEDDED_VERSIONS
    named, default = create_backbone(DEFAULT_EMBEDDED, num_classes=3), create_backbone(None, num_classes=3)
    for (key, a), (_, b) in zip(named.state_dict().items(), default.state_dict().items()):
        if not key.startswith("head"):
            assert torch.equal(a, b), key
    assert named.pretrained_cfg["mean"] == default.pretrained_cfg["mean"]
    assert resolve_normalize("auto", DEFAULT_EMBEDDED) == "backbone"  # its card's [-1, 1], as "embedded"


def test_weights_files_name_the_embedded_version_and_legacy_files_mean_v2(tmp_path):
    """A file saying only "embedded" was written while v2 was the default: it must rebuild v2, not today's
    default; new files record the version itself."""
    import mlae
    from mlae.trained import load_trained, timm_spec

    model = create_backbone("embedded-v2", num_classes=3)
    mlae.apply(model, mlae.LoRAConfig(rank=2))
    meta = {"backbone": "embedded", "backbone_kwargs": {}, "num_classes": 3, "seed": 0}
    mlae.save_adapter(model, tmp_path / "legacy.safetensors", metadata=meta)
    loaded, _ = load_trained(tmp_path / "legacy.safetensors")
    assert len(loaded.blocks) == len(model.blocks) == 4
    assert timm_spec(meta)[1]["depth"] == 4
    v3 = create_backbone("embedded-v3", num_classes=3)
    assert len(v3.blocks) == 12 and timm_spec({**meta, "backbone": "embedded-v3"})[1]["depth"] == 12


def test_weights_metadata_records_the_embedded_version_not_a_path():
    from types import SimpleNamespace

    from mlae.backbones import DEFAULT_EMBEDDED
    from mlae.engine import TrainConfig
    from mlae.trained import weights_metadata

    task = SimpleNamespace(num_classes=3, name="digits", augment=False, classes=["a", "b", "c"])
    inputs = SimpleNamespace(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    for given, saved in ((None, DEFAULT_EMBEDDED), ("embedded", DEFAULT_EMBEDDED), ("embedded-v2", "embedded-v2")):
        cfg = TrainConfig(dataset="suite:digits", backbone=given)
        assert weights_metadata(cfg, task, inputs, "backbone")["backbone"] == saved
