"""MLAE with a learned masking probability (``dropout="auto"``): the masks, the gradients and bounds of p, where p
goes on toy problems built to overfit and to underfit, the hooks, the files and the engine's bookkeeping."""
from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlae
from mlae.adapters.mlae import GAIN, GRADIENT_LEARNERS, LEARNERS, P_MAX, LearnedDropout, MLAELinear, MLAETraining
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


@pytest.mark.parametrize("learner", GRADIENT_LEARNERS)
def test_eval_uses_all_experts_unscaled(learner):
    layer, x = _layer(learner, p=0.6).eval(), torch.randn(2, 6)
    a, b = layer.factors()
    torch.testing.assert_close(layer.delta(x), x @ (b @ a).T)
    layer.train()
    assert not torch.allclose(layer.delta(x), x @ (b @ a).T)


# --- gradients and bounds ----------------------------------------------------------------------------------


@pytest.mark.parametrize("learner", GRADIENT_LEARNERS)
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


@pytest.mark.parametrize("learner", GRADIENT_LEARNERS)
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


@pytest.mark.parametrize("learner", GRADIENT_LEARNERS)
def test_p_rises_where_the_adapter_can_memorise_few_examples(learner):
    assert _fit(learner, "overfit") > 0.3  # from 0.1


@pytest.mark.parametrize("learner", GRADIENT_LEARNERS)
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
                                                               dropout_learner="variational", dropout_init=0.2))
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
])
def test_bad_auto_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlae.MLAEConfig(**kwargs)


def test_learner_settings_with_a_fixed_p_are_reset_in_the_config_and_refused_on_the_command_line(tmp_path):
    """Files written before the default learner changed store dropout_learner "variational" (or "concrete") and
    no dropout_holdout for every fixed-p run: they must load, resume and match as the same run. A user who types
    such a setting next to a fixed p is told it does nothing."""
    import yaml

    from mlae.experiments.compare import _changed
    from mlae.recipes import canonical_config, config_from_options

    legacy = {"dropout": 0.5, "dropout_learner": "variational", "dropout_per_expert": False, "dropout_init": 0.1}
    assert mlae.MLAEConfig(**legacy) == mlae.MLAEConfig(dropout=0.5)
    assert mlae.MLAEConfig(dropout=0.5, dropout_learner="heldout", dropout_per_expert=True).dropout_learner == "concrete"
    for given in ({"dropout_learner": "heldout"}, {"dropout_per_expert": True}, {"dropout_holdout": 0.3}):
        with pytest.raises(ValueError, match="apply to --dropout auto only"):
            config_from_options({"method": "mlae", "dropout": 0.5, **given})
    now = config_from_options({"method": "mlae", "dropout": 0.5, "dataset": "suite:digits"}).to_dict()
    stored = {k: v for k, v in now.items() if k != "dropout_holdout"} | {"dropout_learner": "variational"}
    assert canonical_config(stored) == canonical_config(now)
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(stored))
    assert _changed(tmp_path / "compare.yaml", now) == []
    # ... while with dropout="auto" the learner is part of the run's identity.
    auto = config_from_options({"method": "mlae", "dropout": "auto", "dataset": "suite:digits"}).to_dict()
    assert canonical_config({**auto, "dropout_learner": "variational"}) != canonical_config(auto)


def test_adapter_file_keeps_p_in_its_header_not_its_tensors(tmp_path):
    from safetensors import safe_open

    def trained(dropout):
        learner = {"dropout_learner": "variational"} if dropout == "auto" else {}  # θ: a tensor to leave out
        model = mlae.apply(make_tiny_vit(depth=2), mlae.MLAEConfig(experts=4, dropout=dropout, **learner))
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


def _config(tmp_path, name, learner="variational", **kw):
    from mlae.engine import TrainConfig

    return TrainConfig(dataset="vtab:cifar", data_root=str(tmp_path / "vtab"), backbone="test_vit", pretrained=False,
                       img_size=32, patch_size=4, epochs=3, warmup_epochs=0, batch_size=16, threads=1,
                       out=str(tmp_path / name), progress=False, method="mlae",
                       method_options={"dropout": "auto", "dropout_learner": learner, "experts": 4}, **kw)


