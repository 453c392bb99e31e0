"""The fused LoRA linear (dpo_dist.model.lora_linear) computes what peft computes, and steps aside where it can't."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from dpo_dist.model.lora_linear import LoraLinearFunction, fuse_lora
from tests.tiny import make_llama


def lora_pair(seed: int = 0, **lora):
    """The same LoRA model twice: peft's own forward, and fused. B is random (peft starts it at 0, which would hide
    any mistake in the B path)."""
    torch.manual_seed(seed)
    base = make_llama(400, seed)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM", **lora)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    fused = copy.deepcopy(peft_model)
    return peft_model, fused, fuse_lora(fused)


def forward_backward(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids).logits
    (logits.float().square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def test_function_matches_the_formula_and_its_gradients():
    """y = x W^T + b + s (x A^T) B^T, and every gradient, against autograd of that formula (float64)."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    lb = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: LoraLinearFunction.apply(*t, 2.5), (x, w, b, a, lb))
    expected = x @ w.T + b + 2.5 * (x @ a.T) @ lb.T
    torch.testing.assert_close(LoraLinearFunction.apply(x, w, b, a, lb, 2.5), expected)
    # frozen base (what LoRA trains): no weight gradient is computed, the others are
    w.requires_grad_(False)
    out = LoraLinearFunction.apply(x, w, None, a, lb, 2.5)
    out.sum().backward()
    assert w.grad is None and a.grad is not None and lb.grad is not None and x.grad is not None


def test_fused_model_equals_peft_forward_and_gradients():
    peft_model, fused, count = lora_pair()
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLinear)]
    assert count == len(layers) > 0
    ids = torch.randint(0, 300, (2, 9))
    logits, grads = forward_backward(peft_model, ids)
    fused_logits, fused_grads = forward_backward(fused, ids)
    torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == fused_grads.keys() and any("lora_A" in n for n in grads)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def calls(monkeypatch):
    seen = []
    apply = LoraLinearFunction.apply
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *a: seen.append(1) or apply(*a))
    return seen


def test_disabled_adapter_gives_the_base_and_skips_the_fused_path(monkeypatch):
    """The online reference of a LoRA run is the policy with its adapters off: it must be the base model."""
    peft_model, fused, _ = lora_pair()
    ids = torch.randint(0, 300, (1, 7))
    seen = calls(monkeypatch)
    with torch.no_grad(), fused.disable_adapter():
        off = fused(input_ids=ids).logits
    assert seen == []
    with torch.no_grad():
        with peft_model.disable_adapter():
            expected = peft_model(input_ids=ids).logits
        on = fused(input_ids=ids).logits
    torch.testing.assert_close(off, expected)
    assert seen and not torch.allclose(on, off)


def test_steps_aside_under_autocast_and_mixed_dtypes(monkeypatch):
    peft_model, fused, _ = lora_pair()
    ids = torch.randint(0, 300, (1, 7))
    seen = calls(monkeypatch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused(input_ids=ids).logits
        expected = peft_model(input_ids=ids).logits
    assert seen == []
    torch.testing.assert_close(got, expected)


def test_merged_and_dora_layers_keep_peft_path(monkeypatch):
    _, dora, count = lora_pair(use_dora=True)
    assert count == 0  # DoRA is a LoRA variant: peft's forward
    peft_model, fused, _ = lora_pair()
    ids = torch.randint(0, 300, (1, 7))
    seen = calls(monkeypatch)
    fused.merge_adapter()
    with torch.no_grad():
        merged = fused(input_ids=ids).logits
        peft_model.merge_adapter()
        expected = peft_model(input_ids=ids).logits
    assert seen == []
    torch.testing.assert_close(merged, expected)


def test_hooked_base_layer_keeps_peft_path(monkeypatch):
    """A hook on the base layer (how ZeRO-3 gathers a partitioned weight) must run: the fused path would skip it."""
    _, fused, _ = lora_pair()
    hooked = []
    for module in fused.modules():
        if isinstance(module, LoraLinear):
            module.base_layer.register_forward_pre_hook(lambda m, a: hooked.append(1))
    seen = calls(monkeypatch)
    with torch.no_grad():
        fused(input_ids=torch.randint(0, 300, (1, 5)))
    assert hooked and seen == []
