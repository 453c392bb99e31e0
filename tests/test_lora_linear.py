"""The fused LoRA linear (dpo_dist.model.lora_linear) computes what peft computes, and steps aside where it can't."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import AutoModelForCausalLM

from dpo_dist.model.lora_linear import GROUPED_MODEL_TYPES, LoraGroupFunction, LoraLinearFunction, fuse_lora
from tests.test_exactness import tiny_config
from tests.tiny import make_llama


def lora_pair(seed: int = 0, base=None, **lora):
    """The same LoRA model twice: peft's own forward, and fused. B is random (peft starts it at 0, which would hide
    any mistake in the B path)."""
    torch.manual_seed(seed)
    base = make_llama(400, seed) if base is None else base
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


def calls(monkeypatch, function=None):
    """Count the calls of the fused functions (both, or the one named)."""
    seen = []
    for fn in [function] if function else [LoraLinearFunction, LoraGroupFunction]:
        monkeypatch.setattr(fn, "apply", (lambda fn, apply: lambda *a: seen.append(fn) or apply(*a))(fn, fn.apply))
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


def test_group_function_matches_the_formula_and_its_gradients():
    """Three layers of one input (other ranks, scalings and widths; one with a bias), against autograd of the
    formula (float64); a frozen weight gets no gradient."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 5, 6, **f64)
    outs, ranks, scalings = (7, 3, 4), (2, 3, 1), (2.5, 0.5, 4.0)
    weights = [torch.randn(o, 6, **f64) for o in outs]
    biases = [None, torch.randn(3, **f64), None]
    lora_as = [torch.randn(r, 6, **f64) for r in ranks]
    lora_bs = [torch.randn(o, r, **f64) for o, r in zip(outs, ranks)]
    inputs = (x, *weights, biases[1], *lora_as, *lora_bs)

    def grouped(x, w0, w1, w2, b1, a0, a1, a2, lb0, lb1, lb2):
        return LoraGroupFunction.apply(x, scalings, w0, w1, w2, None, b1, None, a0, a1, a2, lb0, lb1, lb2)

    assert torch.autograd.gradcheck(grouped, inputs)
    for got, w, b, a, lb, s in zip(grouped(*inputs), weights, biases, lora_as, lora_bs, scalings):
        torch.testing.assert_close(got, x @ w.T + (0 if b is None else b) + s * (x @ a.T) @ lb.T)
    weights[0].requires_grad_(False)
    sum(out.sum() for out in grouped(*inputs)).backward()
    assert weights[0].grad is None and weights[1].grad is not None
    assert all(t.grad is not None for t in (x, *lora_as, *lora_bs, biases[1]))


@pytest.mark.parametrize("model_type", GROUPED_MODEL_TYPES)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_groups_equal_peft_on_each_model_type(monkeypatch, model_type, checkpointing):
    """Each packed model type: q/k/v and gate/up computed as groups give peft's logits and gradients (under
    gradient checkpointing too: the recomputed forward goes through the groups again), and in a no-grad pass."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(tiny_config(model_type, None), attn_implementation="sdpa")
    peft_model, fused, count = lora_pair(base=base)
    layers = base.config.num_hidden_layers
    assert count == 7 * layers
    for model in (peft_model, fused):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    ids = torch.randint(0, base.config.vocab_size, (2, 9))
    seen = calls(monkeypatch)
    fused_logits, fused_grads = forward_backward(fused, ids)
    assert seen.count(LoraGroupFunction) == 2 * layers * (2 if checkpointing else 1)
    assert seen.count(LoraLinearFunction) == 2 * layers * (2 if checkpointing else 1)  # o_proj, down_proj
    logits, grads = forward_backward(peft_model, ids)
    torch.testing.assert_close(fused_logits, logits, rtol=1e-5, atol=1e-6)
    assert grads.keys() == fused_grads.keys()
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(fused(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def attention_projections(model):
    attention = next(m for m in model.modules() if hasattr(m, "q_proj"))
    return attention.q_proj, attention.k_proj, attention.v_proj


def test_a_member_on_another_input_is_computed_alone(monkeypatch):
    """A model that gives the keys another input than the queries gets each layer's own result; the values still
    take the group's output, and the next pass computes the group again."""
    peft_model, fused, _ = lora_pair()
    (q, k, v), (pq, pk, pv) = attention_projections(fused), attention_projections(peft_model)
    x, y = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    seen = calls(monkeypatch)
    with torch.no_grad():
        got = q(x), k(y), v(x)
        torch.testing.assert_close(got[0], pq(x))
        torch.testing.assert_close(got[1], pk(y))
        torch.testing.assert_close(got[2], pv(x))
        assert seen == [LoraGroupFunction, LoraLinearFunction]
        q(x), k(x), v(x)
    assert seen[2:] == [LoraGroupFunction]


