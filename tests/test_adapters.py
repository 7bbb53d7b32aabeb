"""One generic matrix over every method and masking mode (merge, masks, gradients, save/load, PEFT export),
then method-specific checks. A new method joins the matrix by adding a case to CASES."""
import dataclasses
import json
import math
import typing
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import mlae
from mlae.adapters import MLAELinear
from conftest import make_mlp, make_tiny_vit

CASES = {
    "lora": lambda **kw: mlae.LoRAConfig(rank=4, alpha=8, **kw),
    "lora-dropout": lambda **kw: mlae.LoRAConfig(rank=4, alpha=4, dropout=0.3, **kw),
    "mlae-stochastic": lambda **kw: mlae.MLAEConfig(experts=4, dropout=0.5, coeff_init=0.5, **kw),
    "mlae-sample": lambda **kw: mlae.MLAEConfig(experts=4, dropout=0.5, mask_granularity="sample", **kw),
    "mlae-rank2": lambda **kw: mlae.MLAEConfig(experts=2, expert_rank=2, dropout=0.3, **kw),
    "mlae-fixed": lambda **kw: mlae.MLAEConfig(experts=4, masking="fixed", pattern="incremental", **kw),
    "mlae-mixed": lambda **kw: mlae.MLAEConfig(experts=4, masking="mixed", pattern="hourglass", dropout=0.3, **kw),
    "mlae-frozen-coeff": lambda **kw: mlae.MLAEConfig(experts=4, adaptive=False, coeff_init=2.0, **kw),
    "mlae-auto-heldout": lambda **kw: mlae.MLAEConfig(experts=4, dropout="auto", dropout_learner="heldout",
                                                      coeff_init=0.5, **kw),
    "mlae-auto-concrete": lambda **kw: mlae.MLAEConfig(experts=4, dropout="auto", dropout_learner="concrete",
                                                       dropout_per_expert=True, mask_granularity="sample", **kw),
    "dmlora": lambda **kw: mlae.DMLoRAConfig(branches=2, rank=4, branch_dropout=0.5, **kw),
    "dmlora-full-rank": lambda **kw: mlae.DMLoRAConfig(branches=3, rank=2, rank_per_branch=True, schedule="cosine",
                                                       rescale=False, **kw),
    "mole-layer": lambda **kw: mlae.MoLEConfig(expert_ranks=[2, 3], granularity="layer", **kw),
    "mole-network": lambda **kw: mlae.MoLEConfig(expert_ranks=[1, 2, 2], granularity="network", temperature=0.5,
                                                 **kw),
}
MODELS = {
    "vit": (lambda: make_tiny_vit(depth=3), {}, lambda: torch.randn(4, 3, 32, 32)),
    "mlp": (make_mlp, {"target_modules": ["0", "2"], "modules_to_save": ["4"]}, lambda: torch.randn(4, 12)),
}


