"""The paper-regime study runner (benchmarks/paper_regime.py): selection on val200, the committed CSV, resumption."""
import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paper_regime.py"
TINY = ["--datasets", "suite:digits", "--seeds", "0", "--epochs", "1", "--lr", "2e-3", "--p-grid", "0,0.5",
        "--alpha-grid", "8,16", "--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--patch-size", "4",
        "--threads", "1", "--jobs", "2"]


def _run(part: str, tmp_path: Path, *extra: str) -> str:
    cmd = [sys.executable, str(SCRIPT), part, *TINY, *extra, "--csv", str(tmp_path / "rows.csv"), "--runs",
           str(tmp_path / "runs")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_selection_on_val_rows_and_resumption(tmp_path):
    _run("select", tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "rows.csv")))
    trials = [r for r in rows if r["selected_by"] == "trial"]
    assert sorted(r["variant"] for r in trials) == ["lora[alpha=16]", "lora[alpha=8]", "mlae[dropout=0.5]",
                                                     "mlae[dropout=0]"]
    assert all(r["split"] == "val" and r["val_top1"] and not r["test_top1"] and r["train_top1"] for r in trials)
    assert {r["precision"] for r in rows} == {"bf16"}  # the study's pinned default, recorded
    # Rows from before the precision column were all bf16: they still count as done...
    with open(tmp_path / "rows.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "precision": ""} for r in rows)
    assert "0 run(s) to train" in _run("select", tmp_path)
    # ...and another precision is another setting: none of its runs is in the table.
    assert f"{len(rows)} rows, 0 with epochs 1" in _run("status", tmp_path, "--precision", "fp32")

    # status counts what each part has left, without training or writing anything
    before = (tmp_path / "rows.csv").read_text()
    status = _run("status", tmp_path)
    assert "left: select: 0 run(s)\n" in status and "left: test --selected-by val: 2 run(s), about" in status
    assert (tmp_path / "rows.csv").read_text() == before and "to train" not in status
    assert "\n  by variant: " in status and ", lora-dropout 1," in status  # the claims part, in its order

    # The honest protocol's retrains alone first: no candidate is trained for "selected on test" yet.
    _run("test", tmp_path, "--selected-by", "val")
    rows = list(csv.DictReader(open(tmp_path / "rows.csv")))
    assert {r["selected_by"] for r in rows} == {"trial", "val"}
    assert sorted(r["variant"] for r in rows if r["selected_by"] == "val") == ["lora", "mlae"]

    _run("test", tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "rows.csv")))
    spec = importlib.util.spec_from_file_location("paper_regime", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert list(rows[0]) == module.COLUMNS
    by_role = {(r["variant"], r["selected_by"]): r for r in rows}
    best_p = max((float(by_role[f"mlae[dropout={p}]", "trial"]["val_top1"]), -i, p)
                 for i, p in enumerate(["0", "0.5"]))[2]
    chosen = by_role["mlae", "val"]
    assert float(chosen["p"]) == float(best_p) and chosen["test_top1"]
    # the chosen configuration's seed-0 run is its candidate run: the same numbers, not a second training
    assert chosen["test_top1"] == by_role[f"mlae[dropout={best_p}]", "candidate"]["test_top1"]
    assert {("lora", "val"), ("lora", "test"), ("mlae", "test")} <= set(by_role)

    again = _run("test", tmp_path)
    assert "0 run(s) to train" in again and "done " not in again
    report = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "claims.py"), "--regime",
                             str(tmp_path / "rows.csv")], capture_output=True, text=True, cwd=ROOT)
    assert report.returncode == 0, report.stderr
    assert "mean of domain means" in report.stdout and "| suite:digits |" in report.stdout
    trials = report.stdout.split("## Trials")[1].split("\n\n")[1].splitlines()
    assert trials[0] == "| dataset | MLAE p = 0 | MLAE p = 0.5 | LoRA α = 8 | LoRA α = 16 |"
    assert trials[2].startswith("| suite:digits | ") and trials[2].count("**") >= 4  # a best per method

    # --update rewrites the marked tables of a document (docs/REPRODUCTION.md) and leaves the rest as it was
    doc = tmp_path / "report.md"
    doc.write_text("intro\n<!-- test: begin (x) -->\nold\n<!-- test: end -->\nmiddle\n<!-- trials: begin -->\n"
                   "<!-- trials: end -->\n<!-- unknown: begin -->\nkept\n<!-- unknown: end -->\n")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "claims.py"), "--regime",
                           str(tmp_path / "rows.csv"), "--update", str(doc)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    text = doc.read_text()
    assert "old" not in text and "| variant | suite:digits |" in text and "\n".join(trials) in text
    assert text.startswith("intro\n") and "middle\n" in text and "\nkept\n" in text


