"""launch/merge.py (an adapter merged into its full-precision base, saved in the base's dtype) and the Hub upload."""

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
    # The same base in float16, its config naming no dtype: the dtype is that of its weights.
    base.to(torch.float16).save_pretrained(root / "base16")
    config = json.load(open(root / "base16" / "config.json"))
    assert config.pop("dtype") == "float16" and "torch_dtype" not in config
    json.dump(config, open(root / "base16" / "config.json", "w"))
    base.float()
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


@pytest.mark.slow
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


def saved_dtypes(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        return {weights.get_tensor(k).dtype for k in weights.keys()}


@pytest.mark.slow
def test_default_merge_keeps_the_base_dtype_and_config_next_to_the_run(run_dir):
    """The base says float32 and use_cache true: so does the merged model (loading for training sets use_cache false),
    the log says which dtype and why, and the merged logits are the adapter model's exactly (no rounding)."""
    base_config = json.load(open(run_dir / "base" / "config.json"))
    assert base_config["dtype"] == "float32" and base_config["use_cache"] is True
    done = merge(run_dir / "run")
    assert done.returncode == 0, done.stderr
    assert "merged weights saved in float32 (the base's dtype, from its config)" in done.stdout
    folder = run_dir / "run" / "merged"
    config = json.load(open(folder / "config.json"))
    assert config["dtype"] == "float32" and config["use_cache"] is True
    assert saved_dtypes(folder) == {torch.float32}
    assert not any("lora" in k for k in safe_open(str(folder / "model.safetensors"), "pt").keys())
    torch.testing.assert_close(merged_logits(folder), adapter_logits(run_dir), atol=1e-5, rtol=1e-5)
    assert (folder / "README.md").is_file(), "the model card"


def test_merge_dtype_from_the_base_weights_when_its_config_names_none(run_dir, caplog):
    from dpo_dist.publish.export import merge_adapter

    with caplog.at_level("INFO", logger="dpo_dist.model.merge"):
        merge_adapter(str(run_dir / "run"), str(run_dir / "merged16"), base=str(run_dir / "base16"))
    assert "merged weights saved in float16 (the base's dtype, from its weights)" in caplog.messages
    assert saved_dtypes(run_dir / "merged16") == {torch.float16}
    assert json.load(open(run_dir / "merged16" / "config.json"))["use_cache"] is True


def test_bfloat16_merge_on_request(run_dir, caplog):
    from dpo_dist.publish.export import merge_adapter

    folder = run_dir / "merged-bf16"
    with caplog.at_level("INFO", logger="dpo_dist.model.merge"):
        merge_adapter(str(run_dir / "run"), str(folder), dtype="bfloat16")
    assert "merged weights saved in bfloat16 (as asked)" in caplog.messages
    assert json.load(open(folder / "config.json"))["dtype"] == "bfloat16"
    assert saved_dtypes(folder) == {torch.bfloat16}
    expected = adapter_logits(run_dir)
    # bf16 keeps 8 bits of mantissa: the logits agree to bf16 rounding of the weights, not to float32.
    bound = 0.01 * expected.abs().max().item() + 1e-3
    assert (merged_logits(folder) - expected).abs().max().item() < bound
    assert (merged_logits(run_dir / "base") - expected).abs().max().item() > 3 * bound, "the bound tells merged from base"


@pytest.mark.slow
def test_merge_errors_name_the_problem(run_dir, tmp_path):
    done = merge(tmp_path)
    assert done.returncode == 1 and "no model here" in done.stderr
    done = merge(run_dir / "base")
    assert done.returncode == 1 and "not a LoRA adapter" in done.stderr


class FakeApi:
    """Records what push_to_hub asks of huggingface_hub.HfApi."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


@pytest.fixture
def hub(monkeypatch):
    """A logged-in user (a token) and a recording HfApi in place of huggingface_hub's."""
    import huggingface_hub

    api = FakeApi()
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda token=None: api)
    return api


