"""The training engine's pieces: schedule, data order, config resolution, checkpoints, failure handling."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mlae import engine, rundir
from mlae.engine import TrainConfig, lr_at
from mlae.errors import TrainingError
from mlae.hardware import DistInfo
from mlae.recipes import METHODS, dataset_key, load_recipe, resolve_recipe
from mlae.utils import get_rng_state, set_rng_state

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# The MLAE paper's Table 10: dataset -> (expert dropout p, coefficient init)
TABLE_10 = {
    "cifar": (.7, 2), "caltech101": (.1, .5), "dtd": (.7, .25), "oxford_flowers102": (.7, 1),
    "oxford_iiit_pet": (.7, 2), "svhn": (.5, 4), "sun397": (.7, 4), "patch_camelyon": (.7, 1), "eurosat": (.5, 4),
    "resisc45": (.5, 2), "diabetic_retinopathy": (.7, .25), "clevr_count": (0, .125), "clevr_dist": (0, .125),
    "dmlab": (.5, 2), "kitti": (.5, 1), "dsprites_loc": (.5, 1), "dsprites_ori": (.7, 4), "smallnorb_azi": (0, 1),
    "smallnorb_ele": (0, .25),
}


def test_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 100, 10, 1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] < 1e-3 and lr_at(100, 100, 10, 1.0) == 0.0


def test_data_order_is_seeded_per_epoch_and_sharded_like_distributed_sampler():
    one = engine._order(10, 0, 1, DistInfo())
    assert torch.equal(one, engine._order(10, 0, 1, DistInfo()))
    assert not torch.equal(one, engine._order(10, 0, 2, DistInfo()))
    shards = [engine._order(10, 0, 1, DistInfo(rank=r, world_size=3)) for r in range(3)]
    assert {len(s) for s in shards} == {4}
    assert set(torch.cat(shards).tolist()) == set(range(10))


def test_config_round_trips_through_its_flat_dict():
    cfg = TrainConfig(method="lora", method_options={"rank": 4}, img_size=64)
    flat = cfg.to_dict()
    assert flat["rank"] == 4 and flat["alpha"] == METHODS["lora"].defaults()["alpha"]
    assert TrainConfig.from_dict(flat).to_dict() == flat
    with pytest.raises(ValueError, match="experts"):
        TrainConfig.from_dict({"method": "lora", "experts": 4}).options()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_resolve(path):
    recipe = load_recipe(path)
    for name in recipe.get("per_dataset", {}) or ["x"]:
        TrainConfig.from_dict(resolve_recipe(recipe, f"vtab:{name}")).options()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_recipe_header_commands_parse(path):
    """The command a recipe's header shows is one that works (up to the data folder)."""
    import shlex

    from mlae.cli import build_parser
    from mlae.commands.train import config_from_args
    from mlae.data import expand_specs

    line = next(l for l in path.read_text().splitlines() if l.lstrip("# ").startswith("mlae train"))
    argv = shlex.split(line.lstrip("# ").replace("<root>", "/data"))[1:]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert expand_specs(cfg.dataset) == [cfg.dataset] and cfg.data_root.startswith("/data/")
    if "mlae" in path.name:  # the MLAE paper's normalisation
        assert cfg.normalize == "inception"


def test_vtab_recipe_holds_table_10():
    recipe = load_recipe(CONFIGS / "vtab_mlae.yaml")
    assert (recipe["lr"], recipe["weight_decay"], recipe["batch_size"], recipe["epochs"]) == (5e-4, 1e-4, 64, 500)
    for name, (p, c) in TABLE_10.items():
        flat = resolve_recipe(recipe, f"vtab:{name}")
        assert (flat["dropout"], flat["coeff_init"]) == (p, c), name
    assert dataset_key("/data/vtab-1k/cifar/") == "cifar" == dataset_key("vtab:cifar")


