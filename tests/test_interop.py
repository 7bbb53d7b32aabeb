"""Runs as other tools and other folders see them: an `mlae pretrain` folder as the backbone, paths and class
names in the metadata, `mlae predict`, merged exports that timm loads with their preprocessing, provenance and
overwrite protection, optional plots and TensorBoard, file modes."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from mlae.cli import main
from mlae.errors import MLAEWarning

pytest.importorskip("yaml")
testing = pytest.importorskip("mlae.data.testing")

FAST = ["--epochs", "1", "--batch-size", "16", "--warmup-epochs", "0", "--quiet"]
CLASSES = ["cat", "dog", "fox"]


def _pretrain(out: Path, seed: int = 3) -> Path:
    assert main(["pretrain", "--classes", "3", "--per-class", "4", "--eval-per-class", "1", "--epochs", "1",
                 "--steps", "1", "--batch-size", "4", "--depth", "1", "--dim", "32", "--heads", "2",
                 "--seed", str(seed), "--out", str(out), "--quiet", "--overwrite"]) == 0
    return out


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder dataset and a pretrained backbone folder, named relative to this folder."""
    root = tmp_path_factory.mktemp("work")
    _pretrain(root / "bb")
    testing.make_image_folder(root / "pets", classes=tuple(CLASSES), per_class=6, size=32)
    return root


@pytest.fixture(scope="module")
def run(work) -> Path:
    """MLAE trained from `work` with relative --dataset and --backbone paths."""
    cwd = os.getcwd()
    os.chdir(work)
    try:
        assert main(["train", "--dataset", "folder:pets", "--backbone", "bb", *FAST, "--out", "run"]) == 0
    finally:
        os.chdir(cwd)
    return work / "run"


def test_pretrained_folder_is_the_backbone_card_and_all(run, work):
    from mlae.trained import load_trained, read_weights_metadata

    model, meta = load_trained(run / "adapter.safetensors")
    assert (len(model.blocks), model.embed_dim) == (1, 32)  # the card's architecture, not ViT-B
    assert meta["input_mean"] == [0.5, 0.5, 0.5]  # the card's input statistics
    assert meta == read_weights_metadata(run / "adapter.safetensors")


def test_metadata_paths_are_absolute_and_eval_works_from_another_folder(run, work, tmp_path, monkeypatch):
    from mlae.trained import read_weights_metadata

    meta = read_weights_metadata(run / "adapter.safetensors")
    assert meta["backbone"] == str(work / "bb") and meta["dataset_spec"] == f"folder:{work / 'pets'}"
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--adapter", str(run / "adapter.safetensors"), "--out", "eval.json"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["top1"] == _results(run)["top1"] and result["classes"] == CLASSES


