"""MoLE: experts from our adapter files and PEFT folders, gating, balance loss, temperature, expert selection,
arithmetic merge, bad inputs."""
import json
import math

import pytest
import torch

import mlae
from mlae.adapters.mole import MoLELinear, arithmetic_merge, from_adapters, read_expert, select_experts
from conftest import make_tiny_vit

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def trained(config, seed):
    """A tiny ViT with ``config`` whose adapter tensors are random (as if trained); the head is left as built."""
    model = mlae.apply(make_tiny_vit(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in mlae.adapter_layers(model):
            for name, p in layer.named_parameters():
                if not name.startswith("base."):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


@pytest.fixture
def experts(tmp_path):
    """Three saved experts of different methods and ranks (MLAE fixed: a different rank in every layer)."""
    configs = [mlae.LoRAConfig(rank=4, alpha=8), mlae.MLAEConfig(masking="fixed", pattern=[1, 3], coeff_init=0.5),
               mlae.DMLoRAConfig(branches=2, rank=2, alpha=3.0)]
    models = [trained(c, seed) for seed, c in enumerate(configs)]
    paths = [mlae.save_adapter(m, tmp_path / f"e{i}.safetensors") for i, m in enumerate(models)]
    return models, paths


def mole(paths, **kw):
    model = from_adapters(make_tiny_vit(), paths, **kw).eval()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():  # a trained-looking gate (it starts at zero: the plain average of the experts)
        for n, p in model.named_parameters():
            if "lora_gate" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def mole_layers(model):
    return [l for _, l in mlae.adapter_layers(model)]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_one_expert_equals_its_source_model(experts, index):
    models, paths = experts
    model = mole([paths[index]])
    with torch.no_grad():
        torch.testing.assert_close(model(X), models[index](X), rtol=1e-5, atol=1e-5)


def test_starts_as_the_average_of_the_experts_and_only_gates_train(experts):
    models, paths = experts
    model = from_adapters(make_tiny_vit(), paths).eval()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_gate" in n or n.startswith("head.") for n in trainable)
    average = arithmetic_merge(make_tiny_vit(), paths).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), average(X), rtol=1e-5, atol=1e-5)
    assert [l.ranks for l in mole_layers(model)] == [[4, 1, 2], [4, 3, 2]]
    assert model.mlae_config.expert_ranks == [4, 1, 2]
    assert model.mlae_config.rank_pattern == {"blocks.1.attn.qkv": [4, 3, 2]}


def test_experts_from_peft_export_match_our_files(experts, tmp_path):
    models, paths = experts
    dirs = [mlae.export_peft(m, tmp_path / f"peft{i}") for i, m in enumerate(models)]
    for path, d in zip(paths, dirs):
        ours, theirs = read_expert(path, make_tiny_vit()), read_expert(d, make_tiny_vit())
        assert set(ours) == set(theirs)
        for name in ours:
            for a, b in zip(ours[name], theirs[name]):
                torch.testing.assert_close(a, b)
    with torch.no_grad():
        torch.testing.assert_close(mole(dirs)(X), mole(paths)(X), rtol=1e-5, atol=1e-5)


def test_expert_from_real_peft_save_pretrained(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"], rank_pattern={"blocks.1.attn.qkv": 2},
                             alpha_pattern={"blocks.1.attn.qkv": 6})
    source = peft.get_peft_model(make_tiny_vit(), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in source.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    source.save_pretrained(tmp_path / "peft")
    model = mole([tmp_path / "peft"])
    assert [l.ranks for l in mole_layers(model)] == [[4], [2]]
    with torch.no_grad():
        torch.testing.assert_close(model(X), source.eval()(X), rtol=1e-5, atol=1e-5)


def test_saved_mole_is_self_contained(experts, tmp_path):
    _, paths = experts
    model = mole(paths, granularity="network", temperature=0.7)
    path = mlae.save_adapter(model, tmp_path / "mole.safetensors")
    for p in paths:
        p.unlink()  # the experts' files are no longer needed
    fresh = mlae.load_adapter(make_tiny_vit(), path).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), model(X))
    assert fresh.mlae_config.sources == [str(p) for p in paths]


def test_balance_loss_is_minus_sum_log_mean_weights_and_trains_the_gates(experts):
    _, paths = experts
    model = mole(paths).train()
    model(X)
    q = torch.stack([l.last_weights for l in mole_layers(model)]).mean(0)
    losses = mlae.aux_losses(model)
    assert set(losses) == {"balance"}
    torch.testing.assert_close(losses["balance"], -torch.log(q).sum())
    losses["balance"].backward()
    gates = [p for n, p in model.named_parameters() if "lora_gate" in n]
    assert gates and all(p.grad is not None for p in gates) and any(p.grad.abs().sum() > 0 for p in gates)
    assert model.head.weight.grad is None  # the balance loss does not reach the head
    # A step against it makes the gate weights more balanced.
    before = losses["balance"].item()
    torch.optim.SGD(gates, lr=0.01).step()
    model(X)
    assert mlae.aux_losses(model)["balance"].item() < before


