"""`mlae compare`: method variants, aggregation conventions, and a small end-to-end comparison."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from statistics import mean, stdev

import pytest

from mlae.cli import main
from mlae.experiments.summary import aggregate
from mlae.experiments.variants import Variant, parse_methods
from mlae.recipes import RecipeError

pytest.importorskip("yaml")
testing = pytest.importorskip("mlae.data.testing")

TINY = ["--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--patch-size", "4"]
FAST = ["--epochs", "1", "--batch-size", "16", "--warmup-epochs", "0"]


def test_method_variants():
    v = parse_methods("mlae, mlae[dropout=0], mlae[adaptive=false,coeff_init=2],"
                      "lora[lr=1e-3,target_modules=qkv,proj,rank=4],nomask=mlae[dropout=0,adaptive=false]")
    assert [x.label for x in v] == ["mlae", "mlae[dropout=0]", "mlae[adaptive=false,coeff_init=2]",
                                    "lora[lr=1e-3,target_modules=qkv,proj,rank=4]", "nomask"]
    assert v[0] == Variant("mlae", "mlae", {})
    assert v[1].overrides == {"dropout": 0.0}
    assert v[2].overrides == {"adaptive": False, "coeff_init": 2.0}
    assert v[3].overrides == {"lr": 1e-3, "target_modules": ["qkv", "proj"], "rank": 4}
    assert v[4].method == "mlae" and v[4].overrides == {"dropout": 0.0, "adaptive": False}
    assert len({x.slug for x in v}) == 5 and all("/" not in x.slug for x in v)
    spaced = parse_methods(" no mask = mlae [dropout=0, coeff_init=2] , lora ")
    assert [(x.label, x.method, x.overrides) for x in spaced] == [
        ("no mask", "mlae", {"dropout": 0.0, "coeff_init": 2.0}), ("lora", "lora", {})]
    for bad in ("mlae,mlae", "lora[dropout=0.1]", "mlae[dropout=0", "nosuch", "mlae[seed=1]", "mlae[dropout]",
                "dmlora[schedule=sideways]"):
        with pytest.raises(RecipeError):
            parse_methods(bad)


def test_domain_and_overall_follow_the_vtab_convention():
    variants = [Variant("m", "lora")]
    datasets = ["vtab:cifar", "vtab:dtd", "vtab:eurosat"]
    values = {("vtab:cifar", 0): 60.0, ("vtab:dtd", 0): 70.0, ("vtab:eurosat", 0): 90.0,
              ("vtab:cifar", 1): 62.0, ("vtab:dtd", 1): 72.0, ("vtab:eurosat", 1): 94.0}
    rows = [{"method": "m", "dataset": d, "seed": s, "top1": v} for (d, s), v in values.items()]
    table = aggregate(rows, variants, datasets, [0, 1])["table"]["m"]
    assert table["natural"] == [65.0, 67.0] and table["specialized"] == [90.0, 94.0]
    # overall = mean of the domain means; mean_of_datasets = the plain mean, the other published convention
    assert table["overall"] == [77.5, 80.5]
    assert table["mean_of_datasets"] == pytest.approx([220 / 3, 228 / 3])
    # a seed missing a dataset leaves that seed out of its domain (and of both averages)
    table = aggregate(rows[:-1], variants, datasets, [0, 1])["table"]["m"]
    assert table["specialized"] == [90.0] and table["overall"] == [77.5] and table["vtab:cifar"] == [60.0, 62.0]
    assert table["mean_of_datasets"] == pytest.approx([220 / 3])


def test_paper_columns_give_both_vtab_averages():
    from mlae import published
    from mlae.experiments.summary import _paper_columns, domain_of

    datasets = [f"vtab:{name}" for name in published.VTAB_ORDER]
    domains: dict[str, list[str]] = {}
    for d in datasets:
        domains.setdefault(domain_of(d), []).append(d)
    label, values = _paper_columns([Variant("mlae", "mlae")], datasets, domains)["mlae"]
    assert label == "MLAE" and values["overall"] == 78.8 and values["mean_of_datasets"] == 76.7
    # on a subset both are recomputed over the datasets compared
    sub = ["vtab:cifar", "vtab:dtd", "vtab:eurosat"]
    _, values = _paper_columns([Variant("mlae", "mlae")], sub, {"natural": sub[:2], "specialized": sub[2:]})["mlae"]
    assert values["overall"] == round(((77.8 + 74.8) / 2 + 96.5) / 2, 1)
    assert values["mean_of_datasets"] == round((77.8 + 74.8 + 96.5) / 3, 1)


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vtab")
    for name in ("cifar", "eurosat"):
        testing.make_vtab_folder(root, name=name, n_train=24, n_test=24, size=32, num_classes=4)
    return root


def test_compare_two_methods_two_tasks_two_seeds(vtab_root, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--methods", "lora,nomask=mlae[dropout=0]", "--datasets", "vtab:cifar,vtab:eurosat",
            "--seeds", "0,1", "--out", str(out), "--data-root", str(vtab_root), *TINY, *FAST, "--jobs", "2"]
    assert main(argv) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 8
    assert {(r["method"], r["dataset"], r["seed"]) for r in rows} == {
        (m, d, s) for m in ("lora", "nomask") for d in ("vtab:cifar", "vtab:eurosat") for s in ("0", "1")}
    for r in rows:
        results = json.loads((Path(r["out"]) / "results.json").read_text())
        assert float(r["top1"]) == pytest.approx(100 * results["top1"], abs=1e-3)
        assert results["method"] == ("lora" if r["method"] == "lora" else "mlae")
        assert int(r["trainable_params"]) == results["params"]["trainable"]
    nomask = json.loads((out / "runs" / "nomask" / "vtab-cifar" / "s0" / "results.json").read_text())
    assert nomask["out"].endswith("s0")
    import yaml

    assert yaml.safe_load((out / "runs" / "nomask" / "vtab-cifar" / "s0" / "config.yaml").read_text())[
        "dropout"] == 0.0

    # summary.md: mean ± std over the two seeds, per dataset, per domain and overall, with the paper beside ours
    summary = (out / "summary.md").read_text()
    lora_cifar = [float(r["top1"]) for r in rows if r["method"] == "lora" and r["dataset"] == "vtab:cifar"]
    line = next(l for l in summary.splitlines() if l.startswith("| vtab:cifar |"))
    assert f"{mean(lora_cifar):.1f} ± {stdev(lora_cifar):.1f}" in line
    assert "| 67.1 |" in line  # the paper's LoRA on CIFAR-100
    assert "paper: lora" in summary and "paper: MLAE (decomposition + adaptive)" in summary
    assert "**natural**" in summary and "**specialized**" in summary
    assert "**overall (mean of domain means)**" in summary and "**mean of datasets**" in summary
    stats = list(csv.DictReader(open(out / "summary.csv")))
    for name in ("overall", "mean_of_datasets"):  # one dataset per domain here: both averages agree
        row = next(r for r in stats if r["method"] == "lora" and r["name"] == name)
        assert row["scope"] == "overall" and row["n_seeds"] == "2"
        assert row["paper"] == str(round((67.1 + 95.3) / 2, 1))  # CIFAR-100 and EuroSAT
    for domain in ("natural", "specialized"):
        assert (out / f"bars_{domain}.png").read_bytes()[:4] == b"\x89PNG"

    # A second invocation skips every finished run.
    before = {r["out"]: (Path(r["out"]) / "results.json").stat().st_mtime_ns for r in rows}
    capsys.readouterr()
    assert main(argv) == 0
    assert "8 already finished, 0 to run" in capsys.readouterr().out
    assert before == {o: (Path(o) / "results.json").stat().st_mtime_ns for o in before}

    # ... and refuses to mix in runs made with other settings.
    assert main([*argv, "--epochs", "2"]) == 1
    assert "other settings" in capsys.readouterr().err


def test_train_options_that_compare_replaces_are_refused(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--methods", "lora", "--out", "x", "--dataset", "suite:digits"])
    assert "--datasets" in capsys.readouterr().err


def _mode(cmd: list[str]) -> str:
    (mode,) = [arg for arg in cmd if arg in ("--overwrite", "--resume")]
    return mode


def test_interrupted_run_resumes_only_with_unchanged_settings(vtab_root, tmp_path, monkeypatch, capsys):
    """An unfinished run with a checkpoint is resumed when its settings are those asked for, else restarted."""
    import yaml

    from mlae.experiments import compare

    argv = ["compare", "--methods", "lora", "--datasets", "vtab:cifar", "--out", str(tmp_path / "c"),
            "--data-root", str(vtab_root), *TINY, *FAST]
    folder = tmp_path / "c" / "runs" / "lora" / "vtab-cifar" / "s0"
    commands = []

    class FailingRun:  # a stand-in for the `mlae train` process: records its command line, exits 1
        def __init__(self, cmd, **kwargs):
            commands.append(cmd)

        def wait(self, timeout=None):
            return 1

    monkeypatch.setattr(compare.subprocess, "Popen", FailingRun)
    folder.mkdir(parents=True)
    (folder / "checkpoint.safetensors").write_bytes(b"")
    assert main(argv) == 1  # the stand-in "fails": nothing finished
    assert _mode(commands[-1]) == "--overwrite"  # the run's settings are unknown: start over
    assert "checkpoint is discarded, its settings are unknown" in capsys.readouterr().out
    recipe = yaml.safe_load((folder / "compare.yaml").read_text())
    assert recipe["epochs"] == 1
    (folder / "config.yaml").write_text(yaml.safe_dump({**recipe, "threads": 1}))  # as `mlae train` writes it
    assert main(argv) == 1
    assert _mode(commands[-1]) == "--resume"
    assert "discarded" not in capsys.readouterr().out
    assert main([*argv, "--epochs", "2"]) == 1
    assert _mode(commands[-1]) == "--overwrite"
    assert "discarded, it was made with other settings (epochs: 1 -> 2)" in capsys.readouterr().out
    # A run folder written before --normalize / --head-init existed held their defaults: still the same settings.
    older = {k: v for k, v in recipe.items() if k not in ("normalize", "head_init")}
    (folder / "config.yaml").write_text(yaml.safe_dump({**older, "threads": 1}))
    assert main(argv) == 1
    assert _mode(commands[-1]) == "--resume"
    assert main([*argv, "--normalize", "inception"]) == 1  # a train option compare inherits
    assert _mode(commands[-1]) == "--overwrite"
    assert yaml.safe_load((folder / "compare.yaml").read_text())["normalize"] == "inception"