def _straight_killed_resumed(engine, make_config, tmp_path):
    """Train ``make_config(tmp_path, name)`` straight, then killed after epoch 2 and resumed; returns the results
    of the straight and the resumed run and the metrics.jsonl lines of both, timings stripped."""
    threads = torch.get_num_threads()

    class Stop(Exception):
        pass

    def stop_after_two(epoch, metrics):
        if epoch == 2:
            raise Stop

    try:
        straight = engine.train(make_config(tmp_path, "straight"))
        with pytest.raises(Stop):
            engine.train(make_config(tmp_path, "killed"), on_epoch_end=stop_after_two)
        assert (tmp_path / "killed" / "checkpoint.safetensors").exists()
        resumed = engine.train(make_config(tmp_path, "killed", resume=True))
    finally:
        torch.set_num_threads(threads)
    timing = ("images_per_s", "train_time_s", "epoch_time_s")
    lines = {name: [{k: v for k, v in json.loads(line).items() if k not in timing}
                    for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("straight", "killed")}
    return straight, resumed, lines


@pytest.mark.parametrize("learner", GRADIENT_LEARNERS)
def test_engine_records_p_per_epoch_and_resumes_bit_identically(tmp_path, learner):
    pytest.importorskip("mlae.backbones")
    from mlae import engine
    from mlae.data import testing

    testing.make_vtab_folder(tmp_path / "vtab", name="cifar", n_train=48, n_test=16, size=32)
    straight, resumed, lines = _straight_killed_resumed(engine, functools.partial(_config, learner=learner), tmp_path)
    assert lines["killed"] == lines["straight"] and len(lines["straight"]) == 3
    assert resumed["learned"] == straight["learned"] == lines["straight"][-1]["learned"]
    # p moved, per layer, and is what the adapter file's header says.
    per_epoch = [m["learned"]["blocks.0.attn.qkv"]["dropout"] for m in lines["straight"]]
    assert len(set(per_epoch)) == 3 and all(0 < p <= P_MAX for p in per_epoch)
    assert set(straight["learned"]) == {f"blocks.{i}.attn.qkv" for i in range(6)}
    assert mlae.read_adapter_learned(tmp_path / "straight" / "adapter.safetensors") == straight["learned"]
    # The KL / N was added: positive for the variational prior, −H(p) / N < 0 for the concrete one.
    assert all((m["aux_loss"] > 0) == (learner == "variational") and m["aux_loss"] != 0 for m in lines["straight"])


# --- the heldout learner: a controller on the training/held-out gap --------------------------------------------

from mlae.adapters.mlae import BETA, ControlledDropout, DropoutController  # noqa: E402


def _controlled(p=0.3, experts=8, granularity="batch", seed=0):
    torch.manual_seed(seed)
    layer = MLAELinear(nn.Linear(6, 5), experts, 1, "auto", 1.0, True, 1.0, granularity, ControlledDropout(experts, p))
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_heldout_masks_are_binary_and_those_of_a_fixed_p(granularity):
    layer = _controlled(0.3, granularity=granularity)
    masks = torch.stack([layer.learned.sample((50, 8), "cpu") for _ in range(40)])
    assert torch.all((masks == 0) | (masks == 1 / 0.7)) and not masks.requires_grad
    dropped = (masks == 0).float().mean().item()
    assert abs(dropped - 0.3) < 4 * math.sqrt(0.3 * 0.7 / masks.numel())
    # The forward is fixed-p MLAE's, draw for draw, and evaluation uses all experts unscaled.
    fixed = MLAELinear(nn.Linear(6, 5), 8, 1, 0.3, 1.0, True, 1.0, granularity)
    fixed.load_state_dict(layer.state_dict())
    x = torch.randn(3, 6)
    for a, b in ((layer.train(), fixed.train()), (layer.eval(), fixed.eval())):
        torch.manual_seed(7)
        ya = a(x)
        torch.manual_seed(7)
        torch.testing.assert_close(ya, b(x), rtol=0, atol=0)
    assert not list(layer.learned.parameters())  # no θ: nothing for the optimizer, no gradient


def test_controller_rule_and_bounds():
    model = mlae.apply(make_tiny_vit(depth=2), mlae.MLAEConfig(experts=4, dropout="auto", dropout_learner="heldout",
                                                               dropout_init=0.2))
    controller = DropoutController(model)
    assert controller.p == 0.2 and controller.beta == BETA == 0.5
    assert controller.update(1.0, 2.0) == pytest.approx(0.5)  # p* = 1 − L_t / L_h
    assert controller.p == pytest.approx(0.2 + 0.5 * (0.5 - 0.2))
    assert mlae.learned_values(model) == {f"blocks.{i}.attn.qkv": {"dropout": pytest.approx(0.35)} for i in (0, 1)}
    for train_loss, held_out_loss, target in [(2.0, 1.0, 0.0), (0.0, 5.0, P_MAX), (1e-9, 1e9, P_MAX), (0.5, 0.0, 0.0),
                                              (1.0, math.inf, P_MAX), (math.nan, 1.0, 0.0), (1.0, math.nan, 0.0)]:
        assert DropoutController.target(train_loss, held_out_loss) == target
    for losses in [(0.0, 1.0)] * 50 + [(3.0, 1.0)] * 80:
        controller.update(*losses)
        assert 0.0 <= controller.p <= P_MAX
    assert controller.p < 1e-20  # generalising (L_t ≥ L_h) takes p to 0
    with pytest.raises(ValueError, match="heldout"):
        DropoutController(mlae.apply(make_tiny_vit(depth=2), mlae.MLAEConfig(dropout="auto", dropout_learner="concrete")))


def test_heldout_needs_no_train_size_and_adds_no_aux_loss(tmp_path):
    model = mlae.apply(make_tiny_vit(depth=2), mlae.MLAEConfig(experts=4, dropout="auto", dropout_learner="heldout"))
    assert mlae.aux_losses(model) == {}
    mlae.set_train_size(model, 10)  # still accepted
    assert mlae.count_parameters(model)["adapter"] == mlae.count_parameters(
        mlae.apply(make_tiny_vit(depth=2), mlae.MLAEConfig(experts=4, dropout=0.5)))["adapter"]
    DropoutController(model).set(0.42)
    path = mlae.save_adapter(model, tmp_path / "a.safetensors")
    assert mlae.read_adapter_learned(path)["blocks.1.attn.qkv"] == {"dropout": 0.42}
    assert mlae.learned_values(mlae.load_adapter(make_tiny_vit(depth=2), path)) == mlae.learned_values(model)


@pytest.mark.parametrize("kwargs, match", [
    ({"dropout_holdout": 0.0}, r"dropout_holdout \(--dropout-holdout\) must be in \(0, 0.5\]"),
    ({"dropout_holdout": 0.6}, r"dropout_holdout \(--dropout-holdout\) must be in \(0, 0.5\]"),
    ({"dropout_per_expert": True}, "one p for all layers"),
])
def test_bad_heldout_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlae.MLAEConfig(dropout="auto", dropout_learner="heldout", **kwargs)


def test_concrete_is_the_default_learner():
    """The paper-regime study measured the concrete learner best (docs/REPRODUCTION.md), so `--dropout auto` alone
    means it: a p per layer, trained with the network, nothing held out, per-expert p allowed."""
    from mlae.recipes import get_method

    assert LEARNERS[0] == mlae.MLAEConfig().dropout_learner == "concrete"
    assert get_method("mlae").defaults()["dropout_learner"] == "concrete"
    model = mlae.apply(make_tiny_vit(depth=2), mlae.MLAEConfig(experts=3, dropout="auto", dropout_per_expert=True))
    learned = [m for m in model.modules() if isinstance(m, LearnedDropout)]
    assert [(m.learner, len(m.values())) for m in learned] == [("concrete", 3)] * 2
    assert MLAETraining(model, {"dropout": "auto"}).held_out_fraction() == 0.0


def test_holdout_without_the_heldout_learner_is_refused():
    with pytest.raises(ValueError, match="--dropout-learner heldout"):
        mlae.MLAEConfig(dropout="auto", dropout_learner="variational", dropout_holdout=0.3)
    assert mlae.MLAEConfig(dropout=0.5, dropout_holdout=0.3).dropout_holdout == 0.2  # no meaning for a fixed p
    assert mlae.MLAEConfig(dropout="auto", dropout_learner="heldout", dropout_holdout=0.5).dropout_holdout == 0.5


def _control(regime: str, steps: int = 400, every: int = 10, seed: int = 0) -> list[float]:
    """p of the heldout controller over training one MLAE layer (16 → 8 classes) with Adam on cross-entropy.

    memorise: 8 examples with random labels (and 8 others held out, random labels too): the adapter fits them, the
    held-out loss grows. underfit: 2 experts, fresh examples every step labelled by a full-rank linear teacher; the
    held-out examples come from the same teacher."""
    torch.manual_seed(seed)
    d, c = 16, 8
    experts = 8 if regime == "memorise" else 2
    teacher = torch.randn(c, d)
    x_fit, x_held = torch.randn(8, d), torch.randn(64, d)
    y_fit = torch.randint(0, c, (8,))
    y_held = torch.randint(0, c, (64,)) if regime == "memorise" else (x_held @ teacher.T).argmax(-1)
    layer = MLAELinear(nn.Linear(d, c), experts, 1, "auto", 1.0, True, 1.0, "batch", ControlledDropout(experts, 0.1))
    layer.base.requires_grad_(False)
    controller, history = DropoutController(layer), []
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=3e-2)
    for step in range(steps):
        x = x_fit if regime == "memorise" else torch.randn(64, d)
        y = y_fit if regime == "memorise" else (x @ teacher.T).argmax(-1)
        layer.train()
        loss = F.cross_entropy(layer(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % every == 0:
            layer.eval()
            with torch.no_grad():
                x_t = x_fit if regime == "memorise" else torch.randn(64, d)
                y_t = y_fit if regime == "memorise" else (x_t @ teacher.T).argmax(-1)
                controller.update(F.cross_entropy(layer(x_t), y_t).item(), F.cross_entropy(layer(x_held), y_held).item())
            history.append(controller.p)
    return history


def test_heldout_p_rises_where_the_adapter_memorises():
    history = _control("memorise")
    assert history[-1] > 0.6 and max(history) <= P_MAX  # from 0.1


def test_heldout_p_stays_near_zero_where_the_adapter_underfits():
    history = _control("underfit")
    assert max(history[5:]) < 0.1 and history[-1] < 0.05  # from 0.1


def test_hold_out_is_stratified_seeded_and_disjoint():
    from mlae.data import Split
    from mlae.engine import hold_out

    labels = torch.arange(4).repeat_interleave(torch.tensor([10, 5, 2, 23]))
    images = torch.arange(len(labels), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    train, held, probe = hold_out(Split(images, labels), 0.2, seed=3)
    ids = lambda s: s.images[:, 0, 0, 0].tolist()  # noqa: E731
    assert not set(ids(train)) & set(ids(held)) and sorted(ids(train) + ids(held)) == list(range(len(labels)))
    assert torch.bincount(held.labels).tolist() == [2, 1, 1, 5]  # round(0.2 · count), at least one per class
    assert len(probe) == len(held) and set(ids(probe)) <= set(ids(train))
    again = hold_out(Split(images, labels), 0.2, seed=3)
    assert all(ids(a) == ids(b) for a, b in zip((train, held, probe), again))
    assert ids(hold_out(Split(images, labels), 0.2, seed=4)[1]) != ids(held)
    with pytest.raises(ValueError, match="too small to hold out one image per class.*--dropout-learner"):
        hold_out(Split(images[:11], labels[:11]), 0.2, seed=0)  # class 1 has one image


def _heldout_config(tmp_path, name, **kw):
    cfg = _config(tmp_path, name, **kw)
    cfg.method_options.update(dropout_learner="heldout", dropout_init=0.3)
    return cfg


def test_engine_holds_out_training_images_only_and_resumes_bit_identically(tmp_path, monkeypatch):
    pytest.importorskip("mlae.backbones")
    from mlae import engine
    from mlae.data import testing

    testing.make_vtab_folder(tmp_path / "vtab", name="cifar", n_train=48, n_test=16, size=32)
    seen: dict[str, list] = {"trained": [], "held": [], "evaluated": []}
    real_hold_out, real_evaluate, real_call = engine.hold_out, engine.evaluate, engine.Inputs.__call__

    def recording_hold_out(train, fraction, seed):
        out = real_hold_out(train, fraction, seed)
        seen["held"].append((len(train), out[1].images.clone()))
        return out

    def recording_evaluate(model, split, *args, **kwargs):
        seen["evaluated"].append(len(split))
        return real_evaluate(model, split, *args, **kwargs)

    def recording_call(self, images, *, train, generator=None):
        if train:
            seen["trained"].append(images.clone())
        return real_call(self, images, train=train, generator=generator)

    monkeypatch.setattr(engine, "hold_out", recording_hold_out)
    monkeypatch.setattr(engine, "evaluate", recording_evaluate)
    monkeypatch.setattr(engine.Inputs, "__call__", recording_call)
    straight, resumed, lines = _straight_killed_resumed(engine, _heldout_config, tmp_path)
    # 48 + 12 (val200) training images: 12 held out (3 per class), 48 trained on; the 16 test images evaluated.
    assert (straight["train_images"], straight["held_out_images"]) == (48, 12)
    assert {n for n, _ in seen["held"]} == {60} and set(seen["evaluated"]) <= {48, 16} and 16 in seen["evaluated"]
    held = {bytes(img.numpy()) for img in seen["held"][0][1]}
    trained = {bytes(img.numpy()) for batch in seen["trained"] for img in batch}
    assert len(held) == 12 and len(trained) == 48 and not held & trained
    assert lines["killed"] == lines["straight"] and len(lines["straight"]) == 3
    assert resumed["learned"] == straight["learned"] == lines["straight"][-1]["learned"]
    # p per epoch: the controller's rule from dropout_init, the same in every layer; no aux loss (no KL term).
    p, prev = [m["learned"]["blocks.0.attn.qkv"]["dropout"] for m in lines["straight"]], 0.3
    for m, value in zip(lines["straight"][:-1], p):
        target = DropoutController.target(m["controller_train_loss"], m["controller_held_out_loss"])
        assert m["dropout_target"] == target and value == pytest.approx(prev + BETA * (target - prev))
        assert {v["dropout"] for v in m["learned"].values()} == {value} and "aux_loss" not in m
        prev = value
    # After the last epoch the controller does not run: the p reported is the one the last epoch trained with.
    assert "dropout_target" not in lines["straight"][-1] and p[-1] == p[-2]
    assert mlae.read_adapter_learned(tmp_path / "straight" / "adapter.safetensors") == straight["learned"]
    from mlae.experiments.analysis import dropout_history

    assert dropout_history(tmp_path / "straight")["p"]["blocks.5.attn.qkv"] == p


def test_engine_refuses_a_training_split_too_small_to_hold_out(tmp_path):
    pytest.importorskip("mlae.backbones")
    from mlae import engine
    from mlae.data import testing

    testing.make_vtab_folder(tmp_path / "vtab", name="cifar", n_train=3, n_val=1, n_test=4, size=32)
    from mlae.errors import InputError

    with pytest.raises(InputError, match="too small to hold out"):
        engine.train(_heldout_config(tmp_path, "small"))


def test_cli_heldout_flags_round_trip_into_config_yaml(tmp_path, capsys):
    pytest.importorskip("mlae.backbones")
    yaml = pytest.importorskip("yaml")
    from mlae.cli import main
    from mlae.data import testing

    root = testing.make_vtab_folder(tmp_path / "vtab", name="cifar", n_train=32, n_test=8, size=32)
    base = ["train", "--dataset", "vtab:cifar", "--data-root", str(root), "--backbone", "test_vit", "--no-pretrained",
            "--img-size", "32", "--patch-size", "4", "--epochs", "1", "--batch-size", "32", "--warmup-epochs", "0",
            "--threads", "1", "--quiet", "--method", "mlae", "--experts", "2", "--dropout", "auto"]
    out = tmp_path / "run"
    assert main([*base, "--dropout-learner", "heldout", "--dropout-holdout", "0.25", "--out", str(out)]) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["dropout_learner"], config["dropout_holdout"]) == ("heldout", 0.25)
    results = json.loads((out / "results.json").read_text())
    assert results["train_images"] + results["held_out_images"] == 40 and results["held_out_images"] == 8  # round(0.25 · 10) per class
    capsys.readouterr()
    assert main([*base, "--dropout-learner", "concrete", "--dropout-holdout", "0.3", "--out", str(tmp_path / "bad")]) != 0
    err = capsys.readouterr().err.strip()
    assert "--dropout-learner heldout" in err and len(err.splitlines()) == 1
