"""QLoRA on any CPU: reference and policy use one 4-bit numerics, whatever bitsandbytes thinks of the CPU.

bitsandbytes 0.50 reroutes a ``Linear4bit`` on a CPU with AVX512-BF16 (Sapphire Rapids and newer) when it runs in
eval mode without grad: it repacks the weight for a bf16 kernel (``_convert_weight_packed_for_cpu``). That crashes on
layers narrower than the quantization block, gives the reference other numerics than the policy, and leaves the
weight repacked for a kernel with no backward. ``dpo_dist.model.load.one_4bit_path`` switches the rerouting off.
These tests make bitsandbytes believe the CPU has (or lacks) AVX512-BF16 and trap the repacking, so they test both
branches on every machine.
"""

import importlib.util
import math

import pytest
import torch

from training import run

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                 reason="needs bitsandbytes: python3 -m pip install -e '.[qlora]' (the dev extra has it)"),
              pytest.mark.usefixtures("fresh_accelerate_state")]  # conftest.py


class Repacked(RuntimeError):
    """Raised by the trapped ``_convert_weight_packed_for_cpu``."""


def simulate_cpu(monkeypatch, avx512bf16: bool) -> list:
    """Layers built from now on believe the CPU has (or lacks) AVX512-BF16; repacking a weight raises ``Repacked``.
    Returns the list of the trapped calls' weight shapes."""
    import bitsandbytes.functional
    import bitsandbytes.nn.modules

    calls = []

    def trap(weight, quant_state, *args, **kwargs):
        calls.append(tuple(quant_state.shape))
        raise Repacked(f"bitsandbytes repacked a 4-bit weight of shape {tuple(quant_state.shape)} for its bf16 CPU kernel")

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: avx512bf16)
    monkeypatch.setattr(bitsandbytes.nn.modules, "_convert_weight_packed_for_cpu", trap)
    monkeypatch.setattr(bitsandbytes.functional, "_convert_weight_packed_for_cpu", trap)
    return calls


def linear_4bit_layers(model):
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def pair_batch(n=6, seed=0):
    import random

    from dpo_dist.data.collate import PreferenceCollator

    rng = random.Random(seed)
    pairs = [{"prompt_input_ids": [rng.randrange(5, 90) for _ in range(rng.randint(2, 10))],
              "chosen_input_ids": [rng.randrange(5, 90) for _ in range(rng.randint(1, 8))],
              "rejected_input_ids": [rng.randrange(5, 90) for _ in range(rng.randint(1, 8))]} for _ in range(n)]
    return PreferenceCollator(pad_token_id=0)(pairs)


