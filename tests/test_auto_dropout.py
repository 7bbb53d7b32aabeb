"""MLAE with a learned masking probability (``dropout="auto"``): the masks, the gradients and bounds of p, where p
goes on toy problems built to overfit and to underfit, the hooks, the files and the engine's bookkeeping."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlae
from mlae.adapters.mlae import GAIN, LEARNERS, P_MAX, LearnedDropout, MLAELinear
from conftest import make_tiny_vit


def _layer(learner="concrete", p=0.1, experts=8, granularity="batch", per_expert=False, d=6, out=5, seed=0):
    torch.manual_seed(seed)
    learned = LearnedDropout(experts, learner, p, per_expert)
    layer = MLAELinear(nn.Linear(d, out), experts, 1, "auto", 1.0, True, 1.0, granularity, learned)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


# --- the mask ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_concrete_mask_is_binary_inverted_bernoulli(granularity):
    layer = _layer("concrete", p=0.3, granularity=granularity)
    masks = torch.stack([layer.learned.sample((50, 8), "cpu") for _ in range(40)]).detach()
    p = layer.learned.p[0].item()
    assert p == pytest.approx(0.3, abs=1e-6)
    # Exactly the two values of MLAE's inverted dropout: 0 (dropped) and 1/(1 − p) (kept), nothing in between.
    kept = 1.0 / (1.0 - layer.learned.p[0].detach())
    assert torch.all((masks == 0) | (masks == kept))
    dropped = (masks == 0).float().mean().item()
    assert abs(dropped - p) < 4 * math.sqrt(p * (1 - p) / masks.numel())  # Bernoulli(p): within 4 SE


def test_concrete_forward_equals_official_masking_with_the_same_mask():
    """In the forward, a learned-p layer is MLAE's fixed-p layer whose mask happens to be the one drawn."""
    layer, x = _layer("concrete", p=0.4).train(), torch.randn(3, 6)
    torch.manual_seed(5)
    y = layer.delta(x)
    torch.manual_seed(5)
    m = layer.learned.sample((8,), "cpu").detach()
    a, b = layer.lora_A, layer.lora_B * (layer.coeff * m)
    torch.testing.assert_close(y, x @ (b @ a).T)


def test_variational_noise_has_the_moments_of_the_inverted_bernoulli_mask():
    """The documented deviation: Gaussian, not binary, with the mean 1 and variance p/(1 − p) of MLAE's mask."""
    layer = _layer("variational", p=0.5)
    m = layer.learned.sample((20000, 8), "cpu").detach()
    assert m.unique().numel() > 1000  # not binary
    assert m.mean().item() == pytest.approx(1.0, abs=0.02)
    assert m.var().item() == pytest.approx(0.5 / 0.5, rel=0.03)


@pytest.mark.parametrize("learner", LEARNERS)
def test_eval_uses_all_experts_unscaled(learner):
    layer, x = _layer(learner, p=0.6).eval(), torch.randn(2, 6)
    a, b = layer.factors()
    torch.testing.assert_close(layer.delta(x), x @ (b @ a).T)
    layer.train()
    assert not torch.allclose(layer.delta(x), x @ (b @ a).T)


# --- gradients and bounds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("learner", LEARNERS)
def test_p_gets_gradient_from_the_task_loss(learner):
    layer, x = _layer(learner).train(), torch.randn(4, 6)
    grads = []
    for _ in range(5):
        layer.zero_grad()
        layer.delta(x).square().mean().backward()
        grads.append(layer.learned.theta.grad.clone())
    assert any(g.abs().item() > 0 for g in grads) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("learner, p, up", [("concrete", 0.1, True), ("concrete", 0.8, False),
                                            ("variational", 0.1, True), ("variational", 0.8, True)])
def test_kl_pulls_p_the_way_its_prior_says(learner, p, up):
    """Concrete: −H(p) is lowest at p = 1/2, so the prior pulls p towards 1/2 from both sides. Variational: the
    log-uniform prior's KL falls as α grows, so it always pulls p up (the task loss is what holds it back)."""
    learned = LearnedDropout(8, learner, p, False)
    learned.kl().backward()
    assert (learned.theta.grad.item() < 0) == up  # gradient descent moves θ (and p) against the gradient


@pytest.mark.parametrize("learner", LEARNERS)
@pytest.mark.parametrize("theta", [-1e4, -30.0, 0.0, 30.0, 1e4])
def test_p_stays_in_bounds_and_everything_stays_finite(learner, theta):
    layer, x = _layer(learner).train(), torch.randn(4, 6)
    with torch.no_grad():
        layer.learned.theta.fill_(theta)
    p = layer.learned.p
    assert torch.all(p >= 0) and torch.all(p <= P_MAX)
    layer.set_train_size(10)
    loss = layer.delta(x).square().mean() + MLAELinear.collect_aux_losses([layer])["dropout_kl"]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(layer.learned.theta.grad).all()