def test_a_table_with_an_older_header_is_rewritten_before_appending(tmp_path):
    spec = importlib.util.spec_from_file_location("paper_regime", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    path = tmp_path / "rows.csv"
    old = module.COLUMNS[:-1]  # as written before the last column existed
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old)
        writer.writeheader()
        writer.writerow({c: "a" for c in old})
    module.append_row(path, {c: "b" for c in module.COLUMNS})
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == module.COLUMNS
    assert rows[0][module.COLUMNS[-1]] == "" and rows[0]["dataset"] == "a"
    assert all(v == "b" for v in rows[1].values())
    assert module._learned_p({"blocks.0.attn.qkv": {"dropout": 0.25}, "blocks.1.attn.qkv": {"dropout": [0.1, 0.3]}}) \
        == "0.250 0.200"


def test_rows_written_before_an_option_existed_still_identify_their_run():
    """A row's `config` JSON from before `dropout_holdout` existed (and when the default learner was
    "variational") names the same fixed-p run as today's options: the study must not train it again."""
    spec = importlib.util.spec_from_file_location("paper_regime", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from mlae.recipes import get_method

    today = {**get_method("mlae").defaults(), "dropout": 0.3}
    legacy = {k: v for k, v in today.items() if k != "dropout_holdout"} | {"dropout_learner": "variational"}
    assert module._canonical("mlae", legacy) == module._canonical("mlae", today)
    auto = {**today, "dropout": "auto"}  # with a learned p the learner is part of the run
    assert module._canonical("mlae", {**auto, "dropout_learner": "variational"}) != module._canonical("mlae", auto)


def test_learned_p_table_shows_one_number_for_a_flat_profile(capsys):
    spec = importlib.util.spec_from_file_location("claims", ROOT / "benchmarks" / "claims.py")
    claims = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(claims)
    rows = [{"dataset": "suite:digits", "variant": "mlae-auto-heldout", "seed": "0", "learned_p": "0.5 0.5 0.5"},
            {"dataset": "suite:digits", "variant": "mlae-auto-heldout", "seed": "1", "learned_p": "0.1 0.2 0.3"},
            {"dataset": "suite:digits", "variant": "mlae", "selected_by": "val", "seed": "0", "p": "0.3"},
            {"dataset": "suite:textures", "variant": "mlae-auto-heldout", "seed": "1", "learned_p": "0.7 0.7 0.7"}]
    claims.learned_section(rows)
    heading, table = capsys.readouterr().out.split("\n\n")[:2]
    assert heading.strip().startswith("## MLAE-auto (heldout):")  # the variant names its learner
    table = table.splitlines()
    assert table[0] == "| dataset | p chosen on val200 | learned p, seed 0 | learned p, seed 1 |"
    assert table[2] == "| suite:digits | 0.3 | 0.5 (all 3 layers) | 0.1 0.2 0.3 |"
    assert table[3] == "| suite:textures | – | – | 0.7 (all 3 layers) |"


def test_claims_part_trains_variant_by_variant(tmp_path, monkeypatch):
    """A claims part stopped early leaves whole claims (a variant on every task and seed), not whole tasks."""
    spec = importlib.util.spec_from_file_location("paper_regime", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = tmp_path / "rows.csv"
    for d, best in (("suite:digits", "0"), ("suite:textures", "0.5")):
        for p in ("0", "0.5"):
            module.append_row(table, {c: "" for c in module.COLUMNS} | {
                "dataset": d, "variant": f"mlae[dropout={p}]", "selected_by": "trial", "epochs": "1", "lr": "0.002",
                "backbone": "test_vit", "precision": "bf16", "val_top1": "60" if p == best else "50"})
    wanted = []
    monkeypatch.setattr(module.Study, "execute", lambda self, runs: wanted.extend(runs))
    module.main(["claims", "--datasets", "suite:digits,suite:textures", "--seeds", "0,1", "--epochs", "1",
                 "--lr", "2e-3", "--p-grid", "0,0.5", "--backbone", "test_vit", "--csv", str(table),
                 "--claim-variants", "a=mlae[dropout={p}],b=lora"])
    assert [(w[4], w[1], w[2]) for w in wanted] == [
        ("a", "suite:digits", 0), ("a", "suite:digits", 1), ("a", "suite:textures", 0), ("a", "suite:textures", 1),
        ("b", "suite:digits", 0), ("b", "suite:digits", 1), ("b", "suite:textures", 0), ("b", "suite:textures", 1)]
    assert [w[0] for w in wanted[:4]] == ["mlae[dropout=0]"] * 2 + ["mlae[dropout=0.5]"] * 2  # {p}: each task's own


def test_lora_scale_stands_for_each_tasks_chosen_alpha_over_rank(tmp_path, monkeypatch):
    """{lora_scale} is alpha / r of the LoRA alpha chosen on val200 for that task, so MLAE can get LoRA's scale."""
    spec = importlib.util.spec_from_file_location("paper_regime", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    table = tmp_path / "rows.csv"
    for d, best in (("suite:digits", "32"), ("suite:textures", "2")):
        for variant, score in [("mlae[dropout=0]", "60")] + [(f"lora[alpha={a}]", "70" if a == best else "50")
                                                            for a in ("2", "32")]:
            module.append_row(table, {c: "" for c in module.COLUMNS} | {
                "dataset": d, "variant": variant, "selected_by": "trial", "epochs": "1", "lr": "0.002",
                "backbone": "test_vit", "precision": "bf16", "val_top1": score})
    wanted = []
    monkeypatch.setattr(module.Study, "execute", lambda self, runs: wanted.extend(runs))
    module.main(["claims", "--datasets", "suite:digits,suite:textures", "--seeds", "0", "--epochs", "1",
                 "--lr", "2e-3", "--p-grid", "0", "--alpha-grid", "2,32", "--backbone", "test_vit",
                 "--csv", str(table), "--claim-variants", "s=mlae[dropout={p},scale={lora_scale}]"])
    assert [w[0] for w in wanted] == ["mlae[dropout=0,scale=4]", "mlae[dropout=0,scale=0.25]"]
    assert module.lora_scale("lora[alpha=2,rank=4]") == 0.5 and module.lora_scale("lora") == 1.0


def test_learned_p_rows_are_labelled_by_the_learner_their_config_names():
    """Tables written before the relabel called the heldout learner's rows mlae-auto: they still read right."""
    spec = importlib.util.spec_from_file_location("claims", ROOT / "benchmarks" / "claims.py")
    claims = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(claims)
    heldout = '{"dropout": "auto", "dropout_learner": "heldout"}'
    concrete = '{"dropout": "auto", "dropout_learner": "concrete"}'
    assert claims._learner_label({"variant": "mlae-auto", "config": heldout})["variant"] == "mlae-auto-heldout"
    assert claims._learner_label({"variant": "mlae-auto-concrete", "config": concrete})["variant"] == "mlae-auto"
    assert claims._learner_label({"variant": "mlae-auto", "config": concrete})["variant"] == "mlae-auto"
    assert claims._learner_label({"variant": "lora", "config": "{}"})["variant"] == "lora"