def test_push_to_hub_uploads_the_model_folder(run_dir, hub):
    from dpo_dist.publish.export import push_to_hub

    url = push_to_hub(str(run_dir / "run"), "me/tiny-dpo", private=True)
    assert url == "https://huggingface.co/me/tiny-dpo"
    assert hub.calls[0] == ("create_repo", "me/tiny-dpo", {"private": True, "exist_ok": True})
    card = (run_dir / "run" / "model" / "README.md").read_text()  # peft's blank template replaced before the upload
    assert "[More Information Needed]" not in card and 'PeftModel.from_pretrained(base, "me/tiny-dpo")' in card
    assert hub.calls[1] == ("upload_folder", {"folder_path": str(run_dir / "run" / "model"), "repo_id": "me/tiny-dpo",
                                              "revision": None, "commit_message": "Upload DPO-trained LoRA adapter (dpo-dist)"})
    with pytest.raises(FileNotFoundError, match="no model here"):
        push_to_hub(str(run_dir), "me/nothing")


def test_push_script_private_branch_and_message(run_dir, hub, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "launch"))
    import push

    status = push.main([str(run_dir / "run"), "me/tiny-dpo", "--private", "--revision", "beta-0.1",
                        "--commit_message", "beta 0.1, 2 epochs"])
    assert status == 0 and "pushed to https://huggingface.co/me/tiny-dpo (branch beta-0.1)" in capsys.readouterr().out
    assert hub.calls == [
        ("create_repo", "me/tiny-dpo", {"private": True, "exist_ok": True}),
        ("create_branch", "me/tiny-dpo", {"branch": "beta-0.1", "exist_ok": True}),
        ("upload_folder", {"folder_path": str(run_dir / "run" / "model"), "repo_id": "me/tiny-dpo",
                           "revision": "beta-0.1", "commit_message": "beta 0.1, 2 epochs"}),
    ]
    hub.calls.clear()
    assert push.main([str(run_dir / "run"), "me/tiny-dpo"]) == 0
    assert hub.calls[0][2] == {"private": False, "exist_ok": True} and len(hub.calls) == 2, "public, on main"


def test_merge_script_pushes_private_to_a_branch_with_a_message(run_dir, hub, capsys, monkeypatch):
    """merge.py --push_to_hub passes --private, --revision and --commit_message on, as push.py does; the merged
    folder is what is uploaded. Without --push_to_hub those flags are an error, before anything is merged."""
    monkeypatch.syspath_prepend(os.path.join(ROOT, "launch"))
    import merge as merge_script

    out = run_dir / "merged-pushed"
    status = merge_script.main([str(run_dir / "run"), "--out", str(out), "--push_to_hub", "me/tiny-merged",
                                "--private", "--revision", "beta-0.1", "--commit_message", "merged, beta 0.1"])
    assert status == 0, capsys.readouterr().err
    assert "pushed to https://huggingface.co/me/tiny-merged (branch beta-0.1)" in capsys.readouterr().out
    assert hub.calls == [
        ("create_repo", "me/tiny-merged", {"private": True, "exist_ok": True}),
        ("create_branch", "me/tiny-merged", {"branch": "beta-0.1", "exist_ok": True}),
        ("upload_folder", {"folder_path": str(out), "repo_id": "me/tiny-merged", "revision": "beta-0.1",
                           "commit_message": "merged, beta 0.1"}),
    ]
    assert 'AutoModelForCausalLM.from_pretrained("me/tiny-merged")' in (out / "README.md").read_text()
    hub.calls.clear()
    assert merge_script.main([str(run_dir / "run"), "--out", str(out), "--push_to_hub", "me/tiny-merged"]) == 0
    assert hub.calls == [("create_repo", "me/tiny-merged", {"private": False, "exist_ok": True}),
                         ("upload_folder", {"folder_path": str(out), "repo_id": "me/tiny-merged", "revision": None,
                                            "commit_message": "Upload DPO-trained model (dpo-dist)"})]
    hub.calls.clear()
    capsys.readouterr()
    assert merge_script.main([str(run_dir / "run"), "--out", str(tmp := run_dir / "not-merged"), "--revision", "b"]) == 2
    assert "go with --push_to_hub" in capsys.readouterr().err and not tmp.exists() and hub.calls == []


def test_push_without_a_token_says_how_to_log_in(run_dir, tmp_path, monkeypatch):
    """No HF_TOKEN and no saved token (an empty HF_HOME): one line on stderr, no traceback, nothing written."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH")}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    card = run_dir / "run" / "model" / "README.md"
    before = card.read_text() if card.exists() else None
    done = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "push.py"), str(run_dir / "run"), "me/x"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "no Hugging Face token" in done.stderr and "hf auth login" in done.stderr and "HF_TOKEN" in done.stderr
    assert (card.read_text() if card.exists() else None) == before
