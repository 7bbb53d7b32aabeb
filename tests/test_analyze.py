"""`mlae analyze similarity|attention|ablation` on run folders trained for one epoch on a tiny ViT."""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import torch

import mlae
from mlae.experiments import ablations
from mlae.cli import main

pytest.importorskip("yaml")
testing = pytest.importorskip("mlae.data.testing")
analyze = pytest.importorskip("mlae.experiments.analysis")

from conftest import make_tiny_vit  # noqa: E402

# timm's tiny test ViT (6 blocks, 64 wide, 2 heads) on 32x32 images, patch 4: an 8x8 patch grid.
TINY = ["--backbone", "test_vit", "--no-pretrained", "--img-size", "32", "--patch-size", "4"]
FAST = ["--epochs", "1", "--batch-size", "32", "--warmup-epochs", "0"]
PNG = b"\x89PNG"


@pytest.fixture(scope="module")
def vtab_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vtab")
    testing.make_vtab_folder(root, name="cifar", n_train=64, n_test=16, size=32)
    return root


def _train(root: Path, out: Path, *extra: str) -> Path:
    assert main(["train", "--dataset", "vtab:cifar", "--data-root", str(root), *TINY, *FAST, "--quiet",
                 "--out", str(out), *extra]) == 0
    return out


@pytest.fixture(scope="module")
def runs(vtab_root, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("runs")
    return {"mlae": _train(vtab_root, base / "mlae", "--method", "mlae", "--dropout", "0.5"),
            "lora": _train(vtab_root, base / "lora", "--method", "lora", "--rank", "4")}


def _png(path: Path) -> None:
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == PNG


# --------------------------------------------------------------------------------------------- similarity


def test_similarity_command_writes_figures_and_tables(runs, tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["analyze", "similarity", str(runs["mlae"]), str(runs["lora"]), "--out", str(out)]) == 0
    _png(out / "similarity.png")
    _png(out / "similarity_matrix_mlae.png")
    _png(out / "similarity_matrix_lora.png")
    report = json.loads((out / "similarity.json").read_text())
    assert list(report) == ["mlae", "lora"]
    assert "| layer | mlae | lora |" in (out / "similarity.md").read_text() and "**mean**" in capsys.readouterr().out

    from mlae.trained import load_trained

    for name, experts in (("mlae", 8), ("lora", 4)):
        model, _ = load_trained(runs[name] / "adapter.safetensors")
        expected = mlae.expert_similarity(model, per_layer=True)
        r = report[name]
        assert list(r["layers"]) == list(expected) and len(expected) == 6
        for layer, value in expected.items():
            assert r["layers"][layer]["mean"] == pytest.approx(value)
            assert r["layers"][layer]["experts"] == experts
            assert r["layers"][layer]["mean_abs"] >= abs(value) - 1e-9
        assert r["mean"] == pytest.approx(mlae.expert_similarity(model))
        assert r["matrix_layer"] == "mean" and torch.tensor(r["matrix"]).shape == (experts, experts)
        torch.testing.assert_close(torch.tensor(r["matrix"]).diagonal(), torch.ones(experts))

    # a second analysis into the same folder would replace these figures: refused, unless --overwrite
    before = (out / "similarity.json").read_text()
    assert main(["analyze", "similarity", str(runs["lora"]), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "already holds similarity.png, similarity.json, similarity.md" in err and "--overwrite" in err
    assert (out / "similarity.json").read_text() == before
    assert main(["analyze", "similarity", str(runs["lora"]), "--out", str(out), "--overwrite"]) == 0
    assert list(json.loads((out / "similarity.json").read_text())) == ["lora"]


def test_similarity_overwrite_leaves_no_figure_of_the_earlier_analysis(runs, tmp_path):
    """similarity_by_dataset.png exists only for runs of several datasets: an analysis of one dataset written over
    one of two removes it instead of leaving the old figure beside the new files; so goes the matrix figure of the
    run the new analysis leaves out (a file of the user's own beside them stays)."""
    from mlae.trained import load_trained

    reports = {name: {**analyze.similarity_report(load_trained(path / "adapter.safetensors")[0]), "series": name,
                      "dataset": dataset, "method": name}
               for (name, path), dataset in zip(runs.items(), ("cifar", "dtd"))}
    analyze.write_similarity(reports, tmp_path)
    _png(tmp_path / "similarity_by_dataset.png")
    assert {p.name for p in tmp_path.glob("similarity_matrix_*")} == {f"similarity_matrix_{n}.png" for n in runs}
    (tmp_path / "similarity_matrix_mine.png").write_bytes(b"not the analysis' own")
    analyze.write_similarity({"mlae": reports["mlae"]}, tmp_path)
    assert not (tmp_path / "similarity_by_dataset.png").exists() and list(json.loads(
        (tmp_path / "similarity.json").read_text())) == ["mlae"]
    assert {p.name for p in tmp_path.glob("similarity_matrix_*")} == {"similarity_matrix_mlae.png",
                                                                      "similarity_matrix_mine.png"}


def test_similarity_plot_has_one_series_per_run(runs):
    from mlae.trained import load_trained

    reports = {name: analyze.similarity_report(load_trained(path / "adapter.safetensors")[0])
               for name, path in runs.items()}
    fig = analyze.plot_similarity(reports)
    (ax,) = fig.axes
    assert len(ax.containers) == 2                       # one bar series per run
    assert all(len(bars) == 6 + 1 for bars in ax.containers)  # 6 layers + the overall mean
    assert [t.get_text().split(" (")[0] for t in ax.get_legend().get_texts()] == ["mlae", "lora"]
    heat = analyze.plot_matrix(reports["mlae"], "mlae")
    assert heat.axes[0].images[0].get_array().shape == (8, 8)


def test_similarity_layer_choice(runs, tmp_path):
    from mlae.trained import load_trained

    model, _ = load_trained(runs["mlae"] / "adapter.safetensors")
    layers = dict(mlae.adapter_layers(model))
    last = analyze.similarity_report(model, layer=-1)
    assert last["matrix_layer"] == "blocks.5.attn.qkv"
    torch.testing.assert_close(torch.tensor(last["matrix"]), mlae.similarity_matrix(layers["blocks.5.attn.qkv"]),
                               equal_nan=True)  # an expert masked in every step of this short run stays 0
    assert analyze.similarity_report(model, layer="blocks.2.attn.qkv")["matrix_layer"] == "blocks.2.attn.qkv"
    assert analyze.similarity_report(model, layer="2")["matrix_layer"] == "blocks.2.attn.qkv"
    with pytest.raises(ValueError, match="matches 6"):
        analyze.similarity_report(model, layer="qkv")
    with pytest.raises(ValueError, match="out of range"):
        analyze.similarity_report(model, layer=6)
    assert main(["analyze", "similarity", str(runs["mlae"]), "--layer", "nope", "--out", str(tmp_path)]) == 1


def test_similarity_per_dataset_averages_seeds():
    def report(series, dataset, value):
        return {"series": series, "dataset": dataset, "mean": value, "mean_abs": abs(value),
                "layers": {"blocks.0.attn.qkv": {"mean": value, "mean_abs": abs(value), "experts": 8}}}

    reports = {"a": report("lora", "cifar", 0.2), "b": report("lora", "cifar", 0.4), "c": report("lora", "dtd", 0.1),
               "d": report("mlae", "cifar", 0.05), "e": report("mlae", "dtd", -0.05)}
    table = analyze.by_dataset(reports)
    assert table["lora"] == pytest.approx({"cifar": 0.3, "dtd": 0.1})
    assert table["mlae"] == pytest.approx({"cifar": 0.05, "dtd": -0.05})
    (ax,) = analyze.plot_by_dataset(table).axes
    assert len(ax.containers) == 2 and all(len(bars) == 2 + 1 for bars in ax.containers)
    assert ax.containers[0][-1].get_height() == pytest.approx(0.2)  # lora's mean over the two datasets
    assert "per dataset" in analyze._markdown(reports)


def test_mean_matrix_over_layers_with_different_expert_counts():
    model = mlae.apply(make_tiny_vit(depth=4), mlae.MLAEConfig(masking="fixed", pattern="incremental", experts=4))
    torch.manual_seed(0)
    for _, layer in mlae.adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B)
    counts = [layer.experts for _, layer in mlae.adapter_layers(model)]
    assert len(set(counts)) > 1
    report = analyze.similarity_report(model)
    matrix = torch.tensor(report["matrix"])
    assert matrix.shape == (max(counts), max(counts)) and not matrix.isnan().any()
    # Entry (i, j) averages the layers that have both experts.
    mats = [mlae.similarity_matrix(layer) for _, layer in mlae.adapter_layers(model)]
    i = max(counts) - 1
    expected = torch.stack([m[0, i] for m in mats if m.shape[0] > i]).mean()
    assert matrix[0, i].item() == pytest.approx(expected.item(), abs=1e-6)


def test_similarity_refuses_runs_without_experts(vtab_root, runs, tmp_path, capsys):
    run = _train(vtab_root, tmp_path / "linear", "--method", "linear")
    assert main(["analyze", "similarity", str(run), "--out", str(tmp_path / "o")]) == 1
    assert "no adapter layers" in capsys.readouterr().err
    mole = _train(vtab_root, tmp_path / "mole", "--method", "mole", "--experts-from",
                  str(runs["mlae"] / "adapter.safetensors"), str(runs["lora"] / "adapter.safetensors"))
    assert main(["analyze", "similarity", str(mole), "--out", str(tmp_path / "o")]) == 1
    assert "no expert similarity for MoLELinear" in capsys.readouterr().err
    assert main(["analyze", "attention", str(mole), "--block", "0", "--out", str(tmp_path / "o")]) == 1
    assert "no per-expert updates" in capsys.readouterr().err
    assert main(["analyze", "similarity", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1


# --------------------------------------------------------------------------------------------- dropout


def test_dropout_command_plots_the_learned_p_per_layer(vtab_root, runs, tmp_path, capsys):
    auto = _train(vtab_root, tmp_path / "auto", "--method", "mlae", "--dropout", "auto", "--dropout-learner",
                  "variational", "--epochs", "2")
    heldout = _train(vtab_root, tmp_path / "heldout", "--method", "mlae", "--dropout", "auto", "--dropout-learner",
                     "heldout", "--epochs", "2")
    per_expert = _train(vtab_root, tmp_path / "per_expert", "--method", "mlae", "--dropout", "auto",
                        "--dropout-per-expert", "--dropout-learner", "concrete", "--experts", "3")
    out = tmp_path / "dropout"
    assert main(["analyze", "dropout", str(auto), str(per_expert), str(heldout), "--out", str(out)]) == 0
    for name in ("dropout.png", "dropout_profile.png"):
        _png(out / name)
    report = json.loads((out / "dropout.json").read_text())
    metrics = [json.loads(line) for line in (auto / "metrics.jsonl").read_text().splitlines()]
    h = report["auto"]
    assert h["epochs"] == [1, 2] and h["layers"] == [f"blocks.{i}.attn.qkv" for i in range(6)]
    for layer in h["layers"]:
        assert h["p"][layer] == [m["learned"][layer]["dropout"] for m in metrics]
    assert h["final"] == {n: v["dropout"] for n, v in json.loads((auto / "results.json").read_text())["learned"].items()}
    assert -1 <= h["depth_correlation"] <= 1
    experts = report["per_expert"]["per_expert"]["blocks.0.attn.qkv"]
    assert len(experts) == 3 and report["per_expert"]["final"]["blocks.0.attn.qkv"] == pytest.approx(sum(experts) / 3)
    # The heldout learner: one p per epoch, the same in every layer, so no correlation with depth.
    ho, ho_metrics = report["heldout"], [json.loads(line) for line in (heldout / "metrics.jsonl").read_text().splitlines()]
    assert ho["epochs"] == [1, 2] and len({v for v in ho["final"].values()}) == 1 and ho["depth_correlation"] is None  # NaN
    assert ho["p"]["blocks.3.attn.qkv"] == [m["learned"]["blocks.3.attn.qkv"]["dropout"] for m in ho_metrics]
    printed = capsys.readouterr().out
    assert "correlation with depth" in printed and "nan" not in printed
    assert printed.count("| **none** |") == 1  # the heldout column says it has no depth profile
    fig = analyze.plot_dropout_history({"auto": analyze.dropout_history(auto)})
    assert len(fig.axes[0].lines) == 6  # one line per adapted layer

    assert main(["analyze", "dropout", str(runs["mlae"]), "--out", str(tmp_path / "fixed_p")]) == 1
    assert "--dropout auto" in capsys.readouterr().err
    # the figures are there now: a second analysis into the folder needs --overwrite (checked before any run is read)
    for run in (heldout, runs["mlae"]):
        assert main(["analyze", "dropout", str(run), "--out", str(out)]) == 1
        assert "already holds dropout.png" in capsys.readouterr().err
    assert main(["analyze", "dropout", str(heldout), "--out", str(out), "--overwrite"]) == 0
    assert list(json.loads((out / "dropout.json").read_text())) == ["heldout"]

    # A compare folder stands for all its runs: those without a learned p are left out with a warning, not fatal.
    cmp = tmp_path / "cmp"
    for variant, run in (("mlae", runs["mlae"]), ("mlae-auto", heldout)):
        shutil.copytree(run, cmp / "runs" / variant / "cifar" / "s0")
    with pytest.warns(mlae.MLAEWarning, match=r"left out 1 run\(s\) .*: mlae/cifar/s0 \(.*--dropout auto\)"):
        assert main(["analyze", "dropout", str(cmp), "--out", str(tmp_path / "from_cmp")]) == 0
    assert list(json.loads((tmp_path / "from_cmp" / "dropout.json").read_text())) == ["mlae-auto/cifar/s0"]
    shutil.rmtree(cmp / "runs" / "mlae-auto")
    assert main(["analyze", "dropout", str(cmp), "--out", str(tmp_path / "none")]) == 1
    assert "no run of the compare folder can be used: mlae/cifar/s0" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- attention


def _direct_cls_attention(model, x, block: int) -> torch.Tensor:
    """The block's CLS attention read off timm's own (unfused) attention weights."""
    attn = model.blocks[block].attn
    seen = []
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.append(o))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad():
            model(x)
    finally:
        attn.fused_attn = fused
        handle.remove()
    return seen[0].mean(1)[:, 0, 1:].reshape(x.shape[0], 8, 8)


@pytest.mark.parametrize("name", ["mlae", "lora"])
def test_attention_columns_match_the_models_themselves(runs, name):
    from mlae.trained import load_trained

    model, _ = load_trained(runs[name] / "adapter.safetensors")
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 32)
    block = 3
    columns, maps = analyze.attention_maps(model, x, block)
    experts = 8 if name == "mlae" else 4
    assert columns == ["base", "all experts", *(f"expert {i + 1}" for i in range(experts))]
    assert maps.shape == (3, 2 + experts, 8, 8)
    mass = maps.sum((-2, -1))  # CLS attention to the patches: softmax mass less the CLS token's own share
    assert ((mass > 0) & (mass <= 1 + 1e-6)).all()

    # all experts = the fine-tuned model
    torch.testing.assert_close(maps[:, 1], _direct_cls_attention(model, x, block), rtol=1e-4, atol=1e-6)
    # other_blocks="base": the backbone with only this block's adapter
    _, only = analyze.attention_maps(model, x, block, other_blocks="base")
    layers = dict(mlae.adapter_layers(model))
    qkv = layers[f"blocks.{block}.attn.qkv"]
    saved = {n: layer.lora_B.detach().clone() for n, layer in layers.items()}
    with torch.no_grad():
        for n, layer in layers.items():
            if layer is not qkv:
                layer.lora_B.zero_()
        torch.testing.assert_close(only[:, 1], _direct_cls_attention(model, x, block), rtol=1e-4, atol=1e-6)
        for layer in layers.values():
            layer.lora_B.copy_(saved[layer.name])
        # expert i = the fine-tuned model with the other experts of that block switched off
        for i in (0, experts - 1):
            keep = torch.zeros_like(qkv.lora_B)
            keep[:, i] = 1
            qkv.lora_B.copy_(saved[qkv.name] * keep)
            torch.testing.assert_close(maps[:, 2 + i], _direct_cls_attention(model, x, block), rtol=1e-4, atol=1e-6)
        # base = every adapter switched off
        for layer in layers.values():
            layer.lora_B.zero_()
        torch.testing.assert_close(maps[:, 0], _direct_cls_attention(model, x, block), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(only[:, 0], maps[:, 0])


def test_attention_command_writes_the_grid(runs, tmp_path, capsys):
    out = tmp_path / "att"
    assert main(["analyze", "attention", str(runs["mlae"]), "--block", "-1", "--images", "3",
                 "--out", str(out)]) == 0
    _png(out / "attention_block5.png")
    saved = json.loads((out / "attention_block5.json").read_text())
    assert saved["block"] == 5 and len(saved["columns"]) == 10
    assert torch.tensor(saved["maps"]).shape == (3, 10, 8, 8)

    assert main(["analyze", "attention", str(runs["lora"]), "--block", "0", "--images", "2",
                 "--out", str(out)]) == 0
    assert torch.tensor(json.loads((out / "attention_block0.json").read_text())["maps"]).shape == (2, 6, 8, 8)
    # another block's maps go next to them; the same block's again only with --overwrite (-1 is block 5)
    capsys.readouterr()
    assert main(["analyze", "attention", str(runs["lora"]), "--block", "-1", "--out", str(out)]) == 1
    assert "already holds attention_block5.png, attention_block5.json; pass --overwrite" in capsys.readouterr().err
    assert saved == json.loads((out / "attention_block5.json").read_text())
    assert main(["analyze", "attention", str(runs["lora"]), "--block", "-1", "--images", "2", "--out", str(out),
                 "--overwrite"]) == 0
    assert len(json.loads((out / "attention_block5.json").read_text())["columns"]) == 6


def test_attention_plot_panels():
    images = torch.rand(2, 3, 32, 32)
    fig = analyze.plot_attention(images, ["base", "all experts", "expert 1"], torch.rand(2, 3, 8, 8))
    assert len(fig.axes) == 2 * (1 + 3)
    assert [ax.get_title() for ax in fig.axes[:4]] == ["image", "base", "all experts", "expert 1"]
    fig = analyze.plot_attention(images, ["base", "all experts"], torch.rand(2, 2, 8, 8), relative=True)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["image", "base", "all experts − base"]
    assert fig.axes[2].images[1].get_clim() == (-1, 1)


def test_attention_errors(runs, tmp_path, capsys):
    assert main(["analyze", "attention", str(runs["mlae"]), "--block", "6", "--out", str(tmp_path)]) == 1
    assert "out of range" in capsys.readouterr().err
    with pytest.warns(mlae.MLAEWarning, match=r"--images 100000: the test split has \d+ images; showing all"):
        assert main(["analyze", "attention", str(runs["mlae"]), "--block", "0", "--images", "100000",
                     "--out", str(tmp_path / "all")]) == 0
    model = mlae.apply(make_tiny_vit(depth=2), mlae.MLAEConfig(target_modules=[r"blocks\.0\.attn\.qkv"]))
    with pytest.raises(ValueError, match="not adapted"):
        analyze.attention_maps(model, torch.randn(1, 3, 32, 32), 1)


# --------------------------------------------------------------------------------------------- ablation


def test_presets_expand_to_the_papers_variants():
    assert set(ablations.PRESETS) == {"components", "masking", "rank", "coeff-init", "dropout", "input-dropout"}
    comp = ablations.preset("components", p=0.3).variants
    assert [(v.method, v.overrides.get("dropout"), v.overrides.get("adaptive")) for v in comp] == [
        ("mlae", 0.0, False), ("mlae", 0.0, True), ("mlae", 0.3, False), ("mlae", 0.3, True), ("lora", None, None)]

    rank = ablations.preset("rank").variants
    mlae_rows = [v for v in rank if v.method == "mlae"]
    assert [(v.overrides["experts"], v.overrides["expert_rank"]) for v in mlae_rows] == [(8, 1), (4, 2), (2, 4)]
    assert {v.overrides["experts"] * v.overrides["expert_rank"] for v in mlae_rows} == {8}
    assert [v.overrides["rank"] for v in rank if v.method == "lora"] == [8]

    masking = ablations.preset("masking").variants
    assert len(masking) == 15
    by = {(v.overrides["masking"], v.overrides["pattern"]) for v in masking}
    for pattern in ("incremental", "decremental", "hourglass", "protruding"):
        assert {("fixed", pattern), ("stochastic", pattern), ("mixed", pattern)} <= by
    assert ("fixed", "random") in by and ("stochastic", "uniform") in by and ("stochastic", "random") not in by

    assert [v.overrides["dropout"] for v in ablations.preset("dropout").variants] == [0, .1, .3, .5, .7, .9]
    assert [v.overrides["coeff_init"] for v in ablations.preset("coeff-init").variants] == [
        .125, .25, .5, 1, 2, 4]
    inp = ablations.preset("input-dropout", p=0.7).variants
    assert [(v.method, v.overrides.get("dropout", v.overrides.get("lora_dropout"))) for v in inp] == [
        ("mlae", 0.7), ("lora-dropout", 0.7), ("mlae", 0.0), ("lora", None)]
    with pytest.raises(ValueError, match="unknown ablation preset"):
        ablations.preset("nope")


@pytest.mark.parametrize("name", ablations.PRESETS)
def test_every_variant_builds_and_parses_as_a_compare_method(name):
    from mlae.experiments import compare
    from mlae.engine import TrainConfig
    from mlae.recipes import get_method

    pr = ablations.preset(name)
    argv = ablations.compare_argv(pr, ["suite:digits"], [0, 1], "out", ["--epochs", "2"])
    assert argv[0] == "compare" and argv[-2:] == ["--epochs", "2"]
    parsed = compare.parse_methods(argv[argv.index("--methods") + 1])
    assert [(v.label, v.method, v.overrides) for v in parsed] == [(v.label, v.method, v.overrides) for v in pr.variants]
    for v in pr.variants:  # the options are the method's own and build a model
        options = TrainConfig(method=v.method, method_options=v.overrides).options()
        get_method(v.method).prepare(make_tiny_vit(depth=2), options)


def test_ablation_list_and_dry_run(capsys):
    from mlae.cli import build_parser

    assert main(["analyze", "ablation", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ablations.PRESETS) and "mlae[experts=2,expert_rank=4" in listed
    assert main(["analyze", "ablation", "rank", "--datasets", "suite:digits", "--seeds", "0,1", "--out", "o",
                 "--dry-run", *TINY, "--epochs", "3", "--target-modules", "qkv,proj", "--jobs", "2"]) == 0
    command = shlex.split(capsys.readouterr().out.strip())
    assert command[:2] == ["mlae", "compare"]
    args = build_parser().parse_args(command[1:])
    assert (args.datasets, args.seeds, args.compare_out, args.jobs) == ("suite:digits", "0,1", "o", 2)
    assert (args.epochs, args.backbone, args.pretrained, args.img_size) == (3, "test_vit", False, 32)
    assert args.target_modules == ["qkv", "proj"]
    assert args.methods.count("=mlae[") == 3 and "lora r8=lora[rank=8,alpha=8]" in args.methods
    assert main(["analyze", "ablation", "rank", "--out", "o"]) == 1
    assert "--datasets" in capsys.readouterr().err


def test_ablation_runs_end_to_end_through_compare(vtab_root, tmp_path):
    out = tmp_path / "abl"
    assert main(["analyze", "ablation", "rank", "--datasets", "vtab:cifar", "--data-root", str(vtab_root),
                 "--out", str(out), "--jobs", "2", *TINY, *FAST]) == 0
    summary = (out / "summary.md").read_text()
    for v in ablations.preset("rank").variants:
        assert v.label in summary
    # the comparison folder feeds straight into the similarity analysis: one series per variant
    assert len(analyze.expand_runs([out])) == 4
    assert main(["analyze", "similarity", str(out), "--out", str(tmp_path / "sim")]) == 0
    report = json.loads((tmp_path / "sim" / "similarity.json").read_text())
    experts = {r["series"]: r["layers"]["blocks.0.attn.qkv"]["experts"] for r in report.values()}
    assert experts == {"8x_rank_1": 8, "4x_rank_2": 4, "2x_rank_4": 2, "lora_r8": 8}


def test_help_of_every_subcommand(capsys):
    for sub in ("similarity", "attention", "ablation"):
        with pytest.raises(SystemExit) as exit_:
            main(["analyze", sub, "--help"])
        assert exit_.value.code == 0
        assert "example" in capsys.readouterr().out
    assert main(["analyze"]) == 2
