"""`mlae pretrain` end to end on a tiny config, and the fractal generator's determinism and sanity."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mlae import fractals
from mlae.backbones import CARD_FILE, WEIGHTS_FILE, build_embedded, load_checkpoint
from mlae.cli import main

# A run that would train in a second: each mistake below changes one option of it.
TINY = ["--classes", "3", "--per-class", "4", "--eval-per-class", "1", "--epochs", "1", "--batch-size", "4",
        "--depth", "1", "--dim", "32", "--heads", "2", "--threads", "1", "--quiet"]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlae: error: ") and len(err.splitlines()) == 1, err
    return err


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


def test_pretrain_refuses_to_overwrite_existing_weights(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / WEIGHTS_FILE).write_bytes(b"precious")
    args = ["pretrain", "--classes", "2", "--per-class", "4", "--eval-per-class", "1", "--epochs", "1",
            "--batch-size", "4", "--depth", "1", "--dim", "32", "--heads", "2", "--out", str(out), "--quiet"]
    assert main(args) == 1
    refused = _one_line_error(capsys)
    assert "--overwrite" in refused and WEIGHTS_FILE in refused
    assert (out / WEIGHTS_FILE).read_bytes() == b"precious"
    assert main(args + ["--overwrite"]) == 0
    assert (out / WEIGHTS_FILE).read_bytes() != b"precious"
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("flags, says", [
    (["--dim", "15", "--heads", "2"], "--dim 15 is not divisible by --heads 2: choose a width that is a multiple"),
    (["--heads", "0"], "--heads must be >= 1, not 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, not 0"),
    (["--lr", "-1"], "--lr must be a positive number, not -1.0"),
    (["--lr", "nan"], "--lr must be a positive number, not nan"),
    (["--label-smoothing", "1.5"], "--label-smoothing must be in [0, 1), not 1.5"),
    (["--classes", "1"], "--classes must be >= 2"),
    (["--per-class", "0"], "--per-class must be >= 1, not 0"),
    (["--eval-per-class", "0"], "--eval-per-class must be >= 1"),
    (["--depth", "0"], "--depth must be >= 1, not 0"),
    (["--epochs", "0"], "--epochs must be >= 1, not 0"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--warmup", "2"], "--warmup is the fraction of the steps spent in linear warmup: it must be in [0, 1), not 2.0"),
    (["--drop-path", "2"], "--drop-path (the stochastic depth rate) must be in [0, 1), not 2.0"),
    (["--seed", "-1"], "--seed must be >= 0, not -1"),
    (["--img-size", "30", "--patch-size", "4"], "--img-size 30 is not divisible by --patch-size 4"),
    (["--batch-size", "64"], "--batch-size 64 is larger than the 12 training images (--classes 3 x --per-class 4), "
                             "so no optimiser step would run: lower --batch-size or raise --per-class"),
])
def test_pretrain_refuses_bad_options_in_one_line_before_any_work(flags, says, tmp_path, capsys, monkeypatch):
    from mlae import pretrain as module

    def no_rendering(*args, **kwargs):
        raise AssertionError("rendered fractals although an option was refused")

    monkeypatch.setattr(module.fractals, "sample_ifs_classes", no_rendering)
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, *flags, "--out", str(out)]) == 1
    assert says in _one_line_error(capsys)
    assert not out.exists()


def test_pretrain_refuses_an_out_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("notes")
    assert main(["pretrain", *TINY, "--out", str(out)]) == 1
    assert f"--out {out} is a file, not a folder" in _one_line_error(capsys)
    assert out.read_text() == "notes"


def test_pretrain_function_checks_its_options_too(tmp_path):
    from mlae.errors import InputError
    from mlae.pretrain import DEFAULTS, pretrain

    with pytest.raises(InputError, match="--heads must be >= 1"):
        pretrain(**dict(DEFAULTS, heads=0), steps=None, threads=1, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_bug_in_pretraining_keeps_its_traceback(tmp_path, monkeypatch):
    from mlae import pretrain as module

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(module.fractals, "sample_ifs_classes", broken)
    with pytest.raises(ZeroDivisionError):
        main(["pretrain", *TINY, "--out", str(tmp_path / "run")])
