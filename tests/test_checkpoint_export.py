"""A checkpoint pushed with launch/push.py: its weights exported to <checkpoint>/model (adapter or full model,
tokenizer, a card for that step), and a full fine-tune's saved config with the base's use_cache and dropout."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_export import FakeApi, hub  # noqa: F401  (hub: the logged-in user and recording HfApi fixture)
from training import ROOT, read_jsonl, reset_accelerate_state, run, save_tiny_model

SETTINGS = {"train.max_steps": 4, "train.save_every": 2, "train.eval_every": 2}


@pytest.fixture(scope="module")
def runs(data_file, tmp_path_factory):
    """A base whose config says use_cache true and attention_dropout 0.1 (training turns both off), and a LoRA and a
    full run of 4 steps on it, each keeping checkpoint-2 and checkpoint-4."""
    root = tmp_path_factory.mktemp("checkpoint-export")
    base = save_tiny_model(str(root / "base"))
    config = json.load(open(os.path.join(base, "config.json")))
    config["attention_dropout"] = 0.1
    json.dump(config, open(os.path.join(base, "config.json"), "w"))
    for name, lora in (("lora", True), ("full", False)):
        reset_accelerate_state()
        run(base, data_file, root / name, **SETTINGS, **{"lora.enabled": lora, "lora.r": 4})
    reset_accelerate_state()
    return root


@pytest.fixture
def push(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "launch"))
    import push as push_script

    return push_script.main


def tensors(path):
    return load_file(str(path))


def card_tables(path):
    from test_card import parse

    return parse(path)


def test_a_full_fine_tunes_config_keeps_the_bases_use_cache_and_dropout(runs):
    base = json.load(open(runs / "base" / "config.json"))
    assert base["use_cache"] is True and base["attention_dropout"] == 0.1
    saved = json.load(open(runs / "full" / "model" / "config.json"))
    assert saved["use_cache"] is True and saved["attention_dropout"] == 0.1
    assert {k: v for k, v in saved.items() if k not in ("use_cache", "attention_dropout")} == \
           {k: v for k, v in base.items() if k not in ("use_cache", "attention_dropout")}
    from transformers import AutoModelForCausalLM

    from dpo_dist.config import load_config
    from dpo_dist.model.load import load_policy

    assert AutoModelForCausalLM.from_pretrained(str(runs / "full" / "model")).config.use_cache is True
    policy, _ = load_policy(load_config(str(runs / "full" / "config.yaml")), torch.device("cpu"))
    assert policy.config.use_cache is False and policy.config.attention_dropout == 0.0, "training still turns them off"


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_pushing_a_checkpoint_exports_its_weights_with_a_card_for_its_step(kind, runs, hub, push, capsys):
    weights = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    checkpoint = runs / kind / "checkpoint-2"
    status = push([str(checkpoint), f"me/tiny-{kind}", "--revision", "step-2"])
    assert status == 0, capsys.readouterr().err
    out = checkpoint / "model"
    assert f"the weights of {checkpoint}: {out}" in capsys.readouterr().out
    kind_name = "LoRA adapter" if kind == "lora" else "model"
    assert hub.calls[-1] == ("upload_folder", {"folder_path": str(out), "repo_id": f"me/tiny-{kind}",
                                               "revision": "step-2",
                                               "commit_message": f"Upload DPO-trained {kind_name} (dpo-dist)"})
    assert (out / "tokenizer_config.json").is_file()
    # The weights are the checkpoint's (the LoRA ones under peft's saved names), not the final model's.
    stored, final = tensors(checkpoint / "model.safetensors"), tensors(runs / kind / "model" / weights)
    exported = tensors(out / weights)
    assert sorted(exported) == sorted(final)
    if kind == "lora":
        assert {k.replace(".default.", ".") for k in stored} == set(exported)
        assert all(torch.equal(exported[k.replace(".default.", ".")], v) for k, v in stored.items())
    else:
        assert all(torch.equal(exported[k], v) for k, v in stored.items())
        config = json.load(open(out / "config.json"))
        assert config == json.load(open(runs / kind / "model" / "config.json")) and config["use_cache"] is True
    assert any(not torch.equal(exported[k], final[k]) for k in final), "step 2's weights, not step 4's"
    # The card: step 2, its metrics and the eval at step 2, loading code for the Hub repository, no eval results.
    metadata, text, rows = card_tables(out / "README.md")
    assert metadata["library_name"] == ("peft" if kind == "lora" else "transformers")
    assert "A checkpoint: the weights after optimizer step 2 of the run, not its final model." in text
    assert f'from_pretrained(base, "me/tiny-{kind}")' in text if kind == "lora" else \
        'AutoModelForCausalLM.from_pretrained("me/tiny-full")' in text
    step2 = next(r for r in read_jsonl(runs / kind / "metrics.jsonl") if r["step"] == 2)
    assert rows["Training metrics"]["loss"] == [f"{step2['loss']:.4f}", f"{step2['eval/loss']:.4f}"]
    assert rows["Training metrics"]["reward margin"] == [f"{step2['rewards/margins']:.4f}",
                                                         f"{step2['eval/rewards/margins']:.4f}"]
    assert "| metric | train (step 2) | eval (step 2) |" in text and "The weights of checkpoint-2, after step 2" in text
    assert rows["Hyperparameters"]["optimizer steps run"] == ["2"]
    assert "evaluates the run's model/, not checkpoint-2" in text


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_the_last_checkpoints_export_is_the_final_model(kind, runs):
    """checkpoint-4 holds the weights model/ got: exported, the same tensors (and, full, the same config)."""
    from dpo_dist.publish.export import export_checkpoint

    weights = "adapter_model.safetensors" if kind == "lora" else "model.safetensors"
    out = export_checkpoint(str(runs / kind / "checkpoint-4"))
    exported, final = tensors(os.path.join(out, weights)), tensors(runs / kind / "model" / weights)
    assert sorted(exported) == sorted(final) and all(torch.equal(exported[k], final[k]) for k in final)
    if kind == "full":
        assert json.load(open(os.path.join(out, "config.json"))) == json.load(open(runs / kind / "model" / "config.json"))


def test_a_ddp_checkpoint_and_a_checkpoint_that_does_not_fit(runs, tmp_path):
    """A DDP run's checkpoint names its weights module.<name>: the same export. A checkpoint whose run config now
    describes another LoRA setup is an error naming the file, not a half-loaded model; so is one whose files differ
    from its manifest."""
    from dpo_dist.train.checkpoint import ALONE, CheckpointError, write_manifest
    from dpo_dist.publish.export import export_checkpoint

    ddp = runs / "lora" / "checkpoint-102"
    shutil.copytree(runs / "lora" / "checkpoint-2", ddp, ignore=shutil.ignore_patterns("model"))
    stored = tensors(ddp / "model.safetensors")
    save_file({f"module.{k}": v for k, v in stored.items()}, str(ddp / "model.safetensors"))
    write_manifest(ALONE, str(ddp))  # as the DDP run wrote it
    out = export_checkpoint(str(ddp))
    reference = export_checkpoint(str(runs / "lora" / "checkpoint-2"))
    a, b = tensors(os.path.join(out, "adapter_model.safetensors")), tensors(os.path.join(reference, "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    shutil.rmtree(ddp)

    other = tmp_path / "run"
    other.mkdir()
    shutil.copytree(runs / "lora" / "checkpoint-2", other / "checkpoint-2", ignore=shutil.ignore_patterns("model"))
    (other / "config.yaml").write_text((runs / "lora" / "config.yaml").read_text().replace("  r: 4\n", "  r: 8\n"))
    with pytest.raises(CheckpointError, match=r"model.safetensors does not fit the model config.yaml describes"):
        export_checkpoint(str(other / "checkpoint-2"))
    assert not os.path.exists(other / "checkpoint-2" / "model")

    (other / "config.yaml").write_text((runs / "lora" / "config.yaml").read_text())
    weights = other / "checkpoint-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"checkpoint-2 is damaged: model\.safetensors is \d+ bytes, the manifest "
                                              r"says \d+\. Export another checkpoint, or the run's model/"):
        export_checkpoint(str(other / "checkpoint-2"))
    assert not os.path.exists(other / "checkpoint-2" / "model")


def test_a_checkpoint_is_not_pushed_without_a_token_and_not_taken_for_a_model(runs, tmp_path, monkeypatch, push, capsys):
    import huggingface_hub

    from dpo_dist.publish.export import push_to_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    checkpoint = runs / "full" / "checkpoint-4"
    shutil.rmtree(checkpoint / "model", ignore_errors=True)
    assert push([str(checkpoint), "me/x"]) == 1
    assert "no Hugging Face token" in capsys.readouterr().err and not (checkpoint / "model").exists()
    with pytest.raises(FileNotFoundError, match="is a training checkpoint, not a model folder: `python launch/push.py"):
        push_to_hub(str(checkpoint), "me/x", token="hf_test", api=FakeApi())
