"""`mlae pretrain` end to end on a tiny config, and the fractal generator's determinism and sanity."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mlae import fractals
from mlae.backbones import CARD_FILE, WEIGHTS_FILE, build_embedded, load_checkpoint
from mlae.cli import main


def test_pretrain_cli_writes_loadable_weights(tmp_path):
    out = tmp_path / "run"
    code = main(["pretrain", "--classes", "3", "--per-class", "8", "--eval-per-class", "2", "--epochs", "2",
                 "--steps", "3", "--batch-size", "8", "--depth", "1", "--dim", "32", "--heads", "2",
                 "--seed", "3", "--out", str(out), "--quiet"])
    assert code == 0
    card = json.loads((out / CARD_FILE).read_text())
    assert card["steps"] == 3 and card["data"]["train_images"] == 24 and card["seed"] == 3
    assert card["arch"]["depth"] == 1 and card["arch"]["embed_dim"] == 32
    assert 0.0 <= card["pretraining"]["heldout_top1"] <= 1.0
    assert "--steps 3" in card["command"]
    assert int(card["command"].split("--threads ")[1].split()[0]) >= 1  # the default (free cores) resolved
    model = build_embedded(card["arch"], num_classes=4)
    load_checkpoint(model, out / WEIGHTS_FILE)  # strict: every non-head tensor present with the right shape
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 3, 32, 32))).all()


def test_pretrain_help_lists_the_knobs(capsys):
    try:
        main(["pretrain", "--help"])
    except SystemExit:
        pass
    text = capsys.readouterr().out
    for flag in ("--classes", "--per-class", "--epochs", "--batch-size", "--lr", "--seed", "--out", "--steps",
                 "--depth", "--dim"):
        assert flag in text


def test_fractals_are_deterministic_per_seed():
    a = fractals.sample_ifs_classes(4, seed=7)
    b = fractals.sample_ifs_classes(4, seed=7)
    c = fractals.sample_ifs_classes(4, seed=8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.A, y.A)
    assert not np.allclose(a[0].A, c[0].A) if a[0].A.shape == c[0].A.shape else True
    xa, ya = fractals.render_dataset(a, 3, seed=7)
    xb, yb = fractals.render_dataset(b, 3, seed=7)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    held, _ = fractals.render_dataset(a, 3, seed=7, split=1)
    assert not np.array_equal(xa, held)  # the held-out split is a different draw


def test_fractal_classes_are_contractive_and_fill_the_canvas():
    classes = fractals.sample_ifs_classes(6, seed=0)
    rng = np.random.default_rng(0)
    for ifs in classes:
        assert 2 <= len(ifs.A) <= 4
        assert np.all(np.linalg.norm(ifs.A, ord=2, axis=(1, 2)) < 1.0)
        np.testing.assert_allclose(ifs.p.sum(), 1.0)
        assert fractals.fill_ratio(ifs, rng) >= 0.10


def test_fractal_images_are_not_degenerate():
    classes = fractals.sample_ifs_classes(5, seed=1)
    x, y = fractals.render_dataset(classes, 4, seed=1)
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8
    assert list(np.bincount(y)) == [4] * 5
    flat = x.reshape(len(x), -1).astype(np.float32)
    assert (flat.std(axis=1) > 10).all()  # every image has structure, none blank or flat
    bg = x.reshape(len(x), -1, 3)
    ink = (np.abs(bg.astype(int) - bg[:, :1].astype(int)).sum(-1) > 30).mean(axis=1)  # differs from the corner
    assert ((ink > 0.03) & (ink < 0.97)).all()
    # two instances of a class are similar, but not identical (per-instance jitter)
    assert not np.array_equal(x[0], x[1])


def test_pretrain_refuses_to_overwrite_existing_weights(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / WEIGHTS_FILE).write_bytes(b"precious")
    args = ["pretrain", "--classes", "2", "--per-class", "4", "--eval-per-class", "1", "--epochs", "1",
            "--batch-size", "4", "--depth", "1", "--dim", "32", "--heads", "2", "--out", str(out), "--quiet"]
    with pytest.raises(SystemExit) as refused:
        main(args)
    assert "--overwrite" in str(refused.value) and WEIGHTS_FILE in str(refused.value)
    assert (out / WEIGHTS_FILE).read_bytes() == b"precious"
    assert main(args + ["--overwrite"]) == 0
    assert (out / WEIGHTS_FILE).read_bytes() != b"precious"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