def test_replaced_backbone_is_refused_at_eval(work, tmp_path, capsys):
    backbone = _pretrain(tmp_path / "bb", seed=5)
    assert main(["train", "--dataset", f"folder:{work / 'pets'}", "--backbone", str(backbone), "--method", "linear",
                 *FAST, "--out", str(tmp_path / "run")]) == 0
    assert main(["eval", "--adapter", str(tmp_path / "run" / "adapter.safetensors")]) == 0
    shutil.copy(work / "bb" / "embedded_vit.safetensors", backbone / "embedded_vit.safetensors")
    capsys.readouterr()
    assert main(["eval", "--adapter", str(tmp_path / "run" / "adapter.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "other backbone weights" in err and "Traceback" not in err


def test_class_names_in_results_and_predict(run, work, tmp_path):
    from mlae.trained import read_weights_metadata

    assert _results(run)["classes"] == CLASSES == read_weights_metadata(run / "adapter.safetensors")["classes"]
    images = [str(next((work / "pets" / c).iterdir())) for c in CLASSES]
    assert main(["predict", "--adapter", str(run / "adapter.safetensors"), *images, "--top", "3",
                 "--out", str(tmp_path / "p.json")]) == 0
    predictions = json.loads((tmp_path / "p.json").read_text())
    assert [p["image"] for p in predictions] == images
    for p in predictions:
        assert sorted(c["name"] for c in p["top"]) == CLASSES
        assert [c["name"] for c in p["top"]] == [CLASSES[c["label"]] for c in p["top"]]
        assert abs(sum(c["probability"] for c in p["top"]) - 1) < 1e-5


def test_export_refuses_to_overwrite_and_records_provenance(run, tmp_path, capsys):
    from safetensors import safe_open

    adapter = run / "adapter.safetensors"
    out = tmp_path / "merged.safetensors"
    assert main(["export", "--adapter", str(adapter), "--out", str(out)]) == 0
    with safe_open(str(out), "pt") as f:
        provenance = json.loads(f.metadata()["mlae_provenance"])
    assert provenance["method"] == "mlae" and provenance["source_adapter"] == str(adapter)
    assert provenance["source_sha256"] == hashlib.sha256(adapter.read_bytes()).hexdigest()
    before = out.read_bytes()
    for fmt, said in (("merged", "--overwrite"), ("peft", "--format peft writes a folder")):
        assert main(["export", "--adapter", str(adapter), "--format", fmt, "--out", str(out)]) == 1
        assert said in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main(["export", "--adapter", str(adapter), "--out", str(out), "--overwrite"]) == 0
    # --overwrite never reaches the trained adapter or its run folder: it would replace what it exports
    trained = adapter.read_bytes()
    for inside in (adapter, run, run / "merged.safetensors"):
        assert main(["export", "--adapter", str(run), "--out", str(inside), "--overwrite"]) == 1
        assert f"choose --out outside {run}" in capsys.readouterr().err
    assert adapter.read_bytes() == trained and not (run / "merged.safetensors").exists()


def test_merged_export_carries_input_size_and_normalisation_for_timm(run, tmp_path):
    import timm
    from safetensors import safe_open
    from timm.data import resolve_data_config

    from mlae.trained import load_trained

    reference, _ = load_trained(run / "adapter.safetensors")
    x = torch.randn(2, 3, 32, 32)
    folder, file = tmp_path / "merged", tmp_path / "merged.safetensors"
    for out in (folder, file):
        assert main(["export", "--adapter", str(run / "adapter.safetensors"), "--out", str(out)]) == 0
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    models = [timm.create_model(f"local-dir:{folder}", pretrained=True),
              timm.create_model(meta["timm_model"], pretrained=True, **json.loads(meta["timm_kwargs"]),
                                pretrained_cfg_overlay={**json.loads(meta["pretrained_cfg"]), "file": str(file)})]
    for model in models:
        config = resolve_data_config({}, model=model)
        assert tuple(config["input_size"]) == (3, 32, 32) and tuple(config["mean"]) == (0.5, 0.5, 0.5)
        with torch.no_grad():
            torch.testing.assert_close(model.eval()(x), reference(x), rtol=1e-5, atol=1e-5)
    assert models[0].pretrained_cfg["label_names"] == CLASSES


def test_run_folder_files_keep_the_umask_mode(run):
    mask = os.umask(0)
    os.umask(mask)
    for name in ("adapter.safetensors", "results.json", "config.yaml", "metrics.jsonl"):
        assert (run / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


@pytest.mark.parametrize("method", ["linear", "dmlora"])  # dmlora also plots its learned scales
def test_without_matplotlib_the_run_finishes_without_curves(work, tmp_path, monkeypatch, capsys, method):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError, as uninstalled
    assert main(["train", "--dataset", f"folder:{work / 'pets'}", "--backbone", str(work / "bb"), "--method",
                 method, *FAST, "--out", str(tmp_path / "run")]) == 0
    assert _results(tmp_path / "run")["top1"] is not None and not (tmp_path / "run" / "curves.png").exists()
    assert not (tmp_path / "run" / "scales.png").exists()
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_tensorboard_logs_metrics_and_coefficients(work, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{work / 'pets'}", "--backbone", str(work / "bb"), *FAST,
                 "--epochs", "2", "--tensorboard", "--out", str(out)]) == 0
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    for tag in ("train_loss", "train_top1", "test_top1", "lr", "coeff/mean", "coeff/std", "coeff/min", "coeff/max"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("train_loss")] == pytest.approx([m["train_loss"] for m in metrics])
    assert events.Histograms("coeff")
    # --overwrite starts the record anew: the old run's curves do not stay next to the new run's
    assert main(["train", "--dataset", f"folder:{work / 'pets'}", "--backbone", str(work / "bb"), *FAST,
                 "--epochs", "1", "--tensorboard", "--overwrite", "--out", str(out)]) == 0
    assert len(list((out / "tensorboard").iterdir())) == 1
    assert [e.step for e in EventAccumulator(str(out / "tensorboard")).Reload().Scalars("train_loss")] == [1]
    assert main(["train", "--dataset", f"folder:{work / 'pets'}", "--backbone", str(work / "bb"), *FAST,
                 "--epochs", "1", "--overwrite", "--out", str(out)]) == 0
    assert not (out / "tensorboard").exists()


def test_tensorboard_missing_is_a_warning_not_a_failure(work, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{work / 'pets'}", "--backbone", str(work / "bb"), "--method",
                 "linear", *FAST, "--tensorboard", "--out", str(out)]) == 0
    assert "needs the tensorboard package" in capsys.readouterr().err
    assert (out / "results.json").exists() and not (out / "tensorboard").exists()


def test_skip_bad_images_trains_without_them_and_lists_them(work, tmp_path, capsys):
    data = tmp_path / "pets"
    shutil.copytree(work / "pets", data, ignore=shutil.ignore_patterns(".mlae_cache"))
    bad = sorted((data / "dog").iterdir())[0]
    bad.write_bytes(b"not an image")
    args = ["train", "--dataset", f"folder:{data}", "--backbone", str(work / "bb"), "--method", "linear", *FAST]
    assert main([*args, "--out", str(tmp_path / "a")]) == 1
    assert "1 of 18 images cannot be read" in capsys.readouterr().err
    with pytest.warns(MLAEWarning, match="skipped 1 unreadable"):
        assert main([*args, "--skip-bad-images", "--out", str(tmp_path / "b")]) == 0
    assert _results(tmp_path / "b")["skipped_images"] == [str(bad)]


def test_tensorboard_logs_the_learned_masking_probability(work, tmp_path):
    """metrics.jsonl's `learned` entry is a dict per layer: TensorBoard gets one scalar per layer, no crash."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{work / 'pets'}", "--backbone", str(work / "bb"), *FAST,
                 "--epochs", "2", "--dropout", "auto", "--dropout-learner", "variational", "--tensorboard",
                 "--out", str(out)]) == 0
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    tags = [t for t in events.Tags()["scalars"] if t.startswith("dropout/")]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(tags) == len(metrics[-1]["learned"]) > 0
    layer = next(iter(metrics[-1]["learned"]))
    assert [e.value for e in events.Scalars(f"dropout/{layer}")] == pytest.approx(
        [m["learned"][layer]["dropout"] for m in metrics])
