"""QLoRA on CPU: a 4-bit NF4 base really is 4-bit, DPO on it learns, the adapter reloads onto a 4-bit and a
full-precision base, and merging into the full-precision base gives the same outputs."""

import importlib.util
import math

import pytest
import torch

from training import logged_parameter_count, run

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                 reason="needs bitsandbytes: python3 -m pip install -e '.[qlora]' (the dev extra has it)"),
              pytest.mark.usefixtures("fresh_accelerate_state")]  # conftest.py


def load_4bit(folder):
    """The base in 4-bit NF4 as evaluation and chat load it (through ``load_base``, so on one 4-bit path on any CPU)."""
    from dpo_dist.config import load_config
    from dpo_dist.model.load import load_base

    cfg = load_config(None, [f"model.name_or_path={folder}", "model.quantization=4bit", "lora.enabled=true"])
    return load_base(folder, cfg, torch.float32, torch.device("cpu"))


def test_the_policy_base_is_4bit_nf4(tiny_model_dir):
    import bitsandbytes as bnb

    from dpo_dist.config import load_config
    from dpo_dist.model.load import load_policy

    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.quantization=4bit"])
    model, _ = load_policy(cfg, torch.device("cpu"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14  # 7 linear layers x 2 blocks; lm_head stays in full precision
    for layer in layers:
        weight = layer.weight
        assert weight.dtype == torch.uint8 and weight.quant_state.quant_type == "nf4"
        assert weight.numel() * 2 == layer.in_features * layer.out_features, "two 4-bit values per byte"
        assert weight.quant_state.nested, "double quantization of the scales"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_the_policy_log_says_what_was_loaded_and_counts_4bit_weights_as_weights_not_bytes(tiny_model_dir, caplog):
    """The policy loader's line says what the base is (a 4/8-bit one's linear layers, and the dtype of the rest) and
    what the adapters are in. A 4-bit weight packs two values into a byte, so ``numel()`` is half its weights: the
    count it logs is the full-precision model's, in any quantization."""
    counts, said = {}, {}
    for q in ("none", "4bit", "8bit"):
        counts[q] = logged_parameter_count(caplog, tiny_model_dir, **{"model.quantization": q, "lora.enabled": True})
        [said[q]] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("policy ")]
    assert counts["4bit"] == counts["8bit"] == counts["none"], counts
    assert not counts["none"].startswith("0.00M"), counts
    rest = "linear layers and fp32 embeddings, norms and LM head; LoRA adapters in fp32; "
    assert said["4bit"] == (f"policy {tiny_model_dir}: frozen base of 4-bit NF4 (bitsandbytes, double quantization) "
                            f"{rest}{counts['4bit']}")
    assert said["8bit"] == f"policy {tiny_model_dir}: frozen base of 8-bit (bitsandbytes LLM.int8) {rest}{counts['8bit']}"
    assert said["none"] == f"policy {tiny_model_dir}: frozen base in fp32; LoRA adapters in fp32; {counts['none']}"


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit"])
def test_dpo_on_a_4bit_base_learns(tiny_model_dir, data_file, tmp_path, optimizer, capsys):
    result = run(tiny_model_dir, data_file, tmp_path / "out", **{
        "model.quantization": "4bit", "lora.enabled": True, "train.max_steps": 12, "train.learning_rate": 3e-3,
        "train.optimizer": optimizer})
    assert ("\nprecision: frozen base of 4-bit NF4 (bitsandbytes, double quantization) linear layers and fp32 "
            "embeddings, norms and LM head; LoRA adapters in fp32; fp32 compute\n") in capsys.readouterr().out
    losses = [r["loss"] for r in result["records"]]
    assert abs(losses[0] - math.log(2)) < 1e-6  # reference and policy: one 4-bit numerics (one_4bit_path)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses


def test_adapter_reloads_on_4bit_and_full_precision_bases_and_merges(tiny_model_dir, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dpo_dist.publish.export import merge_adapter

    out = tmp_path / "out"
    run(tiny_model_dir, data_file, out, **{"model.quantization": "4bit", "lora.enabled": True, "lora.r": 4,
                                           "train.max_steps": 6, "train.learning_rate": 3e-3})
    adapter = str(out / "model")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    with torch.no_grad():
        base_4bit = load_4bit(tiny_model_dir)(ids).logits
        base_full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(ids).logits
        on_4bit = PeftModel.from_pretrained(load_4bit(tiny_model_dir), adapter)(ids).logits
        on_full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)(ids).logits
    assert (on_4bit - base_4bit).abs().max() > 1e-3, "the adapter changes the 4-bit model"
    # The adapter adds the same update to either base: what separates the two is the base's quantization error.
    quantization_error = (base_4bit - base_full).abs().max()
    assert 0 < quantization_error < 0.5
    assert (on_4bit - on_full).abs().max() <= 1.5 * quantization_error
    torch.testing.assert_close(on_full - base_full, on_4bit - base_4bit, atol=2 * quantization_error.item(), rtol=0)

    merged = merge_adapter(str(out), str(tmp_path / "merged"), dtype="float32")
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, on_full, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(reloaded(ids).logits, on_full, atol=1e-5, rtol=1e-5)
    assert not any("lora" in name for name, _ in reloaded.named_parameters()), "an ordinary model, no adapter left"