def test_temperature_sharpens_or_flattens(experts):
    _, paths = experts
    model = mole(paths)
    entropies = []
    for tau in (0.25, 0.5, 1.0, 2.0, 4.0):
        for layer in mole_layers(model):
            layer.temperature = tau
        with torch.no_grad():
            layer = mole_layers(model)[0]
            g = layer.gate_weights(layer.expert_outputs(torch.randn(8, 17, 32)))
        entropies.append(float(-(g * g.log()).sum(-1).mean()))
    assert all(a < b for a, b in zip(entropies, entropies[1:])), entropies


def test_selecting_experts_renormalises_the_kept_gate_weights(experts):
    _, paths = experts
    model = mole(paths)
    layer = mole_layers(model)[0]
    x = torch.randn(2, 17, 32)
    with torch.no_grad():
        e = layer.expert_outputs(x)
        g_all = layer.gate_weights(e)
        select_experts(model, [0, 2])
        g = layer.gate_weights(e)
        torch.testing.assert_close(g.sum(-1), torch.ones(2, 17))
        assert torch.equal(g[..., 1], torch.zeros(2, 17))
        kept = g_all[..., [0, 2]]
        torch.testing.assert_close(g[..., [0, 2]], kept / kept.sum(-1, keepdim=True))
        # The layer's output is the MoLE over just the kept experts, with those weights.
        expected = layer.base(x) + (g[..., [0, 2], None] * e[..., [0, 2], :]).sum(-2)
        torch.testing.assert_close(layer(x), expected)
        model.train()
        model(X)
        assert torch.isfinite(mlae.aux_losses(model)["balance"])
        select_experts(model, None)
        torch.testing.assert_close(layer.gate_weights(e), g_all)
    with pytest.raises(ValueError, match="subset"):
        select_experts(model, [3])
    with pytest.raises(ValueError, match="subset"):
        select_experts(model, [])


def test_one_selected_expert_equals_that_expert(experts):
    models, paths = experts
    model = select_experts(mole(paths), [1])
    with torch.no_grad():
        torch.testing.assert_close(model(X), models[1](X), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity, gates", [("layer", 2), ("block", 2), ("network", 1)])
def test_gate_granularity(experts, granularity, gates):
    _, paths = experts
    model = from_adapters(make_tiny_vit(), paths, granularity=granularity)
    owned = [l for l in mole_layers(model) if "lora_gate" in l._modules]
    assert len(owned) == gates
    assert len({id(l._gate[0]) for l in mole_layers(model)}) == gates
    assert mlae.count_parameters(model)["adapter"] == gates * (3 * 96 * 2 + 3 * 96 * 3 + 3)


def test_shared_gate_needs_equal_output_sizes(tmp_path):
    path = mlae.save_adapter(trained(mlae.LoRAConfig(target_modules=["qkv", "proj"]), 0), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="equal output sizes"):
        from_adapters(make_tiny_vit(), [path], granularity="block")
    assert len(mole_layers(from_adapters(make_tiny_vit(), [path], granularity="layer"))) == 4


def test_arithmetic_merge_is_the_weighted_sum_of_updates(experts, tmp_path):
    models, paths = experts
    merged = arithmetic_merge(make_tiny_vit(), paths, weights=[0.5, -1.0, 2.0])
    for name, layer in mlae.adapter_layers(merged):
        expected = sum(w * dict(mlae.adapter_layers(m))[name].delta_weight() for w, m in zip([0.5, -1.0, 2.0], models))
        torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-5, atol=1e-6)
    assert merged.mlae_config.method == "lora" and merged.mlae_config.rank == 9  # 4 + 3 + 2, block 0 padded
    with torch.no_grad():  # a plain mergeable LoRA: merges and exports like any other
        y = merged.eval()(X)
        torch.testing.assert_close(mlae.merge(merged)(X), y, rtol=1e-4, atol=1e-5)
    mlae.unmerge(merged)
    assert json.loads((mlae.export_peft(merged, tmp_path / "merged") / "adapter_config.json").read_text())["r"] == 9
    with pytest.raises(ValueError, match="3 experts"):
        arithmetic_merge(make_tiny_vit(), paths, weights=[1.0])