def test_gain_sets_the_logit_step():
    learned = LearnedDropout(4, "concrete", 0.1, False)
    logit = lambda: math.log(learned.p[0].item() / P_MAX / (1 - learned.p[0].item() / P_MAX))  # noqa: E731
    before = logit()
    with torch.no_grad():
        learned.theta += 0.01
    assert logit() - before == pytest.approx(GAIN * 0.01, rel=1e-3)


# --- toy problems: p moves the way the data says ----------------------------------------------------------


def _fit(learner: str, regime: str, steps: int = 250, seed: int = 0) -> float:
    """Mean learned p after Adam on one MLAE layer (16 → 8 classes) with cross-entropy + KL / N.

    overfit: 8 examples with random labels and 8 experts (any p fits them; only the prior has a say).
    underfit: fresh examples every step (N = 10⁶) labelled by a full-rank linear teacher and only 2 experts
    (every expert is needed all the time)."""
    torch.manual_seed(seed)
    d, c = 16, 8
    experts, n = (8, 8) if regime == "overfit" else (2, 10 ** 6)
    x0, y0, teacher = torch.randn(n if regime == "overfit" else 1, d), torch.randint(0, c, (8,)), torch.randn(c, d)
    layer = MLAELinear(nn.Linear(d, c), experts, 1, "auto", 1.0, True, 1.0, "batch",
                       LearnedDropout(experts, learner, 0.1, False))
    layer.base.requires_grad_(False)
    layer.set_train_size(n)
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(steps):
        x = x0 if regime == "overfit" else torch.randn(64, d)
        y = y0 if regime == "overfit" else (x @ teacher.T).argmax(-1)
        loss = F.cross_entropy(layer(x), y) + MLAELinear.collect_aux_losses([layer])["dropout_kl"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return layer.learned.p.mean().item()


@pytest.mark.parametrize("learner", LEARNERS)
def test_p_rises_where_the_adapter_can_memorise_few_examples(learner):
    assert _fit(learner, "overfit") > 0.3  # from 0.1


@pytest.mark.parametrize("learner", LEARNERS)
def test_p_falls_to_near_zero_where_the_adapter_underfits(learner):
    assert _fit(learner, "underfit") < 0.02  # from 0.1


# --- hooks, config, files -----------------------------------------------------------------------------------


def test_kl_needs_the_training_set_size_and_is_per_example():
    model = mlae.apply(make_tiny_vit(depth=2), mlae.MLAEConfig(experts=4, dropout="auto", dropout_learner="concrete"))
    with pytest.raises(ValueError, match="set_train_size"):
        mlae.aux_losses(model)
    with pytest.raises(ValueError, match="positive integer"):
        mlae.set_train_size(model, 0)
    mlae.set_train_size(model, 100)
    kl100 = mlae.aux_losses(model)["dropout_kl"]
    mlae.set_train_size(model, 400)
    kl400 = mlae.aux_losses(model)["dropout_kl"]
    # Two layers of 4 experts at p = 0.1: Σ −H(p) / N.
    entropy = -(0.1 * math.log(0.1) + 0.9 * math.log(0.9))
    assert kl100.item() == pytest.approx(-2 * 4 * entropy / 100, rel=1e-5)
    assert kl400.item() == pytest.approx(kl100.item() / 4, rel=1e-5)


def test_per_expert_learns_one_p_per_expert():
    model = mlae.apply(make_tiny_vit(depth=2), mlae.MLAEConfig(experts=3, dropout="auto", dropout_per_expert=True,
                                                               dropout_init=0.2))
    values = mlae.learned_values(model)
    assert list(values) == ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    assert values["blocks.0.attn.qkv"]["dropout"] == pytest.approx([0.2] * 3)
    shared = mlae.learned_values(mlae.apply(make_tiny_vit(depth=2), mlae.MLAEConfig(experts=3, dropout="auto")))
    assert shared["blocks.1.attn.qkv"] == {"dropout": pytest.approx(0.1)}
    assert mlae.learned_values(mlae.apply(make_tiny_vit(depth=2), mlae.MLAEConfig(dropout=0.5))) == {}


def test_mixed_masking_learns_p_over_its_fixed_counts():
    model = mlae.apply(make_tiny_vit(depth=3), mlae.MLAEConfig(masking="mixed", pattern=[1, 2, 3], dropout="auto"))
    layers = [layer for _, layer in mlae.adapter_layers(model)]
    assert [layer.experts for layer in layers] == [1, 2, 3] and all(layer.learned is not None for layer in layers)


@pytest.mark.parametrize("kwargs, match", [
    ({"dropout": "sometimes"}, "'auto'"), ({"dropout": "auto", "dropout_learner": "magic"}, "dropout_learner"),
    ({"dropout": "auto", "dropout_init": 0.0}, "dropout_init"), ({"dropout": "auto", "dropout_init": 0.95}, "0.9"),
    ({"dropout": "auto", "masking": "fixed"}, "fixed"), ({"dropout": "auto", "pattern": "hourglass"}, "uniform"),
    ({"dropout": 0.5, "dropout_per_expert": True}, "dropout='auto' only"),
    ({"dropout": 0.5, "dropout_learner": "concrete"}, "dropout='auto' only"),
])
def test_bad_auto_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlae.MLAEConfig(**kwargs)


def test_adapter_file_keeps_p_in_its_header_not_its_tensors(tmp_path):
    from safetensors import safe_open

    def trained(dropout):
        model = mlae.apply(make_tiny_vit(depth=2), mlae.MLAEConfig(experts=4, dropout=dropout))
        with torch.no_grad():
            for _, layer in mlae.adapter_layers(model):
                layer.lora_B.normal_()
                if layer.learned is not None:
                    layer.learned.theta.fill_(LearnedDropout.theta_for(0.37))
        return model.eval()

    auto, fixed = trained("auto"), trained(0.5)
    path = mlae.save_adapter(auto, tmp_path / "auto.safetensors")
    fixed_path = mlae.save_adapter(fixed, tmp_path / "fixed.safetensors")
    keys = [set(safe_open(str(p), "pt").keys()) for p in (path, fixed_path)]
    assert keys[0] == keys[1] and not any("learned" in k for k in keys[0])  # the same tensors as fixed-p MLAE
    assert mlae.read_adapter_learned(path) == {f"blocks.{i}.attn.qkv": {"dropout": pytest.approx(0.37)}
                                               for i in (0, 1)}
    assert mlae.read_adapter_learned(fixed_path) == {}
    fresh = mlae.load_adapter(make_tiny_vit(depth=2), path)
    assert mlae.learned_values(fresh) == mlae.learned_values(auto)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), auto(x))
    # MoLE reads it as an expert like any MLAE file.
    from mlae.adapters.mole import read_expert

    expert = read_expert(path, make_tiny_vit(depth=2))
    for name, layer in mlae.adapter_layers(auto):
        torch.testing.assert_close(expert[name][1] @ expert[name][0], layer.delta_weight())


