"""DMLoRA: dropout schedules, branch dropout (skipped branches, zero gradients), 2S-LS stage switch."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlae
from mlae.adapters.dmlora import DMLoRALinear, drop_probability, learned_scales, start_stage2
from conftest import make_tiny_vit


@pytest.mark.parametrize("schedule, expected", [
    ("linear", (0.0, 0.3, 0.6)), ("cosine", (0.0, 0.3, 0.6)), ("constant", (0.6, 0.6, 0.6)),
])
def test_schedule_values(schedule, expected):
    assert [drop_probability(t, 0.6, schedule) for t in (0.0, 0.5, 1.0)] == pytest.approx(expected)
    if schedule == "cosine":  # slower than linear early, faster late
        assert drop_probability(0.25, 0.6, "cosine") < drop_probability(0.25, 0.6, "linear")
        assert drop_probability(0.75, 0.6, "cosine") > drop_probability(0.75, 0.6, "linear")


def test_dropout_ramp_spans_stage_1():
    layer = _layer(p_max=0.4, schedule="linear", stage2_fraction=0.2)
    layer.set_progress(0.4)
    assert layer.p == pytest.approx(0.2)      # halfway through stage 1 (which ends at t = 0.8)
    layer.set_progress(0.8)
    assert layer.p == pytest.approx(0.4)
    layer.set_progress(1.0)
    assert layer.p == pytest.approx(0.4)
    model = mlae.apply(make_tiny_vit(), mlae.DMLoRAConfig(branch_dropout=0.5, stage2_fraction=0.0))
    mlae.set_progress(model, 0.5)
    assert [l.p for _, l in mlae.adapter_layers(model)] == pytest.approx([0.25, 0.25])


def _layer(branches=4, branch_rank=2, p_max=0.5, schedule="constant", rescale=True, stage2_fraction=0.0, alpha=8.0):
    torch.manual_seed(0)
    layer = DMLoRALinear(nn.Linear(6, 5), branches, branch_rank, alpha, p_max, schedule, rescale, stage2_fraction)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.set_progress(1.0)
    return layer


@pytest.mark.parametrize("rescale", [True, False])
def test_dropped_branches_contribute_nothing_and_get_zero_gradient(rescale):
    layer, x = _layer(rescale=rescale).train(), torch.randn(3, 4, 6)
    k, r, total = 4, 2, 8
    seen = {"dropped": 0, "kept": 0}
    for step in range(20):
        torch.manual_seed(step)
        keep = torch.rand(k) >= layer.p  # the draw the layer makes, replayed
        torch.manual_seed(step)
        layer.zero_grad()
        y = layer.delta(x)
        y.sum().backward()
        rows = keep.repeat_interleave(r)
        scale = layer.layer_alpha.item() / total / ((1 - layer.p) if rescale else 1.0)
        expected = x @ (layer.lora_B[:, rows] @ layer.lora_A[rows]).T * scale
        torch.testing.assert_close(y, expected.detach())
        grad_a, grad_b = layer.lora_A.grad.abs().sum(1), layer.lora_B.grad.abs().sum(0)
        assert torch.equal(grad_a[~rows], torch.zeros(int((~rows).sum())))
        assert torch.equal(grad_b[~rows], torch.zeros(int((~rows).sum())))
        assert (grad_a[rows] > 0).all() and (grad_b[rows] > 0).all()
        seen["dropped"] += int((~keep).sum())
        seen["kept"] += int(keep.sum())
    assert seen["dropped"] > 0 and seen["kept"] > 0


def test_zero_dropout_drops_nothing():
    layer, x = _layer(p_max=0.0).train(), torch.randn(2, 6)
    for _ in range(10):
        layer.zero_grad()
        layer.delta(x).sum().backward()
        assert (layer.lora_A.grad.abs().sum(1) > 0).all() and (layer.lora_B.grad.abs().sum(0) > 0).all()
    with torch.no_grad():
        torch.testing.assert_close(layer.delta(x), layer.eval().delta(x))


def test_inverted_dropout_keeps_the_expected_update():
    layer, x = _layer(p_max=0.5), torch.randn(3, 6)
    with torch.no_grad():
        expected = layer.eval().delta(x)
        layer.train()
        n = 4000
        mean = sum(layer.delta(x) for _ in range(n)) / n
    assert ((mean - expected).abs().max() / expected.abs().max()) < 0.05


def test_eval_uses_all_branches_with_alpha_over_total_rank():
    layer, x = _layer(branches=2, branch_rank=3, alpha=6.0).eval(), torch.randn(2, 6)
    a, b = layer.factors()
    torch.testing.assert_close(b @ a, (6.0 / 6) * layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(layer.delta(x), x @ (b @ a).T)


def test_rank_split_or_per_branch():
    split = mlae.apply(make_tiny_vit(), mlae.DMLoRAConfig(branches=4, rank=8))
    full = mlae.apply(make_tiny_vit(), mlae.DMLoRAConfig(branches=4, rank=8, rank_per_branch=True))
    assert [l.lora_A.shape[0] for _, l in mlae.adapter_layers(split)] == [8, 8]
    assert [l.lora_A.shape[0] for _, l in mlae.adapter_layers(full)] == [32, 32]
    assert mlae.adapter_layers(split).__next__()[1].expert_sizes() == [2, 2, 2, 2]


def test_stage_switch_trains_only_the_layer_scalars_and_the_head():
    torch.manual_seed(0)
    model = mlae.apply(make_tiny_vit(), mlae.DMLoRAConfig(branches=2, rank=4, alpha=4.0, branch_dropout=0.5))
    x = torch.randn(4, 3, 32, 32)
    layers = [l for _, l in mlae.adapter_layers(model)]
    with torch.no_grad():
        for l in layers:
            l.lora_B.normal_(0, 0.1)
    stage1 = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[-1] for n in stage1} == {"lora_A", "lora_B", "weight", "bias"}
    scalars = start_stage2(model)
    assert len(scalars) == len(layers) and all(s.requires_grad and s.item() == 0.0 for s in scalars)
    assert all(l.layer_alpha.item() == 4.0 for l in layers)  # α_l = α · exp(0): stage 2 starts from α
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_log_scale" for n, _ in mlae.adapter_layers(model)} | {"head.weight", "head.bias"}
    # Stage 2: no branch dropout, so a training forward is the full network.
    model.train()
    mlae.set_progress(model, 0.95)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.eval()(x))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([{"params": scalars, "lr": 1e-2, "weight_decay": 0.0},
                             {"params": list(model.head.parameters()), "lr": 1e-1}])
    model(x).square().mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    assert mlae.count_parameters(model)["adapter"] == len(layers)
    # The merged model uses each layer's learned α_l.
    with torch.no_grad():
        scalars[0].fill_(1.5)
        scalars[1].fill_(-3.0)
        model.eval()
        y = model(x)
        for l in layers:
            torch.testing.assert_close(l.delta_weight(), (4.0 * l.lora_log_scale.exp() / 4) * l.lora_B @ l.lora_A)
        mlae.merge(model)
        torch.testing.assert_close(model(x), y, rtol=1e-4, atol=1e-5)


def test_stage_2_moves_the_scales_of_layers_that_need_more_and_less_update_apart():
    """Two DMLoRA layers in a row; the target is the same network with layer 0's update 1.5 times and layer 1's
    0.6 times as large. Stage 2, at a tenth of a base learning rate of 0.1 (AdamW, as the engine sets it up),
    must grow the first scale, shrink the second and move them apart by more than 5 %. Trained as the raw
    α_l = 16 instead, 30 Adam steps of 0.01 could change each by at most 0.3 / 16 ≈ 2 %."""
    torch.manual_seed(0)
    model = mlae.apply(nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)),
                       mlae.DMLoRAConfig(target_modules=["0", "2"], branches=2, rank=4, train_head=False))
    first, second = (layer for _, layer in mlae.adapter_layers(model))
    with torch.no_grad():
        for layer in (first, second):
            layer.lora_B.normal_(0, 0.1)
    x = torch.randn(256, 8)
    with torch.no_grad():
        first.lora_log_scale.fill_(math.log(1.5))
        second.lora_log_scale.fill_(math.log(0.6))
        target = model.eval()(x)
        first.lora_log_scale.zero_()
        second.lora_log_scale.zero_()
    opt = torch.optim.AdamW([{"params": start_stage2(model), "weight_decay": 0.0}], lr=0.1 / 10)
    model.train()
    for _ in range(30):
        opt.zero_grad()
        F.mse_loss(model(x), target).backward()
        opt.step()
    grown, shrunk = (learned_scales(model)[name] for name in ("0", "2"))
    assert grown > 1.0 > shrunk
    assert grown / shrunk > 1.05


def test_stage_switch_needs_dmlora_layers():
    with pytest.raises(ValueError, match="no DMLoRA"):
        start_stage2(mlae.apply(make_tiny_vit(), mlae.LoRAConfig()))


@pytest.mark.parametrize("kwargs, match", [
    ({"branches": 0}, "branches"), ({"rank": 6, "branches": 4}, "split"), ({"branch_dropout": 1.0}, "branch_dropout"),
    ({"schedule": "step"}, "schedule"), ({"stage2_fraction": 1.0}, "stage2_fraction"),
    ({"alpha": float("inf")}, "alpha"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlae.DMLoRAConfig(**kwargs)


# --- the training engine runs both stages ------------------------------------------------------------

def _train_tiny(tmp_path, out, on_epoch_end=None, **kw):
    from mlae.engine import TrainConfig, train

    testing = pytest.importorskip("mlae.data.testing")
    root = tmp_path / "vtab"
    if not root.exists():
        testing.make_vtab_folder(root, name="cifar", n_train=64, n_test=48, size=32)
    cfg = TrainConfig(dataset="vtab:cifar", data_root=str(root), method="dmlora", backbone="test_vit",
                      pretrained=False, img_size=32, patch_size=4, epochs=4, batch_size=16, warmup_epochs=0,
                      lr=1e-2, threads=1, progress=False, out=str(tmp_path / out),
                      method_options={"stage2_fraction": 0.5, "branch_dropout": 0.5}, **kw)
    return train(cfg, on_epoch_end=on_epoch_end)


def test_engine_switches_to_stage_2_and_resumes_across_the_switch(tmp_path):
    pytest.importorskip("mlae.backbones")
    from mlae.trained import load_trained

    class Stop(Exception):
        pass

    def stop_after_3(epoch, metrics):
        if epoch == 3:
            raise Stop

    straight = _train_tiny(tmp_path, "straight")
    with pytest.raises(Stop):
        _train_tiny(tmp_path, "resumed", on_epoch_end=stop_after_3)
    resumed = _train_tiny(tmp_path, "resumed", resume=True)
    assert resumed["top1"] == straight["top1"]
    model, _ = load_trained(tmp_path / "straight" / "adapter.safetensors")
    again, _ = load_trained(tmp_path / "resumed" / "adapter.safetensors")
    for (_, a), (_, b) in zip(mlae.adapter_layers(model), mlae.adapter_layers(again)):
        assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.lora_log_scale, b.lora_log_scale)
    scales = [l.layer_alpha.item() for _, l in mlae.adapter_layers(model)]
    assert all(s != 16.0 for s in scales) and len(set(scales)) > 1  # stage 2 learned a scale per layer
    # The run reports what it learned: α_l / α per layer in results.json, and a plot.
    learned = straight["layer_scales"]
    assert list(learned) == [n for n, _ in mlae.adapter_layers(model)]
    assert list(learned.values()) == pytest.approx([s / 16.0 for s in scales])
    assert (tmp_path / "straight" / "scales.png").read_bytes()[:4] == b"\x89PNG"
    # Stage 2 (epochs 3-4) runs on its own cosine from lr / 10.
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[0] > 1e-3 and 0 < max(lrs[2:]) <= 1e-3
