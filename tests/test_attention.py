"""The attention path switch: both kernels compute the same function, and `auto` picks by device and precision."""
import pytest
import torch

import mlae
from mlae.attention import resolve_attention, set_attention
from conftest import make_tiny_vit


def _logits_and_grads(path: str, precision: str):
    model = make_tiny_vit(depth=2, dim=32, seed=3)
    mlae.apply(model, mlae.MLAEConfig(experts=4, dropout=0.0))
    with torch.no_grad():  # a non-zero update, so that the adapter gradients are not trivially equal
        for name, p in model.named_parameters():
            if name.endswith(".lora_B"):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    assert set_attention(model, path, precision=precision) == path
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model(x)
    logits.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.float().detach(), grads


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 3e-2)])
def test_fused_and_math_paths_agree(precision, tol):
    torch.manual_seed(0)  # drop-path / masks are off (p = 0, no drop-path), but keep the RNG equal anyway
    fused, g_fused = _logits_and_grads("fused", precision)
    torch.manual_seed(0)
    math, g_math = _logits_and_grads("math", precision)
    scale = fused.abs().max()
    assert (fused - math).abs().max() <= tol * scale
    assert g_fused.keys() == g_math.keys() and any(n.endswith(".lora_A") for n in g_fused)
    for name in g_fused:
        ref = g_fused[name].abs().max().clamp_min(1e-12)
        assert (g_fused[name] - g_math[name]).abs().max() <= tol * ref * 4, name


def test_set_attention_switches_every_timm_attention_module():
    model = make_tiny_vit(depth=3)
    assert set_attention(model, "math") == "math"
    assert [b.attn.fused_attn for b in model.blocks] == [False] * 3
    assert set_attention(model, "fused") == "fused"
    assert [b.attn.fused_attn for b in model.blocks] == [True] * 3


def test_auto_is_math_only_on_cpu_bf16():
    assert resolve_attention("auto", "cpu", "bf16") == "math"
    assert resolve_attention("auto", "cpu", "fp32") == "fused"
    assert resolve_attention("auto", "cuda", "bf16") == "fused"
    assert resolve_attention("fused", "cpu", "bf16") == "fused"
    with pytest.raises(ValueError, match="attention must be one of"):
        resolve_attention("flash", "cpu", "fp32")


def test_a_model_without_timm_attention_is_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    assert set_attention(model, "math") is None


def test_a_precision_name_it_does_not_know_is_refused():
    """"bfloat16" for "bf16" would otherwise pick the fused path, the slow one on a CPU in bf16 training."""
    import pytest

    with pytest.raises(ValueError, match="precision must be bf16 or fp32.*'bfloat16'"):
        resolve_attention("auto", "cpu", "bfloat16")