def test_bad_expert_sources(experts, tmp_path):
    _, paths = experts
    other = mlae.save_adapter(trained(mlae.LoRAConfig(target_modules=["fc1"]), 0), tmp_path / "fc1.safetensors")
    with pytest.raises(ValueError, match="same modules"):
        from_adapters(make_tiny_vit(), [paths[0], other])
    with pytest.raises(FileNotFoundError, match="missing"):
        from_adapters(make_tiny_vit(), [paths[0], tmp_path / "missing.safetensors"])
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        from_adapters(make_tiny_vit(), [tmp_path])
    probe = mlae.save_adapter(mlae.freeze_backbone(make_tiny_vit()), tmp_path / "probe.safetensors")
    with pytest.raises(ValueError, match="linear probe"):
        from_adapters(make_tiny_vit(), [probe])
    nested = mlae.save_adapter(from_adapters(make_tiny_vit(), paths), tmp_path / "mole.safetensors")
    with pytest.raises(ValueError, match="input dependent"):
        from_adapters(make_tiny_vit(), [nested])
    with pytest.raises(ValueError, match="not an nn.Linear of this model"):
        from_adapters(make_tiny_vit(depth=1), [paths[0]])
    with pytest.raises(ValueError, match="another backbone"):
        from_adapters(make_tiny_vit(dim=16), [paths[0]])
    peft_dir = mlae.export_peft(trained(mlae.LoRAConfig(), 0), tmp_path / "peft")
    with pytest.raises(ValueError, match="another backbone"):
        from_adapters(make_tiny_vit(dim=16), [peft_dir])
    with pytest.raises(ValueError, match="at least one"):
        from_adapters(make_tiny_vit(), [])


@pytest.mark.parametrize("kwargs, match", [
    ({"expert_ranks": []}, "ranks"), ({"expert_ranks": [2, 0]}, "ranks"), ({"granularity": "token"}, "granularity"),
    ({"temperature": 0.0}, "temperature"), ({"rank_pattern": {"qkv": [1]}}, "one rank per expert"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlae.MoLEConfig(**kwargs)


def test_mole_layers_are_not_mergeable():
    assert MoLELinear.mergeable is False


def test_train_and_eval_commands(tmp_path, capsys):
    testing = pytest.importorskip("mlae.data.testing")
    pytest.importorskip("mlae.backbones")
    from mlae.cli import main

    root = tmp_path / "vtab"
    testing.make_vtab_folder(root, name="cifar", n_train=32, n_test=24, size=32)
    base = ["train", "--dataset", "vtab:cifar", "--data-root", str(root), "--backbone", "test_vit", "--no-pretrained",
            "--img-size", "32", "--patch-size", "4", "--epochs", "1", "--batch-size", "16", "--warmup-epochs", "0",
            "--threads", "1", "--quiet"]
    assert main([*base, "--method", "lora", "--rank", "2", "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--method", "dmlora", "--out", str(tmp_path / "b")]) == 0
    assert main([*base, "--method", "mole", "--out", str(tmp_path / "m"), "--balance-weight", "0.5",
                 "--temperature", "2", "--experts-from", str(tmp_path / "a" / "adapter.safetensors"),
                 str(tmp_path / "b" / "adapter.safetensors")]) == 0
    metrics = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["aux_loss"] >= 0.5 * 2 * math.log(2) - 1e-4  # −Σ log q_i ≥ N log N, weighted by 0.5
    config = mlae.read_adapter_config(tmp_path / "m" / "adapter.safetensors")
    assert config.temperature == 2 and config.expert_ranks == [2, 8] and len(config.sources) == 2
    out = tmp_path / "eval.json"
    assert main(["eval", "--adapter", str(tmp_path / "m" / "adapter.safetensors"), "--experts", "1",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["experts"] == [1]
    assert main(["eval", "--adapter", str(tmp_path / "m" / "adapter.safetensors"), "--experts", "2"]) == 1
    capsys.readouterr()
    for bad, said in (("a", "must be comma-separated expert numbers >= 0 such as 0,2, not 'a'"),
                      ("0,0", "expert 0 listed twice in '0,0'; list each once")):
        with pytest.raises(SystemExit):  # an argparse usage error
            main(["eval", "--adapter", str(tmp_path / "m" / "adapter.safetensors"), "--experts", bad])
        assert said in capsys.readouterr().err
    assert main([*base, "--method", "mole", "--out", str(tmp_path / "none")]) == 1  # no --experts-from
    # one expert twice (its run folder and its adapter file): no mixture of two
    assert main([*base, "--method", "mole", "--experts-from", str(tmp_path / "a"),
                 str(tmp_path / "a" / "adapter.safetensors"), "--out", str(tmp_path / "twice")]) == 1
    assert "names one expert more than once; list each once" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()
    capsys.readouterr()
    # Gates that weigh the LoRAs per input have no merged or single-LoRA form: one line that says so.
    for fmt in ("merged", "peft"):
        assert main(["export", "--adapter", str(tmp_path / "m" / "adapter.safetensors"), "--format", fmt,
                     "--out", str(tmp_path / f"export_{fmt}")]) == 1
        err = capsys.readouterr().err
        assert err.startswith("mlae: error:") and "mole adapter" in err and "no merged or single-LoRA form" in err
        assert "Traceback" not in err and not (tmp_path / f"export_{fmt}").exists()


def test_a_model_evaluated_with_gradients_on_can_be_deep_copied(experts):
    """Only training's balance loss needs the gate weights' graph: after an eval forward the layer holds none."""
    import copy

    model = mole(experts[1]).eval()
    model(X)
    assert all(not layer.last_weights.requires_grad for layer in mole_layers(model))
    torch.testing.assert_close(copy.deepcopy(model)(X), model(X))
    model.train()
    model(X)
    assert mlae.aux_losses(model)["balance"].requires_grad
