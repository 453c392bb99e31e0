"""Completions of held-out prompts while training (train.sample_prompts): samples.jsonl and the trackers."""

import glob
import json
import os

import pytest
import torch

from training import read_jsonl, reset_accelerate_state, run

SETTINGS = {"train.max_steps": 4, "train.eval_every": 2, "train.sample_prompts": 2, "train.sample_max_new_tokens": 6}


def greedy(model, prompts, max_new_tokens, eos):
    """Each prompt alone, no padding: the reference the batched, left-padded generation must equal."""
    out = []
    for ids in prompts:
        with torch.no_grad():
            generated = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                       eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
        out.append(generated[: generated.index(eos) + 1] if eos in generated else generated)
    return out


def first_eval_prompts(out, n):
    """The first n distinct prompts of the run's eval split, as the trainer tokenized them."""
    from transformers import AutoTokenizer

    from dpo_dist.config import load_config
    from dpo_dist.data.load import load_train_eval
    from dpo_dist.data.tokenization import Truncation, tokenize_pairs

    cfg = load_config(str(out / "config.yaml"))
    tokenizer = AutoTokenizer.from_pretrained(str(out / "model"))
    _, eval_, _ = load_train_eval(cfg.data.source, split="train", eval_source=None, eval_split=None,
                                  eval_ratio=cfg.data.eval_ratio, num_samples=None, seed=cfg.train.seed,
                                  data_format="auto", on_bad_row="error", hh_as_messages=False, tokenizer=tokenizer)
    tokenized, _ = tokenize_pairs(eval_, tokenizer, Truncation(cfg.data.max_length, cfg.data.max_prompt_length))
    prompts = []
    for ids in tokenized["prompt_input_ids"]:
        if ids not in prompts:
            prompts.append(ids)
    return prompts[:n], tokenizer


def test_samples_are_greedy_completions_of_the_first_held_out_prompts_and_reach_the_trackers(
        tiny_model_dir, data_file, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="the tracker test needs tensorboard (the dev extra has it)")
    pytest.importorskip("wandb", reason="the tracker test needs wandb (the dev extra has it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    reset_accelerate_state()
    result = run(tiny_model_dir, data_file, out, **SETTINGS, **{"train.report_to": ["tensorboard", "wandb"]})
    reset_accelerate_state()
    rows = read_jsonl(out / "samples.jsonl")
    assert [r["step"] for r in rows] == [2, 2, 4, 4]  # at each eval: steps 2 and 4 (the last)
    prompts, tokenizer = first_eval_prompts(out, 2)
    texts = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    assert [r["prompt"] for r in rows] == texts * 2 and texts[0] != texts[1]
    # The last step's completions are the saved model's own greedy completions, token for token.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out / "model")).eval()
    expected = greedy(model, prompts, 6, tokenizer.eos_token_id)
    assert [r["completion_ids"] for r in rows[2:]] == expected
    assert [r["completion"] for r in rows[2:]] == tokenizer.batch_decode(expected, skip_special_tokens=True)
    assert all(0 < len(r["completion_ids"]) <= 6 for r in rows)
    assert len(result["records"]) == 4

    # tensorboard: the samples as a text summary at steps 2 and 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(out / "dpo_dist" / "events.out.tfevents.*"))  # (the config's hparams sit a level below)
    accumulator = EventAccumulator(os.path.dirname(events), size_guidance={"tensors": 0})
    accumulator.Reload()
    (tag,) = [t for t in accumulator.Tags()["tensors"] if t.startswith("samples")]
    logged = {e.step: e.tensor_proto.string_val[0].decode() for e in accumulator.Tensors(tag)}
    assert sorted(logged) == [2, 4]
    for step in (2, 4):
        for row in (r for r in rows if r["step"] == step):
            assert f"| {row['prompt']} | {row['completion']} |" in logged[step]
    assert "loss" in accumulator.Tags()["scalars"]

    # wandb (offline): a table "samples" per sampling step, with the same rows
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    tables = sorted(glob.glob(os.path.join(run_dir, "files", "media", "table", "samples_*.table.json")))
    assert len(tables) == 2, tables
    logged_rows = []
    for path in tables:
        table = json.load(open(path))
        assert table["columns"] == ["step", "prompt", "completion"]
        logged_rows += table["data"]
    assert sorted(logged_rows) == sorted([r["step"], r["prompt"], r["completion"]] for r in rows)


def test_sampled_completions_are_seeded_and_leave_training_unchanged(tiny_model_dir, data_file, tmp_path):
    """Temperature 1 every 3 steps (and the last): the same completions in two runs, different from greedy ones, and
    the training trajectory (LoRA dropout draws random numbers) equal to a run that does not sample."""
    settings = {**SETTINGS, "train.sample_every": 3, "train.sample_temperature": 1.0, "lora.enabled": True,
                "lora.dropout": 0.1, "train.eval_every": None}
    runs = []
    for name in ("a", "b"):
        reset_accelerate_state()
        runs.append(run(tiny_model_dir, data_file, tmp_path / name, **settings)["records"])
    reset_accelerate_state()
    plain = run(tiny_model_dir, data_file, tmp_path / "plain", **{**settings, "train.sample_prompts": 0})["records"]
    reset_accelerate_state()
    greedy_run = run(tiny_model_dir, data_file, tmp_path / "greedy", **{**settings, "train.sample_temperature": 0.0})
    reset_accelerate_state()
    a, b = (read_jsonl(tmp_path / name / "samples.jsonl") for name in ("a", "b"))
    assert [r["step"] for r in a] == [3, 3, 4, 4] and a == b
    assert [r["completion_ids"] for r in a] != [r["completion_ids"] for r in read_jsonl(tmp_path / "greedy" / "samples.jsonl")]
    assert not os.path.exists(tmp_path / "plain" / "samples.jsonl")
    for records in (runs[0], greedy_run["records"]):
        assert [r["loss"] for r in records] == [r["loss"] for r in plain], "sampling drew from the training generator"