def test_command_line_overrides_recipe_and_per_dataset(tmp_path):
    from mlae.cli import build_parser
    from mlae.commands.train import config_from_args

    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: mlae\nlr: 0.01\nepochs: 7\ndropout: 0.2\nper_dataset:\n  cifar: {dropout: 0.7}\n")
    parse = build_parser().parse_args
    cfg = config_from_args(parse(["train", "--config", str(recipe), "--dataset", "vtab:cifar", "--epochs", "3"]))
    assert (cfg.lr, cfg.epochs, cfg.options()["dropout"]) == (0.01, 3, 0.7)
    cfg = config_from_args(parse(["train", "--config", str(recipe), "--dataset", "vtab:dtd", "--dropout", "0.1"]))
    assert cfg.options()["dropout"] == 0.1
    # A recipe written for MLAE keeps its general settings under another method.
    cfg = config_from_args(parse(["train", "--config", str(recipe), "--method", "lora", "--rank", "2"]))
    assert (cfg.lr, cfg.options()["rank"]) == (0.01, 2)
    with pytest.raises(ValueError, match="--rank"):
        config_from_args(parse(["train", "--method", "mlae", "--rank", "2"]))
    cfg = config_from_args(parse(["train", "--no-adaptive", "--target-modules", "qkv,proj", "--img-size", "64"]))
    assert cfg.options()["adaptive"] is False and cfg.options()["target_modules"] == ["qkv", "proj"]
    assert cfg.img_size == 64


def test_no_argument_run_is_mlae_on_a_suite_task_with_the_embedded_backbone():
    from mlae.cli import build_parser
    from mlae.commands.train import config_from_args

    cfg = config_from_args(build_parser().parse_args(["train"]))
    assert (cfg.dataset, cfg.method, cfg.backbone, cfg.pretrained) == ("suite:digits", "mlae", None, True)
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.drop_path) == (5e-4, 1e-4, 64, 0.1)


def test_checkpoint_restores_parameters_optimizer_and_rng(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt.safetensors"
    rundir.save_checkpoint(path, model, opt, epoch=3, step=12, metrics=[{"epoch": 1}], rng=[get_rng_state()])
    expected_draw = torch.rand(3)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}

    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    fresh[0].weight.requires_grad_(False)
    fresh[0].weight.data.copy_(state_before["0.weight"])  # frozen weights come from the backbone, not the file
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=0.1)
    state = rundir.load_checkpoint(path, fresh, fresh_opt, rank=0)
    assert state["epoch"] == 3 and state["metrics"] == [{"epoch": 1}]
    assert torch.equal(torch.rand(3), expected_draw)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state_before[k]), k
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_rng_state_round_trip():
    import random

    import numpy as np

    tensors, info = get_rng_state()
    json.dumps(info)
    a = (torch.rand(2), np.random.rand(2), random.random())
    set_rng_state(tensors, info)
    b = (torch.rand(2), np.random.rand(2), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def _tiny_config(tmp_path, **kw) -> TrainConfig:
    kw = {"epochs": 2, **kw}
    return TrainConfig(dataset="suite:digits", backbone="test_vit", pretrained=False, img_size=32, patch_size=4,
                       batch_size=64, out=str(tmp_path / "run"), progress=False, **kw)


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_files(tmp_path, monkeypatch):
    pytest.importorskip("mlae.backbones")
    real = engine.F.cross_entropy
    calls = []

    def flaky(logits, y):
        calls.append(1)
        loss = real(logits, y)
        return loss * math.nan if len(calls) == 3 else loss

    monkeypatch.setattr(engine.F, "cross_entropy", flaky)
    with pytest.raises(TrainingError, match=r"epoch 1, step 3/"):
        engine.train(_tiny_config(tmp_path, method="linear"))
    assert (tmp_path / "run" / "config.yaml").exists()
    assert not (tmp_path / "run" / "results.json").exists()


def test_on_epoch_end_can_stop_the_run(tmp_path):
    pytest.importorskip("mlae.backbones")

    class Stop(Exception):
        pass

    seen = []

    def callback(epoch, metrics):
        seen.append((epoch, metrics["test_top1"]))
        raise Stop

    with pytest.raises(Stop):
        engine.train(_tiny_config(tmp_path, method="linear"), on_epoch_end=callback)
    assert len(seen) == 1 and 0 <= seen[0][1] <= 1
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_default_evaluates_about_four_times_and_always_the_last_epoch(tmp_path):
    assert [TrainConfig(epochs=e).eval_interval for e in (1, 4, 8, 100)] == [1, 1, 2, 25]
    assert TrainConfig(epochs=8, eval_every=3).eval_interval == 3
    with pytest.raises(ValueError, match="eval_every"):
        TrainConfig(eval_every=-1)
    engine.train(_tiny_config(tmp_path, method="linear", epochs=6))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines if m["test_top1"] is not None] == [2, 4, 6]