def test_cli_option_accepts_auto():
    from mlae.recipes import get_method

    dropout = {o.name: o for o in get_method("mlae").options}["dropout"]
    assert dropout.type("auto") == dropout.type("AUTO") == "auto" and dropout.type("0.3") == 0.3
    with pytest.raises(ValueError):
        dropout.type("often")


# --- the engine --------------------------------------------------------------------------------------------


def _config(tmp_path, name, **kw):
    from mlae.engine import TrainConfig

    return TrainConfig(dataset="vtab:cifar", data_root=str(tmp_path / "vtab"), backbone="test_vit", pretrained=False,
                       img_size=32, patch_size=4, epochs=3, warmup_epochs=0, batch_size=16, threads=1,
                       out=str(tmp_path / name), progress=False, method="mlae",
                       method_options={"dropout": "auto", "experts": 4}, **kw)


def test_engine_records_p_per_epoch_and_resumes_bit_identically(tmp_path):
    pytest.importorskip("mlae.backbones")
    from mlae import engine
    from mlae.data import testing

    testing.make_vtab_folder(tmp_path / "vtab", name="cifar", n_train=48, n_test=16, size=32)

    threads = torch.get_num_threads()

    class Stop(Exception):
        pass

    def stop_after_two(epoch, metrics):
        if epoch == 2:
            raise Stop

    try:
        straight = engine.train(_config(tmp_path, "straight"))
        with pytest.raises(Stop):
            engine.train(_config(tmp_path, "killed"), on_epoch_end=stop_after_two)
        assert (tmp_path / "killed" / "checkpoint.safetensors").exists()
        resumed = engine.train(_config(tmp_path, "killed", resume=True))
    finally:
        torch.set_num_threads(threads)
    lines = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("straight", "killed")}
    timing = ("images_per_s", "train_time_s", "epoch_time_s")
    strip = lambda ms: [{k: v for k, v in m.items() if k not in timing} for m in ms]  # noqa: E731
    assert strip(lines["killed"]) == strip(lines["straight"]) and len(lines["straight"]) == 3
    assert resumed["learned"] == straight["learned"] == lines["straight"][-1]["learned"]
    # p moved, per layer, and is what the adapter file's header says.
    per_epoch = [m["learned"]["blocks.0.attn.qkv"]["dropout"] for m in lines["straight"]]
    assert len(set(per_epoch)) == 3 and all(0 < p <= P_MAX for p in per_epoch)
    assert set(straight["learned"]) == {f"blocks.{i}.attn.qkv" for i in range(6)}
    assert mlae.read_adapter_learned(tmp_path / "straight" / "adapter.safetensors") == straight["learned"]
    assert all(m["aux_loss"] > 0 for m in lines["straight"])  # the (default) variational KL / N was added
