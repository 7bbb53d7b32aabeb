"""`mlae train|eval|export` end to end on tiny models and tiny VTAB-1k / FGVC folders built on disk."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mlae.cli import main

pytest.importorskip("yaml")
testing = pytest.importorskip("mlae.data.testing")
pytest.importorskip("mlae.backbones")

# timm's tiny test ViT (6 blocks, 64 wide) on 32x32 images: a training epoch takes about a second.
TINY = ["--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--patch-size", "4"]
FAST = ["--epochs", "1", "--batch-size", "32", "--warmup-epochs", "0"]
METHODS = ["mlae", "lora", "lora-dropout", "linear", "full"]
TIMING = ("images_per_s", "train_time_s", "epoch_time_s")


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vtab")
    testing.make_vtab_folder(root, name="cifar", n_train=64, n_test=48, size=32)
    return root


@pytest.fixture(scope="module")
def fgvc_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fgvc")
    testing.make_fgvc_folder(root, size=40)
    return root


def _train(root: Path, out: Path, *extra: str) -> int:
    return main(["train", "--dataset", "vtab:cifar", "--data-root", str(root), *TINY, *FAST, "--quiet",
                 "--out", str(out), *extra])


def test_the_default_run_folder_gets_a_suffix_unless_overwrite_replaces_it(vtab_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--dataset", "vtab:cifar", "--data-root", str(vtab_root), *TINY, *FAST, "--quiet",
            "--method", "lora"]
    assert main(args) == 0 and main(args) == 0
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["cifar_lora_s0", "cifar_lora_s0-2"]
    assert main([*args, "--overwrite"]) == 0  # replaces runs/cifar_lora_s0, the folder --resume would continue
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["cifar_lora_s0", "cifar_lora_s0-2"]
    assert (tmp_path / "runs" / "cifar_lora_s0" / "results.json").exists()


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mlae_run(vtab_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "mlae"
    assert _train(vtab_root, out, "--method", "mlae", "--dropout", "0.5") == 0
    return out


@pytest.mark.parametrize("method", METHODS)
def test_train_each_method(method, vtab_root, mlae_run, tmp_path):
    import yaml

    out = mlae_run if method == "mlae" else tmp_path / method
    if method != "mlae":
        assert _train(vtab_root, out, "--method", method) == 0
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["test_top1"] <= 1.0 and results["method"] == method
    assert "LAST epoch" in results["protocol"]
    assert set(results["params"]) == {"adapter", "head", "trainable", "total"}
    (line,) = _metrics(out)
    assert {"train_loss", "lr", "train_top1", "test_top1", *TIMING} <= set(line)
    assert line["test_top1"] == results["test_top1"]
    assert yaml.safe_load((out / "config.yaml").read_text())["method"] == method
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    weights = out / ("model.safetensors" if method == "full" else "adapter.safetensors")
    assert not (out / "checkpoint.safetensors").exists()
    # `mlae eval` rebuilds the network from the file's metadata and reproduces the run's final accuracy.
    assert main(["eval", "--adapter", str(weights), "--data-root", str(vtab_root), "--out",
                 str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["test_top1"] == results["test_top1"]
    # the run folder itself names its weights file, as for `mlae analyze`
    assert main(["eval", "--adapter", str(out), "--data-root", str(vtab_root), "--out",
                 str(tmp_path / "eval-folder.json")]) == 0
    assert json.loads((tmp_path / "eval-folder.json").read_text())["test_top1"] == results["test_top1"]
    if method in ("lora", "lora-dropout", "mlae"):
        assert 0 < results["params"]["adapter"] < results["params"]["total"] // 10


def test_fgvc_folder(fgvc_root, tmp_path):
    name = next(p.name for p in fgvc_root.iterdir() if p.is_dir())
    rc = main(["train", "--dataset", f"fgvc:{name}", "--data-root", str(fgvc_root), *TINY, *FAST, "--quiet",
               "--out", str(tmp_path / "run"), "--split", "val"])
    assert rc == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["eval_split"] == "val" and "best_val_top1" in results and "test_top1" not in results


def test_refuses_to_overwrite_a_finished_run(vtab_root, mlae_run, capsys):
    before = (mlae_run / "results.json").stat().st_mtime_ns
    assert _train(vtab_root, mlae_run, "--method", "mlae") != 0
    assert "--overwrite" in capsys.readouterr().err
    # --resume on it: nothing to resume, and the advice is not --resume --overwrite (which is refused)
    assert _train(vtab_root, mlae_run, "--method", "mlae", "--resume") != 0
    assert "holds a finished run: there is nothing to resume; to train it again, drop --resume and pass " \
           "--overwrite" in capsys.readouterr().err
    assert (mlae_run / "results.json").stat().st_mtime_ns == before


def test_bad_dataset_folder_names_the_file(tmp_path, capsys):
    root = tmp_path / "vtab"
    testing.make_vtab_folder(root, name="cifar", n_train=8, n_test=8, size=32)
    listing = root / "cifar" / "train800val200.txt"
    listing.write_text(listing.read_text() + "images/train/missing.jpg 3\n")
    assert _train(root, tmp_path / "run") == 1
    err = capsys.readouterr().err
    assert "train800val200.txt" in err and "Traceback" not in err


def test_export_merged_and_peft(mlae_run, tmp_path):
    import timm
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mlae.trained import load_trained

    adapter = mlae_run / "adapter.safetensors"
    merged = tmp_path / "merged.safetensors"
    assert main(["export", "--adapter", str(adapter), "--format", "merged", "--out", str(merged)]) == 0
    with safe_open(str(merged), framework="pt") as f:
        meta = f.metadata()
    plain = timm.create_model(meta["timm_model"], **json.loads(meta["timm_kwargs"]))
    plain.load_state_dict(load_file(str(merged)))
    model, _ = load_trained(adapter)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model(x), rtol=1e-4, atol=1e-4)

    assert main(["export", "--adapter", str(adapter), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").exists()
    # the run folder stands for its adapter file, as --help says
    assert main(["export", "--adapter", str(mlae_run), "--out", str(tmp_path / "from_folder.safetensors")]) == 0
    assert load_file(str(tmp_path / "from_folder.safetensors")).keys() == load_file(str(merged)).keys()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mlae", *args]


def test_resume_after_sigkill_matches_uninterrupted_run(vtab_root, tmp_path):
    args = ["train", "--dataset", "vtab:cifar", "--data-root", str(vtab_root), *TINY, "--method", "mlae",
            "--dropout", "0.5", "--epochs", "4", "--batch-size", "16", "--threads", "1", "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", str(killed)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (killed / "checkpoint.safetensors").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    before = (killed / "metrics.jsonl").read_text().splitlines()
    assert before
    # Without --resume the unfinished run is protected too.
    assert main([*args, "--out", str(killed)]) != 0

    threads = torch.get_num_threads()
    try:
        assert main([*args, "--out", str(killed), "--resume"]) == 0
        assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    finally:
        torch.set_num_threads(threads)
    strip = lambda ms: [{k: v for k, v in m.items() if k not in TIMING} for m in ms]  # noqa: E731
    assert strip(_metrics(killed)) == strip(_metrics(tmp_path / "straight"))
    assert len(_metrics(killed)) == 4
    # Epochs up to the checkpoint were not run again (their timings would differ).
    checkpointed = (killed / "metrics.jsonl").read_text().splitlines()
    assert checkpointed[0] == before[0]
    first, second = (json.loads((p / "results.json").read_text()) for p in (killed, tmp_path / "straight"))
    assert first["test_top1"] == second["test_top1"]


def test_ddp_two_gloo_processes(vtab_root, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mlae",
           "train", "--dataset", "vtab:cifar", "--data-root", str(vtab_root), *TINY, *FAST, "--epochs", "2",
           "--threads", "1", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2
    assert [m["epoch"] for m in _metrics(out)] == [1, 2]
    assert proc.stdout.count("test top-1") == 1  # the summary, printed by rank 0 only


def test_recipe_file_with_command_line_overrides(vtab_root, tmp_path):
    import yaml

    recipe = Path(__file__).resolve().parents[1] / "configs" / "vtab_mlae.yaml"
    out = tmp_path / "run"
    assert _train(vtab_root, out, "--config", str(recipe)) == 0
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert (resolved["dropout"], resolved["coeff_init"]) == (0.7, 2)  # Table 10's cifar row
    assert (resolved["epochs"], resolved["backbone"], resolved["lr"]) == (1, "test_vit", 5e-4)  # flags win


# --------------------------------------------------------------------------------------------- resume, locks, errors


def _interrupted_run(root: Path, out: Path) -> None:
    """A real interrupted run: 3 epochs, stopped after the first one's checkpoint."""
    from mlae.engine import TrainConfig, train

    class Stop(Exception):
        pass

    def stop(epoch, metrics):
        raise Stop

    cfg = TrainConfig(dataset="vtab:cifar", data_root=str(root), backbone="test_vit", pretrained=False, img_size=32,
                      patch_size=4, epochs=3, batch_size=32, warmup_epochs=0, out=str(out), progress=False)
    with pytest.raises(Stop):
        train(cfg, on_epoch_end=stop)
    assert (out / "checkpoint.safetensors").exists()