@pytest.mark.parametrize("avx512bf16", [True, False], ids=["avx512bf16", "no-avx512bf16"])
def test_the_simulation_steers_bitsandbytes(tiny_model_dir, monkeypatch, avx512bf16):
    """Without our loader, a 4-bit model believed to run on AVX512-BF16 reaches the repacking in its first eval/no-grad
    forward (so the test below can fail); believed to run on another CPU, it does not."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    calls = simulate_cpu(monkeypatch, avx512bf16)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=config, device_map={"": "cpu"})
    assert [layer.support_avx512bf16_for_cpu for layer in linear_4bit_layers(model)] == [avx512bf16] * 14
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        model.train()
        model(ids)  # training mode: never rerouted
        assert calls == []
        model.eval()
        if avx512bf16:
            with pytest.raises(Repacked):
                model(ids)
            assert calls == [(32, 32)]  # the first query projection: 32 inputs, under the 64-wide block
        else:
            model(ids)
            assert calls == []


@pytest.mark.parametrize("avx512bf16", [True, False], ids=["avx512bf16", "no-avx512bf16"])
def test_reference_and_policy_share_one_4bit_numerics(tiny_model_dir, monkeypatch, avx512bf16):
    """Through our loader: the reference pass (eval, no grad, adapters off) never repacks a weight and gives exactly
    the policy's log-probs at step 0, so the loss is ln 2; a reference pass between two policy passes changes neither
    their log-probs nor their gradients (no weight is left repacked for a kernel without backward)."""
    from dpo_dist.config import load_config
    from dpo_dist.model.load import load_policy
    from dpo_dist.train.logprobs import pair_logps
    from dpo_dist.train.loss import preference_loss
    from dpo_dist.train.reference import as_reference

    calls = simulate_cpu(monkeypatch, avx512bf16)
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.quantization=4bit", "lora.enabled=true"])
    model, _ = load_policy(cfg, torch.device("cpu"))
    layers = linear_4bit_layers(model)
    assert len(layers) == 14 and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    batch = pair_batch()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}

    def policy_pass():
        model.train()
        model.zero_grad()
        policy = pair_logps(model, batch)
        policy.chosen_logps.sum().add(policy.rejected_logps.sum()).backward()
        return policy, {n: p.grad.clone() for n, p in lora.items()}

    before, grads_before = policy_pass()
    with as_reference(model):
        reference = pair_logps(model, batch)
    after, grads_after = policy_pass()

    assert calls == []
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in layers)
    torch.testing.assert_close(reference.chosen_logps, before.chosen_logps.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(reference.rejected_logps, before.rejected_logps.detach(), atol=1e-6, rtol=0)
    losses, _, _ = preference_loss(before.chosen_logps.detach(), before.rejected_logps.detach(),
                                   reference.chosen_logps, reference.rejected_logps, beta=0.1)
    assert losses.shape == (6,) and (losses - math.log(2)).abs().max() < 1e-6
    assert torch.equal(after.chosen_logps, before.chosen_logps) and torch.equal(after.rejected_logps, before.rejected_logps)
    assert any(g.abs().sum() > 0 for n, g in grads_before.items() if "layers.0." in n), "the first block's adapters learn"
    for name, grad in grads_before.items():
        torch.testing.assert_close(grads_after[name], grad, atol=1e-7, rtol=1e-6, msg=name)


@pytest.mark.parametrize("reference_mode, attention_layout", [("online", "segmented"), ("precomputed", "auto")])
def test_qlora_training_on_a_believed_avx512bf16_cpu_starts_at_ln2(tiny_model_dir, data_file, tmp_path, monkeypatch,
                                                                   reference_mode, attention_layout):
    """The whole trainer (reference pass, evaluation in eval mode, gradient checkpointing as the single-device
    fallback uses it; attention laid out segment by segment in one case) on a CPU believed to have AVX512-BF16:
    nothing is repacked, step 1 is ln 2 to 1e-6, and it learns. The adapter loaded back onto a 4-bit base (as
    evaluation and chat load it) gives the same logits in eval/no-grad as through the training path."""
    from dpo_dist.model.trained import load_trained

    calls = simulate_cpu(monkeypatch, True)
    result = run(tiny_model_dir, data_file, tmp_path / "out", **{
        "model.quantization": "4bit", "lora.enabled": True, "model.gradient_checkpointing": True,
        "reference.mode": reference_mode, "train.max_steps": 6, "train.learning_rate": 3e-3, "train.eval_every": 3,
        "train.attention_layout": attention_layout})
    losses = [r["loss"] for r in result["records"]]
    assert calls == []
    assert abs(losses[0] - math.log(2)) < 1e-6, losses[0]
    assert losses[-1] < losses[0] - 0.02, losses

    trained = load_trained(str(tmp_path / "out"), device=torch.device("cpu"))  # the run's quantization: 4-bit
    assert trained.is_adapter and len(linear_4bit_layers(trained.model)) == 14
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        served = trained.model(ids).logits
    trained.model.train()
    embeds = trained.model.get_input_embeddings()(ids).detach().requires_grad_()
    trained_path = trained.model(inputs_embeds=embeds).logits  # grad through the 4-bit layers: MatMul4Bit
    assert trained_path.grad_fn is not None and calls == []
    torch.testing.assert_close(served, trained_path.detach(), atol=1e-6, rtol=0)