def test_another_input_under_gradient_checkpointing_recomputes_the_same_calls(monkeypatch):
    """Checkpointing recomputes the forward in the backward and needs the same saved tensors: a member computed
    alone in the forward is computed alone again. Gradients equal peft's without checkpointing."""
    peft_model, fused, _ = lora_pair()
    x, y = torch.randn(2, 3, 32), torch.randn(2, 3, 32)

    def loss(model, checkpoint):
        q, k, v = attention_projections(model)
        a, b = x.clone().requires_grad_(), y.clone().requires_grad_()
        outs = (torch.utils.checkpoint.checkpoint(lambda a, b: (q(a), k(b), v(a)), a, b, use_reentrant=False)
                if checkpoint else (q(a), k(b), v(a)))
        sum((o * (i + 1)).sum() for i, o in enumerate(outs)).backward()
        return [a.grad, b.grad] + [p.grad for layer in (q, k, v) for p in layer.parameters() if p.requires_grad]

    seen = calls(monkeypatch)
    got = loss(fused, checkpoint=True)
    assert seen == [LoraGroupFunction, LoraLinearFunction] * 2  # the forward, then its recomputation
    for g, e in zip(got, loss(peft_model, checkpoint=False), strict=True):
        torch.testing.assert_close(g, e)


def test_an_output_the_loss_does_not_use_gives_no_gradient(monkeypatch):
    """As in peft, where the keys' layer is never called: its LoRA weights get no gradient (None, not zeros, which
    AdamW would still decay and move); the others get peft's."""
    peft_model, fused, _ = lora_pair()
    x = torch.randn(2, 3, 32)
    grads = []
    for model in (fused, peft_model):
        model.zero_grad(set_to_none=True)
        q, k, v = attention_projections(model)
        (q(x).sum() + 2 * v(x).sum()).backward()
        grads.append([p.grad for layer in (q, k, v) for p in layer.parameters() if p.requires_grad])
    assert [g is None for g in grads[0]] == [False, False, True, True, False, False]
    for g, e in zip(*grads):
        if e is not None:
            torch.testing.assert_close(g, e)


def test_groups_only_in_verified_model_types_and_at_load(tmp_path, monkeypatch):
    """fuse_lora groups only the model types the tests compare with peft; the policy loader groups them."""
    from dpo_dist.config import load_config
    from dpo_dist.model.load import load_policy
    from tests.tiny import make_tokenizer

    torch.manual_seed(0)
    other = make_llama(400)
    other.config.model_type = "not_verified"
    _, fused, count = lora_pair(base=other)
    seen = calls(monkeypatch)
    with torch.no_grad():
        fused(input_ids=torch.randint(0, 300, (1, 5)))
    assert count > 0 and set(seen) == {LoraLinearFunction}

    tokenizer = make_tokenizer("nobos")
    make_llama(len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    policy, _ = load_policy(load_config(None, [f"model.name_or_path={tmp_path}", "lora.enabled=true"]), torch.device("cpu"))
    assert all("_lora_group" in m.__dict__ for m in attention_projections(policy))


@pytest.mark.parametrize("change", ["in-place", "grad-mode"])
def test_the_same_tensor_changed_since_is_computed_alone(monkeypatch, change):
    """The keys' layer gets the queries' input tensor, but modified in place since, or in another grad mode: its own
    result, not the group's."""
    peft_model, fused, _ = lora_pair()
    (q, k, _), (_, pk, _) = attention_projections(fused), attention_projections(peft_model)
    x = torch.randn(2, 3, 32)
    seen = calls(monkeypatch)
    with torch.no_grad():
        q(x)
    if change == "in-place":
        x.mul_(2)
    with torch.set_grad_enabled(change == "grad-mode"):
        keys = k(x)
    assert seen == [LoraGroupFunction, LoraLinearFunction]
    assert keys.requires_grad == (change == "grad-mode")
    torch.testing.assert_close(keys, pk(x))


def test_a_pass_stopped_between_members_leaves_nothing_behind(monkeypatch):
    """An exception after the queries (keys and values never taken): the next pass computes its own group."""
    peft_model, fused, _ = lora_pair()
    (q, k, v), (pq, pk, pv) = attention_projections(fused), attention_projections(peft_model)
    x, y = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    seen = calls(monkeypatch)
    with torch.no_grad():
        q(x)
        got = q(y), k(y), v(y)
        for out, layer in zip(got, (pq, pk, pv)):
            torch.testing.assert_close(out, layer(y))
    assert seen == [LoraGroupFunction, LoraGroupFunction]
    with torch.inference_mode():  # tensors that keep no version counter
        z = torch.randn(2, 3, 32)
        got = q(z), k(z), v(z)
        for out, layer in zip(got, (pq, pk, pv)):
            torch.testing.assert_close(out, layer(z))
    assert seen[2:] == [LoraGroupFunction]
