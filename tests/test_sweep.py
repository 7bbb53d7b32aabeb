"""`mlae sweep` on timm's tiny test ViT and a tiny VTAB-1k folder: shared studies, dead workers, outputs."""
from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from mlae.cli import main

optuna = pytest.importorskip("optuna")
pytest.importorskip("yaml")
testing = pytest.importorskip("mlae.data.testing")

TINY = ["--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--patch-size", "4"]
FAST = ["--batch-size", "16", "--warmup-epochs", "0", "--threads", "1", "--jobs", "1"]
GRID = ["--param", "dropout=0,0.5", "--param", "coeff_init=0.5,2"]


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vtab")
    testing.make_vtab_folder(root, name="cifar", n_train=32, n_val=16, n_test=32, size=32, num_classes=4)
    return root


def _argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--dataset", "vtab:cifar", "--data-root", str(root), *TINY, *FAST, "--out", str(out), *extra]


def _worker(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mlae", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _trials(storage, name: str) -> list:
    """The study's trials, less "spares": trials that a worker's ask() opened when another worker had just taken
    the last queued grid point, closed at once and never run (see Sweep.next_trial)."""
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    return [t for t in trials if not t.user_attrs.get("spare")]


def _postgres_tool(name: str) -> str | None:
    """initdb / pg_ctl: on PATH, or where Debian's postgresql package puts them (newest version first)."""
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: -int(p.parts[-3])
                      if p.parts[-3].isdigit() else 0)
    return shutil.which(name) or (str(versions[0]) if versions else None)


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server (Debian's `postgresql` package) in a temporary folder, on 127.0.0.1 only.
    Postgres refuses to run as root: as root the server runs as the `postgres` user (or `nobody`)."""
    psycopg = pytest.importorskip("psycopg", reason="PostgreSQL sweeps need the driver: pip install -e '.[postgres]'")

    tools = {name: _postgres_tool(name) for name in ("initdb", "pg_ctl")}
    if None in tools.values():
        pytest.skip("no PostgreSQL server here (initdb/pg_ctl not found): apt-get install postgresql")
    run_as: list[str] = []
    user = None
    if os.geteuid() == 0:
        import pwd

        users = [u for u in ("postgres", "nobody") if u in {p.pw_name for p in pwd.getpwall()}]
        if not users or not shutil.which("runuser"):
            pytest.skip("running as root, and no `postgres`/`nobody` user or no runuser to start PostgreSQL as")
        user = pwd.getpwnam(users[0])
        run_as = ["runuser", "-u", user.pw_name, "--"]
    with socket.socket() as sock:  # a free port (the tiny window until postgres binds it is acceptable here)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = Path(tempfile.mkdtemp(prefix="mlae-pg-"))  # not under pytest's tmp_path: root-only (0700) parents
    data, log = folder / "data", folder / "server.log"
    server = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off -c full_page_writes=off"
    steps = [[tools["initdb"], "-D", str(data), "-U", "mlae", "-A", "trust", "--no-sync", "--no-locale",
              "-E", "UTF8"],  # not SQL_ASCII, where psycopg returns text as bytes
             [tools["pg_ctl"], "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", server, "start"]]
    try:
        if user is not None:
            os.chown(folder, user.pw_uid, user.pw_gid)
        for step in steps:
            done = subprocess.run([*run_as, *step], capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                tail = (log.read_text()[-600:] if log.exists() else "") or (done.stdout + done.stderr)[-600:]
                pytest.skip(f"the PostgreSQL server could not start ({Path(step[0]).name} exit "
                            f"{done.returncode}){': ' + tail.strip() if tail.strip() else ''}")
        with psycopg.connect(host="127.0.0.1", port=port, user="mlae", dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE sweeps")  # autocommit: CREATE DATABASE runs outside a transaction
        yield f"postgresql+psycopg://mlae@127.0.0.1:{port}/sweeps"
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run([*run_as, tools["pg_ctl"], "-D", str(data), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_share_one_grid(vtab_root, tmp_path):
    import yaml

    out = tmp_path / "sweep"
    argv = _argv(vtab_root, out, *GRID, "--epochs", "2", "--no-prune")
    workers = [_worker(argv) for _ in range(2)]
    logs = [w.communicate(timeout=170)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(logs)

    trials = _trials(f"sqlite:///{out / 'study.db'}", "sweep")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    points = sorted((t.params["dropout"], t.params["coeff_init"]) for t in trials)
    assert points == [(0.0, 0.5), (0.0, 2.0), (0.5, 0.5), (0.5, 2.0)]  # every grid point once
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers took trials
    for t in trials:
        results = json.loads((out / "trials" / str(t.number) / "results.json").read_text())
        assert results["eval_split"] == "val" and results["top1"] == t.value
    assert sum("final: test top-1" in log for log in logs) == 1  # exactly one worker retrained

    final = json.loads((out / "final" / "results.json").read_text())
    assert final["eval_split"] == "test"
    best = max(trials, key=lambda t: (t.value, -t.number))
    recipe = yaml.safe_load((out / "best.yaml").read_text())
    assert recipe["split"] == "test" and recipe["dropout"] == best.params["dropout"]
    assert recipe["coeff_init"] == best.params["coeff_init"]
    # best.yaml is a recipe `mlae train` accepts, and it reproduces the final run
    assert main(["train", "--config", str(out / "best.yaml"), "--out", str(tmp_path / "again"), "--quiet"]) == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["top1"] == final["top1"]

    rows = list(csv.DictReader(open(out / "trials.csv")))
    assert sorted(int(r["number"]) for r in rows) == [0, 1, 2, 3]
    assert all(r["state"] == "COMPLETE" and r["val_top1"] != "" for r in rows)
    md = (out / "trials.md").read_text()
    assert "**best**" in md and "Final (test)" in md and "val200" in md
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_jobs_starts_workers_that_share_the_grid(vtab_root, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(_argv(vtab_root, out, *GRID, "--epochs", "1", "--no-prune", "--no-final", "--jobs", "2")) == 0
    assert "2 sweep workers × 1 torch thread(s) each" in capsys.readouterr().out
    trials = _trials(f"sqlite:///{out / 'study.db'}", "sweep")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert sorted((t.params["dropout"], t.params["coeff_init"]) for t in trials) == [
        (0.0, 0.5), (0.0, 2.0), (0.5, 0.5), (0.5, 2.0)]  # every grid point once, across the two processes


def test_killed_worker_trial_is_failed_and_rerun(vtab_root, tmp_path):
    out = tmp_path / "sweep"
    journal = tmp_path / "study.journal"
    argv = _argv(vtab_root, out, "--param", "dropout=0,0.5", "--param", "coeff_init=1", "--epochs", "4",
                 "--no-prune", "--storage", f"journal:{journal}", "--study-name", "shared", "--no-final")
    proc = _worker(argv)
    try:
        deadline = time.time() + 120
        while not (out / "trials" / "0" / "checkpoint.safetensors").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (out / "trials" / "0" / "results.json").exists(), "the trial finished before it could be killed"

    # Restarting the same command continues the study: the dead worker's trial is failed and run again.
    assert main(argv) == 0
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = _trials(storage, "shared")
    assert trials[0].state.name == "FAIL"
    retry = [t for t in trials if t.user_attrs.get("retry_of") == 0]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].params == trials[0].params
    complete = sorted(t.params["dropout"] for t in trials if t.state.name == "COMPLETE")
    assert complete == [0.0, 0.5]
    # the re-run continued the killed run from its checkpoint: all 4 epochs, in the new trial's folder
    metrics = (out / "trials" / str(retry[0].number) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert "re-run of 0" in (out / "trials.md").read_text()
    assert not (out / "final").exists()


def test_storage_without_its_driver_is_a_one_line_error(vtab_root, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("MySQLdb"):
        pytest.skip("a MySQL driver is installed here")
    assert main(_argv(vtab_root, tmp_path / "s", "--storage", "mysql://me:secret@127.0.0.1/x")) == 1
    err = capsys.readouterr().err
    assert err.startswith("mlae: error: --storage mysql://...: no database driver") and "mlae[postgres]" in err
    assert "secret" not in err and err.count("\n") == 1


def test_search_space_parsing():
    from mlae.experiments.sweep_space import parse_param
    from mlae.recipes import RecipeError

    assert parse_param("dropout=0,0.5", "mlae").values == (0.0, 0.5)
    p = parse_param("coeff_init=0.25:4:log", "mlae")
    assert (p.low, p.high, p.log, p.values) == (0.25, 4.0, True, None)
    assert parse_param("rank=2:16:int", "lora").integer
    assert parse_param("adaptive=true,false", "mlae").values == (True, False)
    assert parse_param("lr=1e-3,5e-4", "lora").values == (1e-3, 5e-4)
    for bad, method in (("dropout=0.1", "lora"), ("split=val", "mlae"), ("dropout", "mlae"),
                        ("coeff_init=0:4:log", "mlae"), ("dropout=1:0", "mlae")):
        with pytest.raises(RecipeError):
            parse_param(bad, method)


def test_grid_needs_values_and_tpe_runs_with_ranges(vtab_root, tmp_path, capsys):
    assert main(_argv(vtab_root, tmp_path / "bad", "--param", "coeff_init=0.25:4:log")) == 1
    assert "--sampler tpe" in capsys.readouterr().err
    # a grid value no run can take is refused before any trial trains or anything is written
    assert main(_argv(vtab_root, tmp_path / "p15", "--param", "dropout=0,1.5", "--param", "coeff_init=1")) == 1
    err = capsys.readouterr().err
    assert "the grid point dropout=1.5, coeff_init=1.0 is no valid run: dropout (--dropout) must be in [0, 1)" in err
    assert not (tmp_path / "p15").exists()
    out = tmp_path / "tpe"
    assert main(_argv(vtab_root, out, "--sampler", "tpe", "--trials", "2", "--epochs", "1", "--param",
                      "coeff_init=0.25:4:log", "--param", "dropout=0,0.5", "--no-final")) == 0
    trials = _trials(f"sqlite:///{out / 'study.db'}", "tpe")
    assert len(trials) == 2 and all(0.25 <= t.params["coeff_init"] <= 4 for t in trials)
    assert (out / "heatmap.png").exists() and (out / "best.yaml").exists()
    # the same command again finds the study complete and runs nothing
    assert main(_argv(vtab_root, out, "--sampler", "tpe", "--trials", "2", "--epochs", "1", "--param",
                      "coeff_init=0.25:4:log", "--param", "dropout=0,0.5", "--no-final")) == 0
    assert len(_trials(f"sqlite:///{out / 'study.db'}", "tpe")) == 2
    # more --trials extends the study; fewer, or none (whose default is 30 for a new study), keep its budget
    assert main(_argv(vtab_root, out, "--sampler", "tpe", "--trials", "3", "--epochs", "1", "--param",
                      "coeff_init=0.25:4:log", "--param", "dropout=0,0.5", "--no-final")) == 0
    assert "trial budget raised from 2 to 3" in capsys.readouterr().out
    assert len(_trials(f"sqlite:///{out / 'study.db'}", "tpe")) == 3
    assert main(_argv(vtab_root, out, "--sampler", "tpe", "--trials", "2", "--epochs", "1", "--param",
                      "coeff_init=0.25:4:log", "--param", "dropout=0,0.5", "--no-final")) == 0
    assert "its trial budget is 3; --trials 2 does not lower it" in capsys.readouterr().out
    assert main(_argv(vtab_root, out, "--sampler", "tpe", "--epochs", "1", "--param",
                      "coeff_init=0.25:4:log", "--param", "dropout=0,0.5", "--no-final")) == 0
    assert "raised" not in capsys.readouterr().out
    assert len(_trials(f"sqlite:///{out / 'study.db'}", "tpe")) == 3
    # a worker with other settings may not join the study
    assert main(_argv(vtab_root, out, "--sampler", "tpe", "--trials", "2", "--epochs", "3", "--param",
                      "coeff_init=0.25:4:log", "--param", "dropout=0,0.5")) == 1
    assert "epochs" in capsys.readouterr().err


def test_hopeless_trials_are_pruned_and_final_uses_test(tmp_path, monkeypatch):
    """With a stand-in for the engine: the median pruner stops a trial that trails the others at mid-training,
    trials train with split=val and only the final run with split=test."""
    import mlae.engine

    calls = []

    def fake_train(cfg, *, on_epoch_end=None):
        calls.append((cfg.split, cfg.options()["dropout"], cfg.options()["coeff_init"]))
        value = 0.9 - cfg.options()["dropout"] * cfg.options()["coeff_init"] / 2  # (0.5, 2) is far behind
        for epoch in range(1, cfg.epochs + 1):
            if on_epoch_end is not None:
                on_epoch_end(epoch, {"epoch": epoch, f"{cfg.split}_top1": value})
        return {"top1": value, "best_val_top1": value, "epochs": cfg.epochs, "wall_time_s": 0.0,
                "params": {"trainable": 1}, "eval_split": cfg.split}

    monkeypatch.setattr(mlae.engine, "train", fake_train)
    out = tmp_path / "sweep"
    assert main(["sweep", "--dataset", "suite:digits", "--epochs", "4", *GRID, "--jobs", "1", "--out", str(out)]) == 0
    states = {(t.params["dropout"], t.params["coeff_init"]): t.state.name
              for t in _trials(f"sqlite:///{out / 'study.db'}", "sweep")}
    assert states == {(0.0, 0.5): "COMPLETE", (0.0, 2.0): "COMPLETE", (0.5, 0.5): "COMPLETE", (0.5, 2.0): "PRUNED"}
    assert [c[0] for c in calls] == ["val"] * 4 + ["test"]
    assert calls[-1][1] == 0.0  # the best (val) configuration is the one retrained
    assert "pruned" in (out / "trials.md").read_text()


def test_trial_closed_by_another_worker_is_dropped_not_crashed(tmp_path, monkeypatch, capsys):
    """A worker on another machine that missed our heartbeats (`--stale-after`) fails our running trial and queues
    it again. This worker must notice at its next report, drop its run and go on: the point runs once more."""
    import mlae.engine
    from mlae.cli import build_parser
    from mlae.commands.sweep import sweep_from_args as Sweep

    out = tmp_path / "sweep"
    argv = ["sweep", "--dataset", "suite:digits", "--epochs", "3", "--no-prune", "--no-final", *GRID, "--jobs", "1",
            "--out", str(out)]
    calls = []

    def fake_train(cfg, *, on_epoch_end=None):
        calls.append(cfg.out)
        for epoch in range(1, cfg.epochs + 1):
            if len(calls) == 1 and epoch == 2:  # the other worker gives up on trial 0
                assert Sweep(build_parser().parse_args([*argv, "--stale-after", "0"])).fail_stale() == [0]
            on_epoch_end(epoch, {"epoch": epoch, "val_top1": 0.5})
        return {"top1": 0.5, "best_val_top1": 0.5, "epochs": cfg.epochs, "wall_time_s": 0.0,
                "params": {"trainable": 1}, "eval_split": cfg.split}

    monkeypatch.setattr(mlae.engine, "train", fake_train)
    assert main(argv) == 0
    assert "trial 0 was closed by another worker" in capsys.readouterr().err
    trials = _trials(f"sqlite:///{out / 'study.db'}", "sweep")
    assert trials[0].state.name == "FAIL" and trials[0].user_attrs["params"] == trials[0].params
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted((t.params["dropout"], t.params["coeff_init"]) for t in complete) == \
        [(0.0, 0.5), (0.0, 2.0), (0.5, 0.5), (0.5, 2.0)]  # every point once, the dropped one re-run
    assert [t.user_attrs.get("retry_of") for t in complete].count(0) == 1 and len(trials) == 5
    assert len(calls) == 5


def test_postgres_two_workers_survive_a_sigkill(vtab_root, tmp_path, postgres_url):
    """Two workers on one PostgreSQL study (created by whichever is first); one is killed with SIGKILL in the
    middle of a trial. The other fails that trial, runs it again from its checkpoint and completes the study:
    every grid point is trained to the end exactly once, no trial is started twice, one final retraining."""
    out = tmp_path / "sweep"
    argv = _argv(vtab_root, out, *GRID, "--epochs", "4", "--no-prune", "--storage", postgres_url,
                 "--study-name", "pg")
    workers = [_worker(argv) for _ in range(2)]
    logs: list[list[str]] = [[], []]
    pumps = [threading.Thread(target=lambda w=w, log=log: log.extend(w.stdout), daemon=True)
             for w, log in zip(workers, logs)]
    for pump in pumps:
        pump.start()

    def started(log: list[str]) -> list[int]:
        return [int(n) for n in re.findall(r"^trial (\d+) \(.*\) started", "".join(log), re.M)]

    try:
        victim = killed = None
        deadline = time.time() + 240
        while victim is None:  # the first trial that has a checkpoint but no result yet: kill its worker
            for i, log in enumerate(logs):
                for n in started(log):
                    folder = out / "trials" / str(n)
                    if (folder / "checkpoint.safetensors").exists() and not (folder / "results.json").exists():
                        victim, killed = i, n
            assert all(w.poll() is None for w in workers), "".join(logs[0] + logs[1])
            assert time.time() < deadline, "no trial reached its first checkpoint"
            time.sleep(0.02)
        workers[victim].send_signal(signal.SIGKILL)
        workers[victim].wait()  # reaped: its pid is no longer alive for the other worker to see
        assert not (out / "trials" / str(killed) / "results.json").exists(), "the trial ended before the kill"
        survivor = workers[1 - victim]
        survivor.wait(timeout=400)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait()
        for pump in pumps:
            pump.join(timeout=10)
    text = "".join(logs[1 - victim])
    assert workers[victim].returncode == -signal.SIGKILL and survivor.returncode == 0, text
    assert f"trial {killed} of dead worker" in text

    trials = _trials(postgres_url, "pg")
    states = Counter(t.state.name for t in trials)
    assert states == {"COMPLETE": 4, "FAIL": 1}, states  # nothing left queued or running
    dead = next(t for t in trials if t.number == killed)
    assert dead.state.name == "FAIL"
    retry = [t for t in trials if t.user_attrs.get("retry_of") == killed]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE" and retry[0].params == dead.params
    points = sorted((t.params["dropout"], t.params["coeff_init"]) for t in trials if t.state.name == "COMPLETE")
    assert points == [(0.0, 0.5), (0.0, 2.0), (0.5, 0.5), (0.5, 2.0)]  # none lost, none run twice
    runs = started(logs[0]) + started(logs[1])
    assert sorted(runs) == sorted(t.number for t in trials), runs  # each trial started by one worker, once
    assert f"trial {retry[0].number} (" in text and "started (resumed)" in text
    # the re-run continued the killed run from its checkpoint: each epoch once, in the new trial's folder
    metrics = (out / "trials" / str(retry[0].number) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(m)["epoch"] for m in metrics] == [1, 2, 3, 4]
    for t in trials:
        if t.state.name == "COMPLETE":
            assert json.loads((out / "trials" / str(t.number) / "results.json").read_text())["top1"] == t.value
    assert text.count("final: test top-1") == 1
    assert json.loads((out / "final" / "results.json").read_text())["eval_split"] == "test"


def test_a_study_created_before_an_option_existed_is_the_same_search():
    """Workers compare the study's base configuration in canonical form: a fixed-p MLAE study created before
    `dropout_holdout` existed (default learner then "variational") is joined, not refused."""
    from mlae.experiments.sweep import _comparable
    from mlae.recipes import config_from_options

    today = config_from_options({"method": "mlae", "dataset": "suite:digits", "dropout": 0.3}).to_dict()
    legacy = {k: v for k, v in today.items() if k != "dropout_holdout"} | {"dropout_learner": "variational"}
    assert _comparable(legacy) == _comparable(today)
    assert _comparable({**today, "lr": 1e-3}) != _comparable(today)
