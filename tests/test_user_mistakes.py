"""Mistakes a new user makes with the command line: each is refused (or warned about) in one line that says what
to do, before anything of theirs is written over; and the things they reasonably try (a run folder where a file
was asked for, a folder of images to predict) work."""
from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from mlae.cli import main

pytest.importorskip("yaml")
testing = pytest.importorskip("mlae.data.testing")

TINY = ["--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--patch-size", "4", "--epochs", "1",
        "--batch-size", "16", "--warmup-epochs", "0", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def pets(tmp_path_factory) -> Path:
    return testing.make_image_folder(tmp_path_factory.mktemp("data") / "pets", classes=("cat", "dog"), per_class=8,
                                     size=32)


@pytest.fixture(scope="module")
def pets_run(pets, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "mlae"
    assert main(["train", "--dataset", f"folder:{pets}", *TINY, "--out", str(out)]) == 0
    return out


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlae: error: ") and len(err.splitlines()) == 1, err
    return err


# ------------------------------------------------------------------------------------- values that train nothing


@pytest.mark.parametrize("flags, named", [
    (["--method", "lora", "--alpha", "0"], "alpha (--alpha) = 0"),
    (["--method", "dmlora", "--alpha", "0"], "alpha (--alpha) = 0"),
    (["--method", "mlae", "--scale", "0"], "scale (--scale) = 0"),
    (["--method", "mlae", "--coeff-init", "0"], "coeff_init (--coeff-init) = 0"),
    (["--method", "dmlora", "--alpha", "nan"], "alpha (--alpha) must be finite"),
])
def test_a_factor_that_zeroes_the_update_is_refused_before_the_data_loads(flags, named, tmp_path, capsys):
    """alpha = 0 (or MLAE's scale or c_i = 0) multiplies the update and, with B = 0 at the start, every adapter
    gradient by 0: the run would "succeed" with the backbone's features only. The dataset here does not exist:
    the error is about the value, so the options were checked first."""
    out = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{tmp_path / 'no-such-data'}", *flags, "--out", str(out)]) == 1
    err = _one_line_error(capsys)
    assert named in err and "no-such-data" not in err
    assert not out.exists()


def test_a_negative_alpha_is_a_valid_choice():
    import mlae

    assert mlae.LoRAConfig(alpha=-8).alpha == -8  # the update's sign flips; B learns the opposite sign


# --------------------------------------------------------------------------------------------- data and run folders


def test_a_folder_with_one_class_is_refused(tmp_path, capsys):
    one = testing.make_image_folder(tmp_path / "one", classes=("cat",), per_class=4, size=32)
    assert main(["train", "--dataset", f"folder:{one}", *TINY, "--out", str(tmp_path / "run")]) == 1
    assert "only one class folder (cat); a classifier needs at least two" in _one_line_error(capsys)


@pytest.mark.parametrize("command", ["train", "compare", "sweep"])
@pytest.mark.parametrize("where", ["itself", "inside"])
def test_a_run_folder_inside_the_dataset_folder_is_refused(where, command, pets, capsys):
    """It would become one more class folder for the next run on that dataset: refused before anything is
    written, by compare and sweep as by train."""
    before = sorted(p.name for p in pets.iterdir())
    out = pets if where == "itself" else pets / "runs" / "a"
    args = {"train": ["train", "--dataset", f"folder:{pets}"],
            "compare": ["compare", "--methods", "linear", "--datasets", f"folder:{pets}"],
            "sweep": ["sweep", "--dataset", f"folder:{pets}", "--param", "dropout=0"]}[command]
    tiny = [a for a in TINY if a != "--quiet"] if command == "compare" else TINY  # compare logs each run's output
    assert main([*args, *tiny, "--out", str(out)]) == 1
    assert f"is inside the dataset folder {pets.resolve()}" in _one_line_error(capsys)
    assert sorted(p.name for p in pets.iterdir()) == before


def test_a_warmup_longer_than_the_run_is_said(pets, tmp_path):
    from mlae.errors import MLAEWarning

    with pytest.warns(MLAEWarning, match=r"warmup_epochs \(--warmup-epochs\) 5 is longer than the run \(--epochs 1\)"):
        assert main(["train", "--dataset", f"folder:{pets}", *TINY, "--warmup-epochs", "5",
                     "--out", str(tmp_path / "run")]) == 0


@pytest.mark.parametrize("analysis", [["similarity"], ["attention", "--block", "-1"]])
def test_an_analysis_into_the_dataset_folder_of_its_run_is_refused(analysis, pets, pets_run, capsys):
    before = sorted(p.name for p in pets.iterdir())
    assert main(["analyze", *analysis, str(pets_run), "--out", str(pets / "figures")]) == 1
    assert f"is inside the dataset folder {pets.resolve()}" in _one_line_error(capsys)
    assert sorted(p.name for p in pets.iterdir()) == before


def test_a_folder_that_holds_other_files_is_not_a_run_folder(pets, tmp_path, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert main(["train", "--dataset", f"folder:{pets}", *TINY, "--out", str(mine), *extra]) == 1
        assert "holds other files and no run; choose a new or empty folder" in _one_line_error(capsys)
    assert sorted(p.name for p in mine.iterdir()) == ["todo.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--dataset", f"folder:{pets}", *TINY, "--out", str(empty)]) == 0  # an empty one is fine


def test_a_comparison_does_not_write_into_a_run_folder_or_a_folder_of_other_files(pets, pets_run, tmp_path, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "todo.txt").write_text("mine")
    before = sorted(p.name for p in pets_run.iterdir())
    compare = ["compare", "--methods", "linear", "--datasets", f"folder:{pets}",
               *[a for a in TINY if a != "--quiet"]]
    assert main([*compare, "--out", str(pets_run)]) == 1
    assert "is a `mlae train` run folder; give the comparison a folder of its own" in _one_line_error(capsys)
    assert main([*compare, "--out", str(mine)]) == 1
    assert "holds other files and no comparison; choose a new or empty folder" in _one_line_error(capsys)
    assert sorted(p.name for p in pets_run.iterdir()) == before and sorted(p.name for p in mine.iterdir()) == [
        "todo.txt"]


def test_the_default_run_folder_of_folder_dot_is_named_after_the_folder(pets, tmp_path, monkeypatch):
    from mlae.recipes import dataset_key

    monkeypatch.chdir(pets)
    assert dataset_key("folder:.") == "pets" and dataset_key("folder:../pets/") == "pets"


def _interrupt_after(args: list[str], ready) -> str:
    """Start ``mlae`` with ``args``, send it SIGINT once ``ready()`` holds, and return its stderr (exit 130)."""
    # A shell starts background jobs with SIGINT ignored, and Python then leaves it so: give the child the default.
    proc = subprocess.Popen([sys.executable, "-m", "mlae", *args], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 300
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    return err


def test_ctrl_c_says_how_to_continue_and_that_command_does(pets, tmp_path, capsys):
    """A real SIGINT to a real training process after its first checkpoint: the message names the command, and
    that command continues the run (interrupted again once it has trained further epochs). The run is far too
    long to finish in between."""
    out = tmp_path / "my run"  # a space: the command must be quoted

    def epochs() -> int:
        path = out / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    err = _interrupt_after(["train", "--dataset", f"folder:{pets}", *TINY, "--epochs", "100000", "--out", str(out)],
                           lambda: (out / "checkpoint.safetensors").exists())
    prefix = "interrupted; continue from the last checkpoint with: "
    command = next(line for line in err.splitlines() if line.startswith(prefix))[len(prefix):]
    argv = shlex.split(command)
    assert argv[:2] == ["mlae", "train"] and argv[2:] == ["--resume", "--out", str(out)]
    first = epochs()
    assert main(["train", "--resume", "--out", str(out), "--epochs", "7", "--quiet"]) == 1  # its settings are kept
    err = _interrupt_after([*argv[1:], "--quiet"], lambda: epochs() > first + 1)
    assert prefix + command in err
    assert epochs() > first + 1 and not (out / "results.json").exists()
    # --resume takes the settings the checkpoint records, even where config.yaml was emptied or is gone
    from mlae.recipes import config_from_options

    (out / "config.yaml").write_text("")
    cfg = config_from_options({"resume": True, "out": str(out)})
    assert cfg.epochs == 100000 and cfg.dataset == f"folder:{pets}" and cfg.batch_size == 16
    # the commands that read trained weights say what the folder is, and how to finish it
    capsys.readouterr()
    for args in (["eval", "--adapter", str(out)], ["export", "--adapter", str(out), "--out", str(tmp_path / "x")],
                 ["analyze", "similarity", str(out), "--out", str(tmp_path / "a")]):
        assert main(args) == 1
        assert f"an unfinished run; finish it with `mlae train --resume --out '{out}'`" in _one_line_error(capsys)


def test_an_unfinished_sweep_trial_is_finished_by_its_sweep(tmp_path, capsys):
    """`mlae train --resume` there would finish it outside the study, which would never record it."""
    trial = tmp_path / "sweep" / "trials" / "0"
    trial.mkdir(parents=True)
    (tmp_path / "sweep" / "study.db").touch()
    (trial / "checkpoint.safetensors").touch()
    assert main(["eval", "--adapter", str(trial)]) == 1
    assert "an unfinished trial of a sweep; run the sweep command again to finish it" in _one_line_error(capsys)


def test_a_peft_export_or_merged_export_folder_is_named_as_such(pets_run, tmp_path, capsys):
    peft, merged = tmp_path / "peft", tmp_path / "merged"
    assert main(["export", "--adapter", str(pets_run), "--format", "peft", "--out", str(peft)]) == 0
    assert main(["export", "--adapter", str(pets_run), "--out", str(merged)]) == 0
    capsys.readouterr()
    assert main(["eval", "--adapter", str(peft)]) == 1
    assert "a PEFT adapter folder (`mlae export --format peft`), which PEFT loads" in _one_line_error(capsys)
    assert main(["analyze", "similarity", str(merged), "--out", str(tmp_path / "a")]) == 1
    assert "a merged export (`mlae export`): its adapters are merged into the weights" in _one_line_error(capsys)


# --------------------------------------------------------------------------------------------- using a trained run


def test_predict_takes_a_folder_of_images(pets_run, pets, capsys):
    dog = str(sorted((pets / "dog").iterdir())[0])
    assert main(["predict", "--adapter", str(pets_run), str(pets / "cat"), dog]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    cats = sorted(str(p) for p in (pets / "cat").iterdir())
    assert [line.split("\t")[0] for line in lines] == [*cats, dog]


def test_predict_does_not_write_over_or_into_its_images(pets_run, pets, capsys):
    dog = sorted((pets / "dog").iterdir())[0]
    image = dog.read_bytes()
    for out, said in ((dog, "is one of the images to predict"), (pets / "cat" / "p.json", "inside the image folder")):
        assert main(["predict", "--adapter", str(pets_run), str(pets / "cat"), str(dog), "--out", str(out),
                     "--overwrite"]) == 1
        assert said in _one_line_error(capsys)
    assert dog.read_bytes() == image and not (pets / "cat" / "p.json").exists()


def test_predict_names_a_missing_path_and_an_empty_folder(pets_run, tmp_path, capsys):
    assert main(["predict", "--adapter", str(pets_run), str(tmp_path / "nope.png")]) == 1
    assert "nope.png: no such file or folder" in _one_line_error(capsys)
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--adapter", str(pets_run), str(tmp_path / "empty")]) == 1
    assert "a folder with no images in it" in _one_line_error(capsys)


def test_eval_on_other_class_names_warns_in_one_line(pets_run, tmp_path):
    """Same number of classes, other names: the top-1 compares label numbers and means nothing. Python's own
    warning format (file, line, source line) is for other libraries' warnings; ours read like our errors."""
    other = testing.make_image_folder(tmp_path / "farm", classes=("cat", "cow"), per_class=4, size=32)
    run = subprocess.run([sys.executable, "-m", "mlae", "eval", "--adapter", str(pets_run), "--dataset",
                          f"folder:{other}", "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    warning = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("mlae: warning: ") and "label 1: 'dog' vs 'cow'" in warning[0]
    assert "UserWarning" not in run.stderr and "top-1" in run.stdout
    same = subprocess.run([sys.executable, "-m", "mlae", "eval", "--adapter", str(pets_run), "--threads", "1"],
                          capture_output=True, text=True, timeout=300)
    assert same.returncode == 0 and "warning" not in same.stderr


def test_only_our_warnings_are_shortened_and_the_format_is_restored(pets_run, capsys):
    import warnings

    import mlae.cli

    before = warnings.formatwarning
    assert main(["eval", "--adapter", str(pets_run), "--threads", "1"]) == 0
    assert warnings.formatwarning is before  # main() gives a caller in the same process its format back
    ours = mlae.cli._format_warning("p is ignored", mlae.MLAEWarning, "/x/mlae/a.py", 3)
    theirs = mlae.cli._format_warning("tensor is not writable", UserWarning, "/x/mlae/data/base.py", 7)
    assert ours == "mlae: warning: p is ignored\n"
    assert theirs.startswith("/x/mlae/data/base.py:7: UserWarning: tensor is not writable")


def test_mole_takes_run_folders_as_experts(pets_run, pets, tmp_path):
    out = tmp_path / "mole"
    lora = tmp_path / "lora"
    assert main(["train", "--dataset", f"folder:{pets}", *TINY, "--method", "lora", "--out", str(lora)]) == 0
    assert main(["train", "--dataset", f"folder:{pets}", *TINY, "--method", "mole", "--experts-from", str(pets_run),
                 str(lora), "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["method"] == "mole"


def test_missing_experts_are_named_before_the_data_loads(tmp_path, capsys):
    assert main(["train", "--dataset", f"folder:{tmp_path / 'no-such-data'}", "--method", "mole", "--experts-from",
                 str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "mole")]) == 1
    err = _one_line_error(capsys)
    assert "--experts-from:" in err and "nope.safetensors not found" in err and "no-such-data" not in err


def test_a_full_fine_tuning_run_is_no_expert(pets, tmp_path, capsys):
    full = tmp_path / "full"
    assert main(["train", "--dataset", f"folder:{pets}", *TINY, "--method", "full", "--out", str(full)]) == 0
    assert main(["train", "--dataset", f"folder:{pets}", *TINY, "--method", "mole", "--experts-from", str(full),
                 "--out", str(tmp_path / "mole")]) == 1
    assert "is a full fine-tuning run (model.safetensors, no adapter.safetensors)" in _one_line_error(capsys)


def test_a_folder_that_is_no_expert_is_named(pets_run, pets, tmp_path, capsys):
    assert main(["train", "--dataset", f"folder:{pets}", *TINY, "--method", "mole", "--experts-from", str(pets),
                 "--out", str(tmp_path / "mole")]) == 1
    assert "is neither a PEFT adapter folder" in _one_line_error(capsys)


@pytest.mark.parametrize("target", ["merged.safetensors", "merged"])
def test_eval_and_predict_take_a_merged_export_and_agree_with_the_adapter(target, pets_run, pets, tmp_path, capsys):
    """The check a user makes after `mlae export`: the merged model scores what the adapter scored."""
    merged = tmp_path / target
    assert main(["export", "--adapter", str(pets_run), "--out", str(merged)]) == 0
    capsys.readouterr()
    results = []
    for weights in (pets_run, merged):
        out = tmp_path / f"eval-{weights.name}.json"
        assert main(["eval", "--adapter", str(weights), "--precision", "fp32", "--out", str(out)]) == 0
        results.append(json.loads(out.read_text()))
    assert results[0]["top1"] == results[1]["top1"] and results[0]["images"] == results[1]["images"] > 0
    image = str(sorted((pets / "dog").iterdir())[0])
    capsys.readouterr()
    for weights in (pets_run, merged):
        assert main(["predict", "--adapter", str(weights), image, "--top", "2"]) == 0
    adapter_line, merged_line = capsys.readouterr().out.strip().splitlines()
    assert adapter_line.split("\t")[1].split()[0] == merged_line.split("\t")[1].split()[0]  # same top class
    assert main(["export", "--adapter", str(merged), "--out", str(tmp_path / "again.safetensors")]) == 1
    assert "is already a merged export" in _one_line_error(capsys)


def test_val_of_a_run_trained_on_train_val_is_called_no_held_out_accuracy(pets_run, pets, tmp_path, capsys):
    """`--split test` (the default) trains on train+val: its val top-1 measures training images. Said, for the run
    and for its merged export; a `--split val` run's val is held out, and its eval says nothing."""
    merged = tmp_path / "merged.safetensors"
    assert main(["export", "--adapter", str(pets_run), "--out", str(merged)]) == 0
    capsys.readouterr()
    from mlae.errors import MLAEWarning

    for weights in (pets_run, merged):
        with pytest.warns(MLAEWarning, match="trained with --split test, on train\\+val: the val split was among"):
            assert main(["eval", "--adapter", str(weights), "--split", "val"]) == 0
    held_out = tmp_path / "val-run"
    assert main(["train", "--dataset", f"folder:{pets}", *TINY, "--split", "val", "--out", str(held_out)]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", MLAEWarning)
        assert main(["eval", "--adapter", str(held_out), "--split", "val"]) == 0


def test_a_merged_export_without_its_dataset_spec_asks_for_dataset(pets_run, pets, tmp_path, capsys):
    """Exports written before the provenance recorded the dataset spec."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    merged = tmp_path / "merged.safetensors"
    assert main(["export", "--adapter", str(pets_run), "--out", str(merged)]) == 0
    with safe_open(str(merged), "pt") as f:
        header = f.metadata()
    provenance = json.loads(header["mlae_provenance"])
    for key in ("dataset_spec", "data_root", "seed", "augment", "skip_bad_images"):
        provenance.pop(key)
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(merged)), str(old), {**header, "mlae_provenance": json.dumps(provenance)})
    capsys.readouterr()
    assert main(["eval", "--adapter", str(old)]) == 1
    assert "does not record its dataset spec" in _one_line_error(capsys)
    assert main(["eval", "--adapter", str(old), "--dataset", f"folder:{pets}"]) == 0
    assert torch.is_tensor(load_file(str(old))["head.weight"])


# --------------------------------------------------------------------------------------------- compare and sweep


@pytest.fixture(scope="module")
def vtab(tmp_path_factory) -> Path:
    return testing.make_vtab_folder(tmp_path_factory.mktemp("vtab"), name="cifar", n_train=16, n_test=8, size=32)


@pytest.mark.parametrize("datasets, said", [
    ("vtab:cifar,vtab:cifar", "--datasets lists vtab:cifar twice"),
    ("folder:a/pets,folder:b/pets", "folder:a/pets and folder:b/pets would share the run folder folder-pets"),
])
def test_compare_refuses_datasets_that_would_share_run_folders(datasets, said, vtab, tmp_path, capsys):
    """Else the second run replaces the first's folder and both rows of the table show the second's result."""
    out = tmp_path / "cmp"
    tiny = [a for a in TINY if a != "--quiet"]  # compare runs are quiet already
    assert main(["compare", "--methods", "lora", "--datasets", datasets, "--data-root", str(vtab), *tiny,
                 "--out", str(out)]) == 1
    assert said in _one_line_error(capsys)
    assert not (out / "runs").exists()


@pytest.mark.parametrize("variant, said", [
    ("mlae[dropout=abc]", "dropout=abc: expected a probability or auto"),
    ("mlae[experts=2.5]", "experts=2.5: expected an integer"),
    ("mlae[epochs=x]", "epochs=x: expected an integer"),
    ("mlae[adaptive=maybe]", "adaptive=maybe: expected a boolean"),
])
def test_a_variant_value_of_the_wrong_type_is_one_line_naming_it(variant, said, tmp_path, capsys):
    assert main(["compare", "--methods", variant, "--datasets", "suite:digits", "--out", str(tmp_path / "c")]) == 1
    assert said in _one_line_error(capsys)


@pytest.mark.parametrize("param, said", [("dropout=abc,0.5", "dropout=abc: expected a probability or auto"),
                                         ("lr=1e-4:x:log", "lr=x: expected a number")])
@pytest.mark.parametrize("jobs", ["1", "2"])  # 2: the check runs before any worker process starts
def test_a_sweep_value_of_the_wrong_type_is_one_line_naming_it(param, said, jobs, tmp_path, capsys):
    assert main(["sweep", "--param", param, "--jobs", jobs, "--out", str(tmp_path / "s")]) == 1
    assert said in _one_line_error(capsys)


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_storage_that_is_no_url_is_one_line_and_a_sqlite_folder_is_made(jobs, tmp_path, capsys):
    from mlae.experiments.sweep import open_storage

    assert main(["sweep", "--storage", "mystudy.db", "--jobs", jobs, "--out", str(tmp_path / "s")]) == 1
    assert "--storage takes a database URL (sqlite:///PATH/study.db" in _one_line_error(capsys)
    open_storage(f"sqlite:///{tmp_path / 'new' / 'deeper' / 'study.db'}", tmp_path)
    assert (tmp_path / "new" / "deeper" / "study.db").is_file()


def test_a_learned_p_has_no_published_row():
    from mlae.published import paper_row

    assert paper_row("mlae", {"dropout": "auto"}) is None
    assert paper_row("mlae", {"dropout": 0.0})[0] == "MLAE (decomposition + adaptive)"


def test_best_yaml_trains_from_another_folder(vtab, tmp_path, monkeypatch):
    """The sweep ran with a relative --data-root; its best.yaml says `mlae train --config best.yaml` trains the
    best configuration, from wherever that command runs."""
    import yaml

    monkeypatch.chdir(vtab.parent)
    out = tmp_path / "sweep"
    assert main(["sweep", "--dataset", "vtab:cifar", "--data-root", vtab.name, *TINY, "--param", "dropout=0,0.5",
                 "--no-prune", "--out", str(out)]) == 0
    recipe = yaml.safe_load((out / "best.yaml").read_text())
    assert recipe["data_root"] == str(vtab.resolve())
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(out / "best.yaml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0


def _sigterm_once(args: list[str], ready) -> tuple[subprocess.Popen, str]:
    """Start ``args``, send its main process alone a SIGTERM (as a batch scheduler does) once ``ready()``, and wait
    for it to end: (the process, its stderr)."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ready() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    return proc, proc.communicate(timeout=120)[1]


def test_sigterm_stops_compare_and_its_runs_which_then_continue(vtab, tmp_path):
    """A batch scheduler stops a job with SIGTERM to its main process only. compare passes it on to the run in
    progress, which keeps its checkpoint and releases its lock; no queued run starts; the same command continues."""
    out = tmp_path / "cmp"
    tiny = ["--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--patch-size", "4", "--batch-size", "16",
            "--warmup-epochs", "0", "--threads", "1", "--epochs", "100000"]
    args = [sys.executable, "-m", "mlae", "compare", "--methods", "lora", "--datasets", "vtab:cifar", "--seeds",
            "0,1", "--jobs", "1", "--data-root", str(vtab), *tiny, "--out", str(out)]
    runs = [out / "runs" / "lora" / "vtab-cifar" / f"s{s}" for s in (0, 1)]
    proc, err = _sigterm_once(args, lambda: any((r / "checkpoint.safetensors").exists() for r in runs))
    assert proc.returncode == 130 and "interrupted; run the same command again to continue" in err
    started = [r for r in runs if (r / "checkpoint.safetensors").exists()]
    assert len(started) == 1 and not (started[0] / ".mlae.lock").exists() and not (out / ".mlae.lock").exists()
    assert "interrupted; continue from the last checkpoint" in (started[0] / "train.log").read_text()
    other = next(r for r in runs if r not in started)
    assert not (other / "train.log").exists()  # the queued run never started


def test_sigterm_stops_sweep_workers_and_queues_their_trials_again(vtab, tmp_path):
    """SIGTERM to `mlae sweep --jobs 2` alone reaches its worker processes: each fails its trial, which is queued
    again for the next run of the command, and its run folder keeps a checkpoint and no lock."""
    import optuna

    out = tmp_path / "sweep"
    args = [sys.executable, "-m", "mlae", "sweep", "--dataset", "vtab:cifar", "--data-root", str(vtab), *TINY,
            "--epochs", "100000", "--param", "dropout=0,0.5", "--no-prune", "--jobs", "2",
            "--out", str(out)]
    trials = [out / "trials" / str(n) for n in (0, 1)]
    proc, err = _sigterm_once(args, lambda: all((t / "checkpoint.safetensors").exists() for t in trials))
    assert proc.returncode == 130 and "interrupted; rerun the same command to continue the sweep" in err, err
    for t in trials:
        assert (t / "checkpoint.safetensors").exists() and not (t / ".mlae.lock").exists()
    study = optuna.load_study(study_name=out.name, storage=f"sqlite:///{out / 'study.db'}")
    states = [t.state.name for t in study.get_trials(deepcopy=False)]
    assert states.count("FAIL") == 2 and states.count("WAITING") == 2 and "RUNNING" not in states, states


def test_a_compare_folder_where_one_run_is_needed_says_so(tmp_path):
    from mlae.errors import MissingFileError
    from mlae.experiments.analysis import resolve_run

    (tmp_path / "cmp" / "runs" / "lora").mkdir(parents=True)
    with pytest.raises(MissingFileError, match="an `mlae compare` folder: name one of its run folders"):
        resolve_run(tmp_path / "cmp")


@pytest.mark.parametrize("jobs, sampler", [("1", "grid"), ("2", "grid"), ("1", "tpe")])
def test_a_sweep_whose_every_trial_failed_is_an_error_and_writes_no_best_yaml(jobs, sampler, pets, tmp_path, capfd):
    """Not exit 0 and "wrote best.yaml" (which was never written): the study has no result. A TPE study's failed
    trials use up its budget (else it would ask for new trials for ever)."""
    out = tmp_path / "s"
    space = ["--param", "dropout=0,0.5"] if sampler == "grid" else ["--param", "dropout=0:0.5", "--trials", "2"]
    assert main(["sweep", "--dataset", f"folder:{pets}", *TINY, "--target-modules", "nothere", *space,
                 "--param", "coeff_init=1", "--sampler", sampler, "--jobs", jobs, "--out", str(out)]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert sum("trial" in line and "failed: no nn.Linear" in line for line in err) == 2, err
    assert err[-1].startswith("mlae: error: no trial of the study completed: 2 failed"), err
    assert not (out / "best.yaml").exists()


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_grid_value_listed_twice_is_refused(jobs, tmp_path, capsys):
    assert main(["sweep", "--param", "dropout=0,0.0,0.5", "--jobs", jobs, "--out", str(tmp_path / "s")]) == 1
    assert "dropout: 0.0 listed twice; list each value once" in _one_line_error(capsys)
    assert main(["sweep", "--param", "dropout=0,0.5", "--param", "dropout=0.1", "--jobs", jobs, "--out",
                 str(tmp_path / "s")]) == 1
    assert "--param dropout given twice; list all its values in one --param" in _one_line_error(capsys)


@pytest.mark.parametrize("option, command", [("--space", ["sweep"]), ("--config", ["train", "--dataset", "suite:digits"])])
def test_a_yaml_option_naming_a_folder_missing_or_broken_file_is_one_line(option, command, tmp_path, capsys):
    what = "search space" if option == "--space" else "recipe"
    (tmp_path / "folder").mkdir()
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    (tmp_path / "ctrl.yaml").write_text("a: \x07\n")
    (tmp_path / "model.bin").write_bytes(b"\x80\xff\x00" * 20)
    for name, said in (("folder", f"{option} {tmp_path / 'folder'} is a folder; name the YAML file of the {what}"),
                       ("nope.yaml", f"{option} {tmp_path / 'nope.yaml'}: {what} not found"),
                       ("bad.yaml", "bad.yaml: not valid YAML (expected ',' or ']', but got '<stream end>' at line 2"),
                       ("ctrl.yaml", "ctrl.yaml: not valid YAML (special characters are not allowed"),
                       ("model.bin", f"{option} {tmp_path / 'model.bin'}: not a text file")):
        assert main([*command, option, str(tmp_path / name), "--out", str(tmp_path / "o")]) == 1
        assert said in _one_line_error(capsys)


def _parsed_train_config(recipe: Path, *flags: str):
    """The TrainConfig `mlae train --config recipe FLAGS` would train, from its own parser, without training."""
    from mlae.cli import build_parser
    from mlae.commands.train import config_from_args

    return config_from_args(build_parser().parse_args(["train", "--config", str(recipe), *flags]))


def test_recipe_text_where_a_number_belongs_is_read_as_its_flag_reads_it(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-3 and 5e-4 as text (a float needs a dot there); --lr 1e-3 is 0.001, and so is
    the recipe's. The other settings' text converts as their flags' does (--seed 3), a per_dataset entry's too."""
    import yaml

    recipe = tmp_path / "cfg.yaml"
    recipe.write_text("lr: 1e-3\nweight_decay: 5e-4\nseed: '3'\nepochs: 2.0\ncoeff_init: 2e-1\n"
                      "per_dataset:\n  digits: {drop_path: 1e-2, img_size: '32'}\n")
    assert yaml.safe_load(recipe.read_text())["lr"] == "1e-3"  # the YAML pitfall this is about
    cfg = _parsed_train_config(recipe, "--dataset", "suite:digits")
    assert (cfg.lr, cfg.weight_decay, cfg.seed, cfg.epochs, cfg.drop_path, cfg.img_size) == (0.001, 5e-4, 3, 2, 0.01,
                                                                                             32)
    assert type(cfg.epochs) is int and cfg.options()["coeff_init"] == 0.2
    assert _parsed_train_config(recipe, "--lr", "2e-3").lr == 0.002  # the command line still overrides it


@pytest.mark.parametrize("line, said", [
    ("epochs: 1.5", "epochs: 1.5 is not an integer"),
    ("epochs: true", "epochs: true is not an integer"),  # bool is an int subclass: it would train 1 epoch
    ("epochs: one", "epochs: one is not an integer"),
    ("seed: 3x", "seed: 3x is not an integer"),
    ("lr: fast", "lr: fast is not a number"),
    ("lr: no", "lr: false is not a number"),
    ("pretrained: 3", "pretrained: 3 is not a boolean (true or false)"),
    ("backbone: 3", "backbone: 3 is not a string"),
    ("experts: true", "experts: true is not an integer"),
    ("dropout: abc", "dropout: abc is not a probability or auto"),
    ("per_dataset: {cifar: {epochs: 1.5}}", "per_dataset: cifar: epochs: 1.5 is not an integer"),
])
@pytest.mark.parametrize("command", [["train"], ["compare", "--methods", "lora", "--datasets", "suite:digits"],
                                     ["sweep"]])
def test_a_recipe_value_of_the_wrong_type_is_one_line_before_anything_is_written(line, said, command, tmp_path,
                                                                                   capsys):
    """Named with the file and the key before the run folder is made (not a TypeError from TrainConfig, or from the
    first epoch after config.yaml and metrics.jsonl were written); another dataset's per_dataset entry too."""
    recipe, out = tmp_path / "cfg.yaml", tmp_path / "out"
    recipe.write_text(line + "\n")
    assert main([*command, "--config", str(recipe), "--out", str(out)]) == 1
    assert _one_line_error(capsys) == f"mlae: error: {recipe}: {said}"
    assert not out.exists()


def test_variants_and_sweep_grids_read_an_optional_number_as_a_number():
    from mlae.experiments.sweep_space import parse_param
    from mlae.experiments.variants import parse_methods

    assert parse_methods("mlae[img_size=32]")[0].overrides == {"img_size": 32}
    assert parse_methods("mlae[img_size=none]")[0].overrides == {"img_size": None}
    assert parse_param("img_size=32,64", "mlae").values == (32, 64)


def test_compare_reuses_a_finished_mole_run_whose_experts_have_moved(pets_run, pets, tmp_path, capsys):
    import shutil

    expert, out = tmp_path / "expert", tmp_path / "cmp"
    shutil.copytree(pets_run, expert)
    args = ["compare", "--methods", "mole", "--datasets", f"folder:{pets}", "--seeds", "0", "--jobs", "1",
            "--experts-from", str(expert), *[a for a in TINY if a != "--quiet"], "--out", str(out)]
    assert main(args) == 0
    shutil.rmtree(expert)  # the experts are gone: the finished run's tables can still be made again
    assert main(args) == 0
    assert "mole" in (out / "summary.md").read_text()
    assert main([*args[:6], "0,1", *args[7:]]) == 1  # a run still to train needs them
    assert "--experts-from:" in _one_line_error(capsys)
