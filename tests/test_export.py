"""launch/merge.py (an adapter merged into its full-precision base, saved 16-bit) and the thin Hub upload."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from tiny import make_llama, make_tokenizer
from training import ROOT

MERGE = os.path.join(ROOT, "launch", "merge.py")
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 40, 41]])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run's output folder as the trainer leaves it: config.yaml naming the base, model/ the adapter (random,
    non-zero LoRA weights, so merging changes the model)."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("export")
    tokenizer = make_tokenizer("chatml")
    base = make_llama(len(tokenizer), seed=4)
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).save_pretrained(
        root / "run" / "model")
    tokenizer.save_pretrained(root / "run" / "model")
    (root / "run" / "config.yaml").write_text(f"model:\n  name_or_path: {root / 'base'}\n")
    return root


def adapter_logits(root):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / "run" / "model")
    with torch.no_grad():
        return model.eval()(IDS).logits


def merged_logits(folder):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(IDS).logits


def merge(*args):
    return subprocess.run([sys.executable, MERGE, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_merged_model_gives_the_adapter_models_logits(run_dir):
    done = merge(run_dir / "run", "--dtype", "float32", "--out", run_dir / "merged32")
    assert done.returncode == 0, done.stderr
    expected = adapter_logits(run_dir)
    with torch.no_grad():
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(run_dir / "base").eval()(IDS).logits
    assert (expected - base).abs().max() > 1e-2, "the adapter changes the model"
    torch.testing.assert_close(merged_logits(run_dir / "merged32"), expected, atol=1e-5, rtol=1e-5)
    assert not os.path.exists(run_dir / "merged32" / "adapter_config.json"), "an ordinary model folder"
    assert os.path.isfile(run_dir / "merged32" / "tokenizer_config.json")


def test_default_merge_saves_a_16_bit_model_next_to_the_run(run_dir):
    done = merge(run_dir / "run")
    assert done.returncode == 0, done.stderr
    folder = run_dir / "run" / "merged"
    assert json.load(open(folder / "config.json"))["dtype"] == "bfloat16"
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.bfloat16}
    assert not any("lora" in k for k in safe_open(str(folder / "model.safetensors"), "pt").keys())
    expected = adapter_logits(run_dir)
    # bf16 keeps 8 bits of mantissa: the logits agree to bf16 rounding of the weights, not to float32.
    bound = 0.01 * expected.abs().max().item() + 1e-3
    assert (merged_logits(folder) - expected).abs().max().item() < bound
    assert (merged_logits(run_dir / "base") - expected).abs().max().item() > 3 * bound, "the bound tells merged from base"


def test_merge_errors_name_the_problem(run_dir, tmp_path):
    done = merge(tmp_path)
    assert done.returncode == 1 and "no model here" in done.stderr
    done = merge(run_dir / "base")
    assert done.returncode == 1 and "not a LoRA adapter" in done.stderr


def test_push_to_hub_uploads_the_model_folder(run_dir):
    from dpo_dist.model.export import push_to_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))

    url = push_to_hub(str(run_dir / "run"), "me/tiny-dpo", private=True, api=FakeApi())
    assert url == "https://huggingface.co/me/tiny-dpo"
    assert calls[0] == ("create_repo", "me/tiny-dpo", {"private": True, "exist_ok": True})
    assert calls[1][1]["folder_path"] == str(run_dir / "run" / "model") and calls[1][1]["repo_id"] == "me/tiny-dpo"
    with pytest.raises(FileNotFoundError, match="no model here"):
        push_to_hub(str(run_dir), "me/nothing", api=FakeApi())