# --------------------------------------------------------------------------------------------- input statistics


def test_each_normalize_choice_gives_the_expected_tensor(tiny_vit):
    from mlae.backbones import build_embedded
    from mlae.data import IMAGENET_MEAN, IMAGENET_STD

    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)

    def expected(mean, std):
        return (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    own = ((0.1, 0.2, 0.3), (0.2, 0.3, 0.4))
    timm_model = tiny_vit()
    timm_model.pretrained_cfg = {**timm_model.pretrained_cfg, "mean": own[0], "std": own[1]}
    imagenet, inception = (IMAGENET_MEAN, IMAGENET_STD), ((0.5,) * 3, (0.5,) * 3)
    cases = [  # (backbone name, model, --normalize, statistics the inputs must have)
        (None, build_embedded(num_classes=2), "auto", inception),  # the embedded card says [-1, 1]
        (None, build_embedded(num_classes=2), "imagenet", imagenet),
        ("vit_x", timm_model, "auto", imagenet),                     # what timm names got before the option
        ("vit_x", timm_model, "backbone", own),
        ("vit_x", timm_model, "inception", inception),
        ("vit_x", timm_model, "imagenet", imagenet),
    ]
    for name, model, choice, (mean, std) in cases:
        inputs = engine.Inputs("none", 32, torch.device("cpu"), *engine.backbone_stats(name, model, choice))
        torch.testing.assert_close(inputs(images, train=False), expected(mean, std), atol=2e-6, rtol=0,
                                   msg=f"{name} / {choice}")
    timm_model.pretrained_cfg = {}
    with pytest.raises(ValueError, match="--normalize inception"):
        engine.backbone_stats("vit_x", timm_model, "backbone")
    with pytest.raises(ValueError, match="normalize must be one of"):
        TrainConfig(normalize="minmax")


def test_head_init_zero_zeroes_the_new_head(tiny_vit):
    model = tiny_vit()
    engine.init_head(model, "timm")
    assert model.head.weight.abs().sum() > 0  # timm's trunc-normal draw, untouched
    engine.init_head(model, "zero")
    assert not model.head.weight.any() and not model.head.bias.any()
    assert model.blocks[0].attn.qkv.weight.any()  # only the head
    with pytest.raises(ValueError, match="head_init"):
        TrainConfig(head_init="xavier")


def test_normalize_and_head_init_are_recorded_and_eval_uses_the_same_inputs(tmp_path):
    import yaml

    import mlae
    from mlae.evaluation import evaluate_file

    results = engine.train(_tiny_config(tmp_path, method="lora", normalize="inception", head_init="zero"))
    run = tmp_path / "run"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert (config["normalize"], config["head_init"]) == ("inception", "zero")
    meta = mlae.read_adapter_metadata(run / "adapter.safetensors")
    assert (meta["normalize"], meta["input_mean"], meta["input_std"]) == ("inception", [0.5] * 3, [0.5] * 3)
    assert results["normalize"] == "inception"
    assert evaluate_file(str(run / "adapter.safetensors"))["top1"] == results["top1"]