def test_resume_refuses_changed_settings_and_keeps_the_record(vtab_root, tmp_path, capsys):
    out = tmp_path / "run"
    _interrupted_run(vtab_root, out)
    record = (out / "config.yaml").read_bytes()
    args = ["train", "--out", str(out), "--resume", "--quiet"]
    assert main([*args, "--epochs", "5", "--lr", "1e-3"]) == 1
    err = capsys.readouterr().err
    assert "epochs 3 -> 5" in err and "lr 0.0005 -> 0.001" in err and len(err.strip().splitlines()) == 1
    assert main([*args, "--dataset", "suite:digits"]) == 1
    assert "dataset 'vtab:cifar' -> 'suite:digits'" in capsys.readouterr().err
    assert (out / "config.yaml").read_bytes() == record and len(_metrics(out)) == 1
    # A hand-edited config.yaml does not pass either: the checkpoint keeps the settings it was written with.
    (out / "config.yaml").write_text(record.decode().replace("epochs: 3", "epochs: 4"))
    assert main(args) == 1 and "epochs 3 -> 4" in capsys.readouterr().err
    (out / "config.yaml").write_bytes(record)
    # Bookkeeping may change; the run then finishes as started.
    assert main([*args, "--threads", "1"]) == 0
    assert [m["epoch"] for m in _metrics(out)] == [1, 2, 3]
    assert (out / "config.yaml").read_bytes() == record


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds the run-folder lock until it is killed."""
    code = ("import sys, time; from mlae.files import FolderLock; FolderLock(sys.argv[1]).__enter__(); "
            "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_is_refused_and_a_dead_owners_lock_is_taken_over(vtab_root, tmp_path, capsys):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        assert _train(vtab_root, out) == 1
        err = capsys.readouterr().err
        assert f"is in use by process {holder.pid} on" in err and len(err.strip().splitlines()) == 1
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # kill -9 leaves the lock file behind: the next run takes it over, says so, and releases it when done.
    assert (out / ".mlae.lock").exists()
    assert _train(vtab_root, out) == 0
    assert f"was locked by process {holder.pid}, which has ended" in capsys.readouterr().err
    assert (out / "results.json").exists() and not (out / ".mlae.lock").exists()


def test_lock_from_another_host_is_refused_with_what_to_do(vtab_root, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".mlae.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": 0, "command": "mlae train"}))
    assert _train(vtab_root, out) == 1
    err = capsys.readouterr().err
    assert "in use by process 1 on elsewhere" in err and f"delete {out / '.mlae.lock'}" in err


def test_compare_folder_is_locked_but_its_runs_train(vtab_root, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["compare", "--methods", "linear", "--datasets", "vtab:cifar", "--data-root", str(vtab_root), *TINY,
            *FAST, "--threads", "1", "--out", str(out)]
    holder = _hold_lock(out)
    try:
        assert main(args) == 1
        assert f"in use by process {holder.pid}" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # compare holds its folder while `mlae train` subprocesses lock and write the run folders inside it
    assert main(args) == 0
    assert len(list(out.rglob("results.json"))) == 1 and not list(out.rglob(".mlae.lock"))


def test_no_cache_decodes_afresh_and_writes_nothing(tmp_path, monkeypatch):
    import yaml

    monkeypatch.setenv("MLAE_CACHE_DIR", str(tmp_path / "user-cache"))
    root = testing.make_vtab_folder(tmp_path / "vtab", name="cifar", n_train=32, n_test=16, size=32)
    assert _train(root, tmp_path / "run", "--no-cache") == 0
    assert not list(tmp_path.rglob("*_32.safetensors"))  # neither next to the data nor in the user's cache
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["cache"] is False
    assert main(["eval", "--adapter", str(tmp_path / "run" / "adapter.safetensors"), "--no-cache"]) == 0
    assert not list(tmp_path.rglob("*_32.safetensors"))


def test_unusable_out_is_one_line(vtab_root, mlae_run, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.write_text("keep me")
    assert _train(vtab_root, occupied) == 1
    assert f"{occupied} is a file, not a folder" in capsys.readouterr().err
    # exporting onto an existing file (a PEFT adapter is a folder) says so in one line and leaves the file alone
    assert main(["export", "--adapter", str(mlae_run / "adapter.safetensors"), "--format", "peft",
                 "--out", str(occupied)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mlae: error:") and str(occupied) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and occupied.read_text() == "keep me"


def _cli_train(root: Path, out: Path, *extra: str) -> list[str]:
    return _cli("train", "--dataset", "vtab:cifar", "--data-root", str(root), *TINY, *FAST, "--quiet", "--threads",
                "1", "--out", str(out), *extra)


def test_read_only_out_is_one_line(vtab_root, tmp_path):
    from conftest import run_on_tmpfs

    proc = run_on_tmpfs(tmp_path / "ro", _cli_train(vtab_root, tmp_path / "ro" / "run"), read_only=True)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"mlae: error: cannot write to {tmp_path / 'ro' / 'run'}: "
                                                "Read-only file system; choose another --out"]


def test_full_disk_is_one_line(vtab_root, tmp_path):
    from conftest import run_on_tmpfs

    out = tmp_path / "small" / "run"
    proc = run_on_tmpfs(tmp_path / "small", _cli_train(vtab_root, out, "--method", "full"), size="256k")
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("mlae: error: No space left on device") and "free some space" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line(vtab_root, tmp_path, capsys):
    assert _train(vtab_root, tmp_path / "run", "--device", "cuda") == 1
    err = capsys.readouterr().err
    assert err.startswith("mlae: error: --device cuda: no CUDA GPU is available") and "Traceback" not in err


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    import mlae
    from mlae.backbones import BackboneError
    from mlae.commands.train import _fail
    from mlae.data import DatasetError
    from mlae.errors import InputError, MissingFileError, NotMergeableError, RunDirError, TrainingError
    from mlae.recipes import RecipeError

    builtin = {InputError: ValueError, RecipeError: ValueError, DatasetError: ValueError,
               MissingFileError: FileNotFoundError, NotMergeableError: TypeError, RunDirError: RuntimeError,
               TrainingError: RuntimeError, BackboneError: RuntimeError}
    for cls, base in builtin.items():
        assert issubclass(cls, mlae.MLAEError) and issubclass(cls, base)  # old `except ValueError` still works
        assert _fail(cls("what is wrong; what to do")) == 1
        assert capsys.readouterr().err == "mlae: error: what is wrong; what to do\n"
    for bug in (ValueError("a bug"), KeyError("k"), TypeError("t"), FileNotFoundError("no errno: ours")):
        with pytest.raises(type(bug)):
            _fail(bug)


# --------------------------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("flags, named", [
    (["--lr", "nan"], "--lr"), (["--lr", "-1"], "--lr"), (["--weight-decay", "inf"], "--weight-decay"),
    (["--drop-path", "1.5"], "--drop-path"), (["--drop-path", "-0.5"], "--drop-path"),
    (["--threads", "-3"], "--threads"), (["--img-size", "-32"], "--img-size"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"), (["--resume", "--overwrite"], "--overwrite"),
    (["--seed", "-1"], "--seed"), (["--batch-size", "0"], "--batch-size"),
    (["--checkpoint-every", "0"], "--checkpoint-every"), (["--eval-every", "-1"], "--eval-every"),
])
def test_a_bad_training_value_is_one_line_naming_its_flag(flags, named, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), *flags]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mlae: error: ") and named in err and len(err.splitlines()) == 1
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize("value", ["nan", "abc"])
def test_a_dropout_that_is_no_probability_is_refused_by_the_parser(value, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--dropout", value])
    assert stop.value.code == 2
    assert f"argument --dropout: invalid dropout value: '{value}'" in capsys.readouterr().err


def test_resume_needs_an_interrupted_run(tmp_path, capsys):
    """A typo in --out must not start a new run where the user meant to continue one."""
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for out in (tmp_path / "typo", tmp_path / "other"):
        assert main(["train", "--resume", "--out", str(out), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert "--resume: no interrupted run in" in err and "drop --resume" in err
    assert not (tmp_path / "typo").exists()
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("command", [["eval", "--adapter"], ["predict", "a.png", "--adapter"]])
def test_eval_and_predict_keep_an_existing_out_file(command, tmp_path, capsys):
    """`--out` naming a run's results.json (or any existing file) is refused before the work starts: the adapter
    here does not even exist, and the error is about --out."""
    kept = tmp_path / "results.json"
    kept.write_text('{"top1": 0.9}')
    assert main([*command, str(tmp_path / "missing.safetensors"), "--out", str(kept)]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert kept.read_text() == '{"top1": 0.9}'
    assert main([*command, str(tmp_path / "missing.safetensors"), "--out", str(tmp_path)]) == 1
    assert "is a folder" in capsys.readouterr().err
    # with --overwrite the check passes and the next problem (the missing adapter) is reported instead
    assert main([*command, str(tmp_path / "missing.safetensors"), "--out", str(kept), "--overwrite"]) == 1
    assert "missing.safetensors" in capsys.readouterr().err and kept.read_text() == '{"top1": 0.9}'


def test_a_folder_without_weights_is_named(tmp_path, capsys):
    assert main(["eval", "--adapter", str(tmp_path)]) == 1
    assert f"{tmp_path} holds no adapter.safetensors or model.safetensors" in capsys.readouterr().err


def test_predict_top_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "a.png", "--adapter", "x.safetensors", "--top", "0"])
    assert "argument --top: must be an integer >= 1, not '0'" in capsys.readouterr().err


def test_an_unknown_embedded_version_lists_the_known_ones(tmp_path, capsys):
    assert main(["train", "--backbone", "embedded-v9", "--epochs", "1", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "unknown backbone 'embedded-v9'" in err and "embedded-v2, embedded-v3" in err


def test_an_option_of_another_method_names_who_takes_it(tmp_path, capsys):
    assert main(["train", "--method", "lora", "--dropout", "0.3", "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "--dropout do(es) not apply to method 'lora'; taken by mlae" in err
    assert "--lora-dropout (lora-dropout)" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--method", "mlae", "--rank", "4", "--out", str(tmp_path / "run")]) == 1
    assert "related: --expert-rank (mlae)" in capsys.readouterr().err


def test_predict_names_an_unreadable_image_without_a_flag_it_lacks(mlae_run, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    assert main(["predict", str(bad), "--adapter", str(mlae_run)]) == 1
    err = capsys.readouterr().err
    assert "1 of 1 images cannot be read (fix or remove them):" in err and "broken.png" in err
    assert "--skip-bad-images" not in err


@pytest.mark.parametrize("command", [["compare", "--methods", "lora", "--out", "o"], ["sweep", "--out", "o"],
                                     ["analyze", "ablation", "rank", "--datasets", "digits", "--out", "o"]])
def test_jobs_must_be_positive(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--jobs", "0"])
    assert "argument --jobs: must be an integer >= 1, not '0'" in capsys.readouterr().err


def test_a_misspelt_task_is_named_before_any_run_starts(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "lora", "--datasets", "suite:digits,suite:digitz", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "unknown suite task 'digitz'; known: " in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert main(["compare", "--methods", "lora", "--datasets", "vtab:cifar10", "--out", str(out)]) == 1
    assert "unknown VTAB-1k dataset 'cifar10'" in capsys.readouterr().err


def test_ablation_refuses_dropout_next_to_its_p(capsys):
    with pytest.raises(SystemExit):
        main(["analyze", "ablation", "masking", "--dropout", "0.3", "--datasets", "digits", "--out", "o", "--dry-run"])
    assert "--dropout does not apply here; the preset's variants set the masking probability from --p" in (
        capsys.readouterr().err)


def test_peft_export_to_a_file_name_is_refused(mlae_run, tmp_path, capsys):
    target = tmp_path / "adapter.safetensors"
    assert main(["export", "--adapter", str(mlae_run), "--format", "peft", "--out", str(target)]) == 1
    err = capsys.readouterr().err
    assert "--format peft writes a folder" in err and f"such as {tmp_path / 'adapter'}" in err
    assert not target.exists()


def test_eval_threads_sets_torch_threads(mlae_run, capsys):
    from mlae.hardware import cpu_cores

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert main(["eval", "--adapter", str(mlae_run), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        torch.set_num_threads(cpu_cores() + 3)
        assert main(["eval", "--adapter", str(mlae_run), "--threads", "0"]) == 0  # 0 = auto, as for train
        assert 1 <= torch.get_num_threads() <= cpu_cores()
    finally:
        torch.set_num_threads(before)
    assert "top-1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "--adapter", str(mlae_run), "--threads", "-1"])
    assert "must be an integer >= 1, or 0 for the cores other programs leave free, not '-1'" in capsys.readouterr().err


def test_a_learned_p_over_one_epoch_warns(vtab_root, tmp_path, capsys):
    """The heldout controller moves p after every epoch but the last: one epoch never moves it, and says so."""
    heldout = ("--method", "mlae", "--dropout", "auto", "--dropout-learner", "heldout")
    assert _train(vtab_root, tmp_path / "auto", *heldout) == 0
    assert "with --epochs 1 it never does" in capsys.readouterr().err
    assert _train(vtab_root, tmp_path / "two", *heldout, "--epochs", "2") == 0
    assert "never does" not in capsys.readouterr().err
    # The default (concrete) learner moves p in every step, so one epoch is enough.
    assert _train(vtab_root, tmp_path / "concrete", "--method", "mlae", "--dropout", "auto") == 0
    assert "never does" not in capsys.readouterr().err