def randomize(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give the adapters non-zero updates (B starts at zero, which would make many checks vacuous). Frozen
    adapter tensors saved as buffers (e.g. MoLE's expert LoRAs) are randomised too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in mlae.adapter_layers(model):
            for name, p in layer.state_dict(keep_vars=True).items():
                if not name.startswith("base.") and p.is_floating_point():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def skip_unless_mergeable(model: nn.Module) -> None:
    """Input-dependent adapters (MoLE) have no merged form: check they refuse merging and PEFT export, then skip."""
    if all(layer.mergeable for _, layer in mlae.adapter_layers(model)):
        return
    with pytest.raises(TypeError, match="cannot be merged"):
        mlae.merge(model)
    assert not any(layer.merged for _, layer in mlae.adapter_layers(model))
    with pytest.raises(TypeError, match="input dependent"):
        mlae.export_peft(model, "unused")
    pytest.skip("adapter is not mergeable (input-dependent update)")


def build(case: str, model_kind: str = "vit"):
    make_model, kw, make_x = MODELS[model_kind]
    model = mlae.apply(make_model(), CASES[case](**kw))
    return randomize(model).eval(), make_x()


@pytest.mark.parametrize("model_kind", list(MODELS))
@pytest.mark.parametrize("case", list(CASES))
def test_merged_equals_unmerged_and_unmerge_restores(case, model_kind):
    model, x = build(case, model_kind)
    skip_unless_mergeable(model)
    base = {n: l.base.weight.clone() for n, l in mlae.adapter_layers(model)}
    with torch.no_grad():
        y = model(x)
        mlae.merge(model)
        mlae.merge(model)  # idempotent
        assert all(l.merged for _, l in mlae.adapter_layers(model))
        assert not any(torch.equal(l.base.weight, base[n]) for n, l in mlae.adapter_layers(model))
        y_merged = model(x)
        mlae.unmerge(model)
        mlae.unmerge(model)
        y_back = model(x)
    torch.testing.assert_close(y_merged, y, rtol=1e-4, atol=1e-5)
    assert torch.equal(y_back, y)
    for n, l in mlae.adapter_layers(model):
        assert torch.equal(l.base.weight, base[n]), n


@pytest.mark.parametrize("case", ["lora", "mlae-stochastic"])
def test_merge_without_keeping_original_unmerges_up_to_rounding(case):
    model, _ = build(case)
    base = {n: l.base.weight.clone() for n, l in mlae.adapter_layers(model)}
    mlae.merge(model, keep_original=False)
    mlae.unmerge(model)
    for n, l in mlae.adapter_layers(model):
        torch.testing.assert_close(l.base.weight, base[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["lora", "mlae-stochastic"])
def test_unmerge_after_loading_another_merged_model_gives_that_models_weights(case):
    """The kept original belongs to the weight merge wrote; a merged checkpoint loaded over it is unmerged by
    subtraction instead of restoring this model's own old weight."""
    source, x = build(case)
    merged = mlae.merge(source) or source
    source_base = {n: l.original_weight().clone() for n, l in mlae.adapter_layers(merged)}
    target, _ = build(case)  # the same architecture, with other backbone and adapter weights:
    randomize(target, seed=2)
    with torch.no_grad():
        for _, l in mlae.adapter_layers(target):
            l.base.weight.add_(1.0)
    mlae.merge(target)
    target.load_state_dict(merged.state_dict())
    mlae.unmerge(target)
    for n, l in mlae.adapter_layers(target):
        torch.testing.assert_close(l.base.weight, source_base[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_refuses_non_finite_weights(case):
    model, x = build(case)
    skip_unless_mergeable(model)
    names = [n for n, _ in mlae.adapter_layers(model)]
    bad_name, bad = list(mlae.adapter_layers(model))[-1]
    before = {n: l.base.weight.clone() for n, l in mlae.adapter_layers(model)}
    with torch.no_grad():
        bad.lora_B[0, 0] = float("inf")
    with pytest.raises(ValueError, match=bad_name.replace(".", r"\.")):
        mlae.merge(model)
    # All or nothing: not even the healthy layers before the bad one were written.
    for n, l in mlae.adapter_layers(model):
        assert not l.merged and torch.equal(l.base.weight, before[n]), n
    assert names


@pytest.mark.parametrize("model_kind", list(MODELS))
@pytest.mark.parametrize("case", list(CASES))
def test_only_adapter_and_head_parameters_change(case, model_kind):
    model, x = build(case, model_kind)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".base." not in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    out = model(x)
    out.square().mean().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    heads = getattr(model, "mlae_modules_to_save")
    assert heads and any(n.startswith(heads[0] + ".") for n in changed)
    counts = mlae.count_parameters(model)
    assert counts["adapter"] + counts["head"] == counts["trainable"] == sum(before[n].numel() for n in trainable)


@pytest.mark.parametrize("model_kind", list(MODELS))
@pytest.mark.parametrize("case", list(CASES))
def test_save_load_round_trip(case, model_kind, tmp_path):
    model, x = build(case, model_kind)
    path = mlae.save_adapter(model, tmp_path / "a.safetensors", metadata={"dataset": "suite:digits", "n": 5})
    assert mlae.read_adapter_metadata(path) == {"dataset": "suite:digits", "n": 5}
    assert mlae.read_adapter_config(path).to_dict() == model.mlae_config.to_dict()
    make_model, kw, _ = MODELS[model_kind]
    fresh = mlae.load_adapter(make_model(), path).eval()  # same backbone weights (same seed), config from file
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    # The file holds adapters and head only, never the frozen backbone.
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert keys and not any(".base." in k for k in keys)
    heads = model.mlae_modules_to_save
    assert {k for k in keys if k.split(".")[0] in heads} and all(k.split(".")[0] in heads or "lora_" in k
                                                                 or k.endswith("coeff") for k in keys)



@pytest.mark.parametrize("case", list(CASES))
def test_adapters_take_the_mode_of_a_model_in_eval_mode(case, tmp_path):
    """The README's flow: load_adapter(fresh_model.eval(), ...) with no .eval() afterwards. New layers must not
    start in training mode (masking and dropout active) inside a model that says it is not training."""
    model, x = build(case)  # applied in training mode, then .eval()
    path = mlae.save_adapter(model, tmp_path / "a.safetensors")
    applied = randomize(mlae.apply(make_tiny_vit(depth=3).eval(), CASES[case]()))
    loaded = mlae.load_adapter(make_tiny_vit(depth=3).eval(), path)
    for m in (applied, loaded):
        assert not any(module.training for module in m.modules())
    with torch.no_grad():
        torch.testing.assert_close(applied(x), applied(x), rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), model(x))
    # ... and a model in training mode gets training-mode adapters, as before.
    assert all(l.training for _, l in mlae.adapter_layers(mlae.apply(make_tiny_vit(depth=3), CASES[case]())))

@pytest.mark.parametrize("case", list(CASES))
def test_peft_export_loads_in_real_peft_and_matches_merged_model(case, tmp_path):
    peft = pytest.importorskip("peft")
    model, x = build(case)
    skip_unless_mergeable(model)
    out_dir = mlae.export_peft(model, tmp_path / "peft")
    cfg = json.loads((out_dir / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["modules_to_save"] == ["head"]
    with torch.no_grad():
        expected = mlae.merge(model)(x)
    loaded = peft.PeftModel.from_pretrained(make_tiny_vit(depth=3), str(out_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(loaded.merge_and_unload()(x), expected, rtol=1e-4, atol=1e-5)


# --- masking ---------------------------------------------------------------------------------------

def _layer(p=0.5, granularity="batch", experts=8, rank=1, seed=0):
    torch.manual_seed(seed)
    layer = MLAELinear(nn.Linear(6, 5), experts, rank, p, 1.0, True, 1.0, granularity)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.coeff.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("granularity", ["batch", "sample"])
def test_training_mean_over_masks_equals_eval_output(granularity):
    layer, x = _layer(0.5, granularity), torch.randn(3, 4, 6)
    with torch.no_grad():
        expected = layer.eval().delta(x)
        layer.train()
        n = 4000
        mean = sum(layer.delta(x) for _ in range(n)) / n
    # Inverted dropout: E[m/(1-p)] = 1, so the average of many masked forwards is the unmasked output.
    err = (mean - expected).abs().max() / expected.abs().max()
    assert err < 0.05, err
    # ...and a single masked forward is not the eval output.
    with torch.no_grad():
        assert not torch.allclose(layer.delta(x), expected)


def _expert_grads(layer, x):
    layer.zero_grad()
    layer.delta(x).sum().backward()
    a = layer.lora_A.grad.abs().sum(1)
    b = layer.lora_B.grad.abs().sum(0)
    return a, b, layer.coeff.grad.abs()


def test_dropped_experts_get_no_gradient():
    layer, x = _layer(0.5).train(), torch.randn(2, 3, 6)
    seen_dropped = seen_kept = 0
    for step in range(30):
        a, b, c = _expert_grads(layer, x)
        dropped = c == 0
        # A dropped expert has zero gradient in A, B and c; a kept one has non-zero gradients everywhere.
        assert torch.equal(a == 0, dropped) and torch.equal(b == 0, dropped), step
        seen_dropped += int(dropped.sum())
        seen_kept += int((~dropped).sum())
    assert seen_dropped > 0 and seen_kept > 0


def test_zero_dropout_drops_nothing():
    layer, x = _layer(0.0).train(), torch.randn(2, 3, 6)
    for _ in range(10):
        a, b, c = _expert_grads(layer, x)
        assert (a > 0).all() and (b > 0).all() and (c > 0).all()
    with torch.no_grad():
        torch.testing.assert_close(layer.delta(x), layer.eval().delta(x))


def test_eval_mode_is_deterministic_and_unscaled():
    layer, x = _layer(0.7), torch.randn(2, 6)
    layer.eval()
    a, b = layer.factors()
    torch.testing.assert_close(layer.delta(x), x @ (b @ a).T)


# --- patterns --------------------------------------------------------------------------------------

def _counts(model):
    return [l.experts for _, l in mlae.adapter_layers(model)]


def test_fixed_patterns_allocate_the_listed_experts():
    vit12 = lambda: make_tiny_vit(depth=12, dim=16)
    m = mlae.apply(vit12(), mlae.MLAEConfig(masking="fixed", pattern="incremental"))
    assert _counts(m) == [2, 2, 2, 6, 6, 6, 10, 10, 10, 14, 14, 14]
    assert [l.lora_A.shape[0] for _, l in mlae.adapter_layers(m)] == _counts(m)  # only kept experts allocated
    assert all(l.p == 0 for _, l in mlae.adapter_layers(m))
    m = mlae.apply(vit12(), mlae.MLAEConfig(masking="fixed", pattern="hourglass"))
    assert _counts(m) == [14, 14, 14, 2, 2, 2, 2, 2, 2, 14, 14, 14]
    m = mlae.apply(vit12(), mlae.MLAEConfig(masking="fixed", pattern="random", seed=3))
    counts = _counts(m)
    assert sum(counts) == 8 * 12 and min(counts) >= 1 and max(counts) <= 14 and len(set(counts)) > 1
    assert counts == _counts(mlae.apply(vit12(), mlae.MLAEConfig(masking="fixed", pattern="random", seed=3)))
    m = mlae.apply(make_tiny_vit(depth=3), mlae.MLAEConfig(masking="mixed", pattern=[1, 2, 3], dropout=0.2))
    assert _counts(m) == [1, 2, 3] and all(l.p == 0.2 for _, l in mlae.adapter_layers(m))
    # Resampled to another depth the pattern keeps its shape: protruding is low-high-low.
    m = mlae.apply(make_tiny_vit(depth=5), mlae.MLAEConfig(masking="fixed", pattern="protruding"))
    c = _counts(m)
    assert c[0] == c[-1] == 2 and c[2] == 14


def test_stochastic_patterns_set_per_layer_dropout():
    m = mlae.apply(make_tiny_vit(depth=12, dim=16), mlae.MLAEConfig(pattern="hourglass"))
    assert [l.p for _, l in mlae.adapter_layers(m)] == pytest.approx([0, .1, .3, .5, .6, .8, .8, .6, .5, .3, .1, 0])
    m = mlae.apply(make_tiny_vit(depth=3), mlae.MLAEConfig(dropout=0.3))
    assert [l.p for _, l in mlae.adapter_layers(m)] == [0.3] * 3 and _counts(m) == [8] * 3


def test_layers_of_one_block_share_a_pattern_entry():
    m = mlae.apply(make_tiny_vit(depth=12, dim=16),
                   mlae.MLAEConfig(masking="fixed", pattern="decremental", target_modules=["qkv", "proj"]))
    names = [n for n, _ in mlae.adapter_layers(m)]
    assert len(names) == 24 and "blocks.0.attn.proj" in names
    counts = dict(zip(names, _counts(m)))
    assert counts["blocks.0.attn.qkv"] == counts["blocks.0.attn.proj"] == 14
    assert counts["blocks.11.attn.qkv"] == 2


# --- parameter count, similarity ------------------------------------------------------------------

def test_vit_b_parameter_count_matches_paper():
    import timm
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    mlae.apply(model, mlae.MLAEConfig())
    counts = mlae.count_parameters(model)
    assert counts["adapter"] == 12 * (8 * (768 + 2304) + 8)   # 295,008: the paper's 0.30 M
    assert counts["head"] == 768 * 100 + 100


def _brute_force_similarity(layer):
    a, b = (t.detach() for t in layer.factors())
    sizes = layer.expert_sizes()
    if len(sizes) < 2:
        return float("nan")  # a layer with a single expert has no pair
    mats, start = [], 0
    for s in sizes:
        mats.append((b[:, start:start + s] @ a[start:start + s]).flatten().double())
        start += s
    sims = [torch.nn.functional.cosine_similarity(mats[i], mats[j], dim=0)
            for i in range(len(mats)) for j in range(len(mats)) if i != j]
    return float(torch.stack(sims).mean())


@pytest.mark.parametrize("case", ["lora", "mlae-stochastic", "mlae-rank2", "mlae-fixed"])
def test_expert_similarity_matches_brute_force(case):
    model, _ = build(case)
    with torch.no_grad():  # negative coefficients flip the sign of an expert: the formula must keep it
        for _, l in mlae.adapter_layers(model):
            if hasattr(l, "coeff"):
                l.coeff[0] = -l.coeff[0]
    per_layer = mlae.expert_similarity(model, per_layer=True)
    for name, layer in mlae.adapter_layers(model):
        assert per_layer[name] == pytest.approx(_brute_force_similarity(layer), abs=1e-5, nan_ok=True)
    defined = [v for v in per_layer.values() if not math.isnan(v)]
    assert defined and mlae.expert_similarity(model) == pytest.approx(sum(defined) / len(defined), abs=1e-6)
    with pytest.raises(mlae.MLAEError, match=r"takes one adapter layer .*expert_similarity\(model\) covers"):
        mlae.similarity_matrix(model)  # the whole model, as expert_similarity takes it


def test_similarity_of_untrained_experts_is_undefined_not_zero():
    model = mlae.apply(make_tiny_vit(), mlae.MLAEConfig())  # B = 0: every expert is the zero matrix
    assert math.isnan(mlae.expert_similarity(model))


# --- bad input ------------------------------------------------------------------------------------

def test_unknown_target_names_patterns_and_existing_modules():
    with pytest.raises(ValueError, match=r"nonexistent.*blocks\.0\.attn\.qkv"):
        mlae.apply(make_tiny_vit(), mlae.MLAEConfig(target_modules=["nonexistent"]))


def test_regex_targets_and_apply_twice():
    m = mlae.apply(make_tiny_vit(depth=3), mlae.LoRAConfig(target_modules=[r"blocks\.[01]\.mlp\.fc\d"]))
    assert [n for n, _ in mlae.adapter_layers(m)] == [f"blocks.{i}.mlp.fc{j}" for i in (0, 1) for j in (1, 2)]
    with pytest.raises(ValueError, match="already has adapters"):
        mlae.apply(m, mlae.LoRAConfig())


@pytest.mark.parametrize("kwargs, match", [
    ({"experts": 0}, "experts"), ({"expert_rank": 1.5}, "expert_rank"), ({"dropout": 1.0}, "dropout"),
    ({"dropout": -0.1}, "dropout"), ({"masking": "sometimes"}, "masking"), ({"pattern": "zigzag"}, "pattern"),
    ({"mask_granularity": "token"}, "mask_granularity"), ({"coeff_init": float("nan")}, "finite"),
    ({"pattern": "random"}, "random"), ({"target_modules": []}, "target_modules"),
])
def test_bad_mlae_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlae.MLAEConfig(**kwargs)


@pytest.mark.parametrize("make, match", [
    (lambda: mlae.MLAEConfig(coeff_init="1"), r"coeff_init \(--coeff-init\) must be a number, got '1'"),
    (lambda: mlae.MLAEConfig(adaptive="no"), r"adaptive \(--no-adaptive\) must be True or False, got 'no'"),
    (lambda: mlae.MLAEConfig(dropout=None), r"dropout \(--dropout\) must be a number or 'auto', got None"),
    (lambda: mlae.MLAEConfig(dropout="Auto"), r"dropout \(--dropout\) must be a number or 'auto', got 'Auto'"),
    (lambda: mlae.MLAEConfig(seed=2.5), "seed must be an integer, got 2.5"),
    (lambda: mlae.LoRAConfig(dropout=1.0), r"dropout \(--lora-dropout\) must be in \[0, 1\), got 1.0"),
    (lambda: mlae.DMLoRAConfig(branch_dropout=1.0), r"branch_dropout \(--branch-dropout\) must be in \[0, 1\)"),
    (lambda: mlae.MLAEConfig(dropout=torch.tensor(0.5)), "dropout .* got tensor"),
    (lambda: mlae.MLAEConfig(seed="x"), "seed must be an integer, got 'x'"),
    (lambda: mlae.MLAEConfig(pattern=[0.5, "a"]), "pattern .* a string or a list of numbers"),
    (lambda: mlae.MLAEConfig(dropout="auto", dropout_init="0.1"), "dropout_init .* must be a number"),
    (lambda: mlae.LoRAConfig(alpha="8"), r"alpha \(--alpha\) must be a number"),
    (lambda: mlae.LoRAConfig(dropout="0.1"), r"dropout \(--lora-dropout\) must be a number"),
    (lambda: mlae.DMLoRAConfig(branch_dropout="0.5"), "branch_dropout .* must be a number"),
    (lambda: mlae.MoLEConfig(temperature="1"), "temperature .* must be a number"),
    (lambda: mlae.MoLEConfig(expert_ranks=8), "expert_ranks must be a list of integers, got 8"),
    (lambda: mlae.MoLEConfig(expert_ranks=["a"]), "expert_ranks must be a list of integers"),
    (lambda: mlae.LoRAConfig(train_head=False, modules_to_save=["norm"]), "train_head=False freezes them"),
])
def test_config_values_of_the_wrong_type_name_their_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_one_target_name_is_a_list_of_one_and_optional_fields_are_checked():
    assert mlae.LoRAConfig(target_modules="qkv").target_modules == ["qkv"]
    assert mlae.LoRAConfig(modules_to_save="head").modules_to_save == ["head"]
    with pytest.raises(ValueError, match="modules_to_save must be a list of strings or None, got 5"):
        mlae.LoRAConfig(modules_to_save=5)


def test_numpy_scalars_are_numbers_and_stay_json():
    np = pytest.importorskip("numpy")
    cfg = mlae.MLAEConfig(experts=np.int64(4), coeff_init=np.float32(2.0), dropout=np.float64(0.3))
    assert (type(cfg.experts), type(cfg.coeff_init)) == (int, float)
    assert json.loads(cfg.to_json())["experts"] == 4
    assert mlae.LoRAConfig(rank=8.0, alpha=8).rank == 8  # a whole float is an integer, an int a number
    cfg = mlae.MLAEConfig(seed=2.0, adaptive=np.bool_(False), pattern=[np.float32(0.5)] * 3,
                          target_modules=[np.str_("qkv")])
    assert (cfg.seed, type(cfg.seed), cfg.adaptive, type(cfg.adaptive)) == (2, int, False, bool)
    assert [type(v) for v in cfg.pattern] == [float] * 3
    assert json.loads(cfg.to_json())["seed"] == 2


def test_a_masking_probability_with_fixed_masking_warns_that_it_is_ignored():
    with pytest.warns(UserWarning, match="dropout=0.3 has no effect with masking='fixed'"):
        mlae.MLAEConfig(masking="fixed", pattern="incremental", dropout=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the ablations' fixed rows (p = 0) and the default p say nothing
        mlae.MLAEConfig(masking="fixed", pattern="incremental", dropout=0.0)
        mlae.MLAEConfig(masking="fixed", pattern="protruding")


@dataclasses.dataclass
class _PlainAnnotations(mlae.LoRAConfig):
    """A user's config subclass in a module without ``from __future__ import annotations`` (this file has none):
    its annotations are types, not strings, and are checked all the same."""
    gain: float = 1.0
    mode: typing.Literal["a", "b"] = "a"
    extra: typing.Optional[int] = None
    names: list[str] = dataclasses.field(default_factory=list)
    slots: list[typing.Optional[int]] = dataclasses.field(default_factory=lambda: [1, None])
    pair: tuple[int, str] = (1, "x")
    flag: typing.Literal[True, False] = True
    label: typing.Literal["a b", "c"] = "a b"


@pytest.mark.parametrize("kwargs, match", [
    ({"gain": "1"}, "gain must be a number, got '1'"), ({"mode": "c"}, "mode must be 'a' or 'b', got 'c'"),
    ({"extra": 1.5}, "extra must be an integer or None, got 1.5"), ({"names": [1]}, "names must be a list of strings"),
    ({"slots": ["x"]}, r"slots must be a list of integers or None, got \['x'\]"),
    ({"flag": 1}, "flag must be True or False, got 1"), ({"label": "ab"}, "label must be 'a b' or 'c', got 'ab'"),
])
def test_config_subclasses_without_string_annotations_are_checked(kwargs, match):
    assert "annotations" not in globals()  # the premise: this module's annotations are evaluated
    with pytest.raises(ValueError, match=match):
        _PlainAnnotations(**kwargs)
    ok = _PlainAnnotations(gain=2, mode="b", extra=3, names=["x"], flag=False)
    assert (ok.gain, ok.mode, ok.extra, ok.names, ok.slots, ok.pair, ok.flag) == (2, "b", 3, ["x"], [1, None],
                                                                                 (1, "x"), False)


@pytest.mark.parametrize("value", ["array", "tensor"])
def test_arrays_are_no_scalar_values(value):
    np = pytest.importorskip("numpy")
    for v in ((np.array(["auto"]), np.array([0.5, 0.5])) if value == "array" else (torch.tensor(0.5),)):
        with pytest.raises(ValueError, match="dropout .* must be a number or 'auto', got"):
            mlae.MLAEConfig(dropout=v)


@pytest.mark.parametrize("case", ["lora", "mlae-stochastic", "dmlora", "mlae-auto-heldout", "mlae-auto-concrete"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_adapters_on_a_model_already_in_half_precision(case, dtype):
    """apply() on a bf16/fp16 model: the new factors are fp32 (Adam's small steps survive), and outside autocast
    the update runs in fp32 and is cast back to the layer's dtype. The output follows the fp32 model's."""
    reference, x = build(case)
    model = randomize(mlae.apply(make_tiny_vit(depth=3).to(dtype), CASES[case]())).eval()
    assert model.blocks[0].attn.qkv.lora_A.dtype == torch.float32
    with torch.no_grad():
        out = model(x.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), reference(x), atol=0.05, rtol=0.05)
        if mlae.adapter_layers(model) and all(l.mergeable for _, l in mlae.adapter_layers(model)):
            mlae.merge(model)
            torch.testing.assert_close(model(x.to(dtype)).float(), out.float(), atol=0.05, rtol=0.05)
            mlae.unmerge(model)
    model.train()
    model(x.to(dtype)).float().sum().backward()
    assert model.blocks[0].attn.qkv.lora_A.grad is not None


def test_bad_lora_config_and_pattern_length():
    with pytest.raises(ValueError, match="rank"):
        mlae.LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="3 layers"):
        mlae.apply(make_tiny_vit(depth=3), mlae.MLAEConfig(masking="fixed", pattern=[2, 2]))


def test_load_rejects_corrupt_foreign_and_mismatched_files(tmp_path):
    model, _ = build("mlae-stochastic")
    good = mlae.save_adapter(model, tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        mlae.load_adapter(make_tiny_vit(depth=3), truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not an mlae adapter"):
        mlae.load_adapter(make_tiny_vit(depth=3), foreign)
    pickled = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2)}, pickled)
    with pytest.raises(ValueError, match="never unpickled"):
        mlae.load_adapter(make_tiny_vit(depth=3), pickled)
    with pytest.raises(FileNotFoundError, match="missing"):
        mlae.load_adapter(make_tiny_vit(depth=3), tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"head\.weight: file has shape \[5, 32\], model has \[7, 32\]"):
        mlae.load_adapter(make_tiny_vit(depth=3, num_classes=7), good)
    with pytest.raises(ValueError, match="same architecture"):
        mlae.load_adapter(make_tiny_vit(depth=2), good)
    # damaged metadata: not JSON, or a key missing
    with safe_open(str(good), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for name, meta in (("badjson", {**header, "config": "{not json"}),
                       ("nokey", {k: v for k, v in header.items() if k != "config"})):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="'config' metadata is not valid JSON: the file is damaged"):
        mlae.load_adapter(make_tiny_vit(depth=3), tmp_path / "badjson.safetensors")
    with pytest.raises(ValueError, match="lacks config: the file is damaged"):
        mlae.read_adapter_metadata(tmp_path / "nokey.safetensors")
    # damaged tensor bytes read as NaN: refused, and no weight of the model is changed
    key = next(k for k in tensors if k.endswith("lora_B"))
    save_file({**tensors, key: torch.full_like(tensors[key], float("nan"))}, str(tmp_path / "nan.safetensors"),
              metadata=header)
    fresh = make_tiny_vit(depth=3)
    with pytest.raises(ValueError, match=f"{key} hold NaN/inf values; the file is damaged"):
        mlae.load_adapter(fresh, tmp_path / "nan.safetensors")
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_a_file_saved_with_train_head_false_and_modules_to_save_still_loads(tmp_path):
    """Earlier versions accepted train_head=False with modules_to_save (the modules stayed frozen and were saved
    as they were); such a file loads, with a warning, and gives the saved model's outputs."""
    model, x = build("lora")
    mlae.save_adapter(model, tmp_path / "new.safetensors")
    with safe_open(str(tmp_path / "new.safetensors"), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert json.loads(header["modules_to_save"]) == ["head"]
    config = {**json.loads(header["config"]), "train_head": False, "modules_to_save": ["head"]}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={**header, "config": json.dumps(config)})
    legacy = "train_head=False and modules_to_save=\\['head'\\], a pair mlae now refuses"
    with pytest.warns(UserWarning, match=legacy) as seen:
        loaded = mlae.load_adapter(make_tiny_vit(depth=3), tmp_path / "old.safetensors")
    assert len(seen) == 1
    assert mlae.read_adapter_config(tmp_path / "old.safetensors").train_head  # read quietly, the same way
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model.eval()(x))


@pytest.mark.parametrize("case", ["lora", "dmlora-stage2"])
def test_training_a_merged_model_warns_that_the_adapter_gets_no_gradient(case):
    model, x = build(case.removesuffix("-stage2"))
    if case.endswith("stage2"):  # DMLoRA's stage 2 trains only the branch scales: still nothing trains merged
        from mlae.adapters.dmlora import start_stage2
        start_stage2(model)
    mlae.merge(model)
    with pytest.warns(UserWarning, match="is merged, so training gets no gradient for it; call mlae.unmerge"):
        model.train()(x).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inference on a merged model is what merging is for: no warning
        with torch.no_grad():
            model.eval()(x)
        model.train()
        with torch.no_grad():
            model(x)


def test_save_adapter_names_a_folder_and_metadata_that_is_no_json(tmp_path):
    model, _ = build("lora")
    with pytest.raises(ValueError, match="is a folder; name the adapter file to write"):
        mlae.save_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
        mlae.save_adapter(model, tmp_path / "a.safetensors", metadata={"root": tmp_path})
    with pytest.raises(ValueError, match="metadata must be a dict"):
        mlae.save_adapter(model, tmp_path / "a.safetensors", metadata="toy")
    assert not (tmp_path / "a.safetensors").exists()


def test_linear_probe_head_only_round_trip(tmp_path):
    model = mlae.freeze_backbone(make_tiny_vit())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    with torch.no_grad():
        model.head.weight.normal_()
    path = mlae.save_adapter(model, tmp_path / "probe.safetensors")
    assert mlae.read_adapter_config(path) is None
    fresh = mlae.load_adapter(make_tiny_vit(), path)
    assert torch.equal(fresh.head.weight, model.head.weight)
    assert not fresh.blocks[0].attn.qkv.weight.requires_grad


def test_set_progress_validates_and_aux_losses_empty_for_lora_mlae():
    model, x = build("mlae-stochastic")
    mlae.set_progress(model, 0.5)
    with pytest.raises(ValueError, match="progress"):
        mlae.set_progress(model, 1.5)
    with pytest.raises(ValueError, match="a number in \\[0, 1\\], got '0.5'"):
        mlae.set_progress(model, "0.5")
    model(x)
    assert mlae.aux_losses(model) == {}


def make_torchvision_vit(seed: int = 0) -> nn.Module:
    """torchvision's ViT at toy size (vit_b_16's layout: nn.MultiheadAttention, head at `heads.head`)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(seed)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                hidden_dim=32, mlp_dim=64, num_classes=5)


def test_torchvision_vit_head_is_found_and_trained():
    model = mlae.apply(make_torchvision_vit(), mlae.LoRAConfig(rank=2, target_modules=["mlp.0"]))
    assert model.mlae_modules_to_save == ["heads"]
    assert model.heads.head.weight.requires_grad
    assert mlae.count_parameters(model)["head"] == 32 * 5 + 5


def test_warns_when_no_head_is_trainable():
    with pytest.warns(UserWarning, match="no classifier head of Sequential is trainable.*modules_to_save"):
        mlae.apply(make_mlp(), mlae.LoRAConfig(rank=2, target_modules=["0"]))
    with pytest.warns(UserWarning, match="no classifier head"):
        mlae.freeze_backbone(make_mlp())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # train_head=False says there is nothing to train besides the adapters
        mlae.apply(make_mlp(), mlae.LoRAConfig(rank=2, target_modules=["0"], train_head=False))


def test_multihead_attention_out_proj_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"encoder_layer_0\.self_attention\.out_proj \(and 1 more\).*"
                                         "MultiheadAttention.*never run"):
        mlae.apply(make_torchvision_vit(), mlae.LoRAConfig(rank=2, target_modules=["out_proj"]))


@pytest.mark.parametrize("case", ["lora", "mlae-stochastic", "dmlora"])
def test_merge_and_unload_gives_the_plain_model(case):
    model, x = build(case)
    with torch.no_grad():
        expected = model(x)
    plain = mlae.merge_and_unload(model)
    assert not list(mlae.adapter_layers(plain)) and not hasattr(plain, "mlae_config")
    fresh = make_tiny_vit(depth=3)
    assert list(plain.state_dict()) == list(fresh.state_dict())
    fresh.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_refuses_input_dependent_adapters():
    model, _ = build("mole-layer")
    with pytest.raises(TypeError, match="cannot be merged"):
        mlae.merge_and_unload(model)
    assert list(mlae.adapter_layers(model))  # nothing was unloaded


def test_loading_onto_other_backbone_weights_is_noticed(tmp_path):
    model, x = build("lora")
    path = mlae.save_adapter(model, tmp_path / "a.safetensors")
    # the fingerprint ignores adapters and head: the plain backbone it was applied to has the same one
    assert mlae.backbone_fingerprint(make_tiny_vit(depth=3)) == mlae.backbone_fingerprint(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mlae.load_adapter(make_tiny_vit(depth=3), path)
    with pytest.warns(UserWarning, match="other backbone weights"):
        mlae.load_adapter(make_tiny_vit(depth=3, seed=1), path)
    with pytest.raises(ValueError, match="other backbone weights.*replaced"):
        mlae.load_adapter(make_tiny_vit(depth=3, seed=1), path, check_backbone="error")


def test_a_model_without_adapters_counts_its_head():
    # full fine-tuning trains a plain model: its head is still the head (it was reported as 0 parameters)
    model = make_tiny_vit(depth=1)
    counts = mlae.count_parameters(model)
    assert counts["head"] == sum(p.numel() for p in model.head.parameters()) > 0
    assert counts["adapter"] == 0 and counts["trainable"] == counts["total"]
