"""The model card (dpo_dist/publish/card.py): written beside model/ once training ends (launch/train.py, and the
tests' run() as it does), its metadata parsed by huggingface_hub.ModelCard and every number in it equal to the run's
files."""

import json
import os
import shutil

import pytest

from dpo_dist.config import Config, load_config
from dpo_dist.train.metrics import read_metrics
from training import reset_accelerate_state, run


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, data_file, tmp_path_factory):
    """A LoRA run of 4 steps with evals at 2 and 4; the card model/ got once training ended, kept before the
    evaluation; then launch/evaluate.py's results (no judge: held-out pairs and KL) in eval/."""
    from dpo_dist.eval.against_base import EvalOptions, evaluate_run
    from dpo_dist.eval.report import write_report

    out = tmp_path_factory.mktemp("card") / "out"
    run(tiny_model_dir, data_file, out, **{"lora.enabled": True, "lora.r": 4, "train.max_steps": 4,
                                           "train.eval_every": 2})
    reset_accelerate_state()
    trained_card = (out / "model" / "README.md").read_text()
    results = evaluate_run(str(out), EvalOptions(judge="none", samples_per_prompt=1, num_prompts=2, batch_size=4))
    write_report(results, str(out / "eval"), plot=False)
    return out, trained_card


def tables(text):
    """Every markdown table row of the card, by section: {section: {first cell: [other cells]}}."""
    found, section = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            section = line[3:]
            found[section] = {}
        elif line.startswith("| ") and section and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            found[section][cells[0]] = cells[1:]
    return found


def parse(path):
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)
    return card.data.to_dict(), card.text, tables(card.text)


def test_the_trainer_writes_a_card_from_the_run_files(lora_run, tiny_model_dir, data_file, tmp_path):
    out, trained_card = lora_run
    (tmp_path / "README.md").write_text(trained_card)  # as written after training (a later test rewrites model/'s)
    metadata, text, rows = parse(tmp_path / "README.md")
    assert metadata == {"library_name": "peft", "pipeline_tag": "text-generation", "tags": ["dpo", "dpo-dist", "lora"]}
    assert "License: not known" in text, "a local base with no card: no license key, and the text says so"
    assert text.lstrip().startswith(f"# {os.path.basename(tiny_model_dir)}, DPO (LoRA adapter)\n"), text[:200]
    assert f'base = AutoModelForCausalLM.from_pretrained("{tiny_model_dir}")' in text
    assert f'PeftModel.from_pretrained(base, "{out / "model"}")' in text

    counts = json.load(open(out / "run.json"))
    source = {"entry": "data.source", "source": data_file, "split": "train", "rows_read": 81, "skipped": {},
              "kept": 81, "used": 81, "left_out_by_num_samples": 0, "train_pairs": 65, "eval_pairs": 16,
              "dropped_too_long": 0}
    assert counts == {"pairs": {"train_pairs": 65, "eval_pairs": 16, "dropped_too_long": 0, "sources": [source]},
                      "model_step": 4, "model": "the weights at step 4, the last"}
    assert rows["Training data"] == {"pairs": ["count"], "train_pairs": ["65"], "eval_pairs": ["16"],
                                     "dropped_too_long": ["0"], "source": ["split", "rows read", "skipped", "kept",
                                                                           "used", "train", "eval", "dropped (too long)"],
                                     f"data.source `{data_file}`": ["train", "81", "0", "81", "81", "65", "16", "0"]}

    records = read_metrics(str(out / "metrics.jsonl"))
    last = records[-1]
    assert last["step"] == 4 and "eval/loss" in last
    metrics = rows["Training metrics"]
    assert metrics["metric"] == ["train (step 4)", "eval (step 4)"]
    for key, label in (("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"),
                       ("rewards/chosen", "reward chosen"), ("rewards/rejected", "reward rejected")):
        assert metrics[label] == [f"{last[key]:.4f}", f"{last['eval/' + key]:.4f}"], label
    assert "pairs seen: 32" in text

    cfg = load_config(str(out / "config.yaml"))
    hyper = rows["Hyperparameters"]
    assert hyper["loss.beta"] == [str(cfg.loss.beta)] and hyper["train.learning_rate"] == [str(cfg.train.learning_rate)]
    assert hyper["lora.r"] == ["4"] and hyper["lora.enabled"] == ["True"] and hyper["train.max_steps"] == ["4"]
    assert hyper["global batch (pairs per optimizer step)"] == ["8"] and hyper["optimizer steps run"] == ["4"]
    assert (out / "config.yaml").read_text().rstrip() in text, "the whole config.yaml"


def test_evaluation_results_join_the_card_once_they_exist(lora_run):
    """The trainer's card came before the evaluation; a card written now (as push.py or merge.py do) shows it."""
    from dpo_dist.publish.card import write_card

    out, trained_card = lora_run
    assert "Not run yet: `python launch/evaluate.py" in trained_card
    folder = out.parent / "card-now"
    shutil.copytree(out / "model", folder)
    write_card(str(folder), run=str(out), repo_id="me/tiny-dpo")
    _, text, rows = parse(folder / "README.md")
    results = json.load(open(out / "eval" / "results.json"))
    p, kl = results["preference"], results["kl"]
    table = rows["Evaluation against the base"]
    assert table["held-out pairs"] == [str(p["pairs"])] and p["pairs"] == 16
    assert table["reward accuracy"] == [f"{p['reward_accuracy']:.4f}"]
    assert table["mean margin"] == [f"{p['margin']:.4f}"] and table["loss"] == [f"{p['loss']:.4f}"]
    assert table["KL(trained ‖ base) per response, nats"] == [f"{kl['kl']:.4f} ± {kl['kl_stderr']:.4f}"]
    assert not any(k.startswith("win rate") for k in table), "no judge, no win rate"
    assert 'PeftModel.from_pretrained(base, "me/tiny-dpo")' in text and text.count("# me/tiny-dpo") == 1
    for _ in range(2):  # rewritten in model/ itself (push.py does), twice: the card is no weight newer than results
        write_card(str(out / "model"), run=str(out), repo_id="me/tiny-dpo")
    assert tables(parse(out / "model" / "README.md")[1])["Evaluation against the base"] == table


def test_results_older_than_the_model_are_left_out(lora_run, tmp_path):
    from dpo_dist.publish.card import render

    out, _ = lora_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    later = os.path.getmtime(copy / "eval" / "results.json") + 10
    os.utime(copy / "model" / "adapter_model.safetensors", (later, later))
    _, text, rows = parse_text(render(str(copy / "model")))
    assert "eval/results.json is older than model/ (it evaluated other weights): not shown" in text
    assert "Evaluation against the base" not in rows


def parse_text(text):
    from huggingface_hub import ModelCard

    card = ModelCard(text)
    return card.data.to_dict(), card.text, tables(card.text)


def test_the_exported_step_and_per_source_counts_come_from_run_json(lora_run, tmp_path):
    """Early stopping exports the best step's weights (run.json says which: tests/test_train.py checks the trainer
    writes it): the card shows that step's metrics. A mixture's per-source counts (tests/test_data.py checks them)
    become a row per entry, with the columns some entry has: its subset, a weighted mixture's probabilities, what
    data.num_samples left out."""
    from dpo_dist.publish.card import render

    out, _ = lora_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    info = json.load(open(copy / "run.json"))
    info["model_step"], info["model"] = 2, "the weights of checkpoint-2, the best eval/loss"
    info["pairs"]["sources"] = [
        {"entry": "data.sources[0]", "source": "a.jsonl", "split": "train", "rows_read": 60, "skipped": {},
         "kept": 60, "subset": 50, "probability": 0.75, "used": 50, "left_out_by_num_samples": 0, "train_pairs": 40,
         "eval_pairs": 10, "dropped_too_long": 0},
        {"entry": "data.sources[1]", "source": "b.jsonl", "split": "test", "rows_read": 40, "skipped":
         {"empty_response": 2, "prompts_differ": 1}, "kept": 37, "probability": 0.25, "used": 31,
         "left_out_by_num_samples": 0, "train_pairs": 25, "eval_pairs": 6, "dropped_too_long": 0}]
    json.dump(info, open(copy / "run.json", "w"))
    _, text, rows = parse_text(render(str(copy / "model")))
    second = read_metrics(str(out / "metrics.jsonl"))[1]
    assert second["step"] == 2 and "eval/loss" in second
    metrics = rows["Training metrics"]
    assert metrics["metric"] == ["train (step 2)", "eval (step 2)"]
    assert metrics["loss"] == [f"{second['loss']:.4f}", f"{second['eval/loss']:.4f}"]
    assert "The weights of checkpoint-2, the best eval/loss; pairs seen: 16" in text
    data = rows["Training data"]
    assert data["source"] == ["split", "rows read", "skipped", "kept", "subset (num_samples / fraction)",
                              "probability (weight)", "used", "train", "eval", "dropped (too long)"]
    assert data["data.sources[0] `a.jsonl`"] == ["train", "60", "0", "60", "50", "0.75", "50", "40", "10", "0"]
    assert data["data.sources[1] `b.jsonl`"] == ["test", "40", "3 (2 empty_response, 1 prompts_differ)", "37", "–",
                                                 "0.25", "31", "25", "6", "0"]


def test_license_and_base_model_come_from_the_base(tmp_path, monkeypatch):
    from dpo_dist.publish.card import base_of, hub_datasets

    builtin = base_of(Config(), str(tmp_path))
    assert (builtin.hub_id, builtin.license) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0")
    assert "de-quantized" in builtin.note
    local = tmp_path / "base"
    local.mkdir()
    (local / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n\n# a base\n")
    cfg = Config()
    cfg.model.name_or_path = str(local)
    assert (base_of(cfg, str(tmp_path)).hub_id, base_of(cfg, str(tmp_path)).license) == (None, "mit")
    (local / "README.md").write_text("# no metadata\n")
    assert base_of(cfg, str(tmp_path)).license is None
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # nothing cached: no license, no download tried
    cfg.model.name_or_path = "some-org/some-model"
    hub = base_of(cfg, str(tmp_path))
    assert (hub.hub_id, hub.license) == ("some-org/some-model", None)

    cfg.data.source, cfg.data.eval_source = "Anthropic/hh-rlhf", str(local)
    assert hub_datasets(cfg) == ["Anthropic/hh-rlhf"]
    cfg.data.source, cfg.data.eval_source = "builtin:sentiment", "data/pairs.jsonl"
    assert hub_datasets(cfg) == []
    from dpo_dist.config import load_config

    mixture = load_config(None, ['data.sources=[{"source": "Anthropic/hh-rlhf", "data_dir": '
                                 '"harmless-base"}, {"source": "trl-lib/ultrafeedback_binarized"}, '
                                 f'{{"source": "{local}"}}]'])
    assert hub_datasets(mixture) == ["Anthropic/hh-rlhf", "trl-lib/ultrafeedback_binarized"]


def test_the_title_names_the_model_not_a_path(tmp_path, monkeypatch):
    """The base's name (a Hub id's or the builtin SmolLM2's model name, a local folder's name) and how it was
    trained; a repository it is pushed to names it instead. merge.py and push.py's checkpoint export give a local
    path as the loading code's model_id: never the title."""
    from dpo_dist.publish.card import base_of, render, title

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    cfg = Config()
    builtin = base_of(cfg, str(tmp_path))
    assert title(builtin, "adapter", cfg, None) == "SmolLM2-135M-Instruct, DPO (LoRA adapter)"
    assert title(builtin, "merged", cfg, None) == "SmolLM2-135M-Instruct, DPO (LoRA, merged)"
    assert title(builtin, "full", cfg, 200) == "SmolLM2-135M-Instruct, DPO (full fine-tune), step 200"
    cfg.model.quantization = "4bit"
    assert title(builtin, "adapter", cfg, None) == "SmolLM2-135M-Instruct, DPO (QLoRA adapter)"
    cfg.model.name_or_path = "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert title(base_of(cfg, str(tmp_path)), "merged", cfg, None) == "TinyLlama-1.1B-Chat-v1.0, DPO (QLoRA, merged)"
    cfg.model.name_or_path = str(tmp_path / "bases" / "my-llama") + "/"
    (tmp_path / "bases" / "my-llama").mkdir(parents=True)
    assert title(base_of(cfg, str(tmp_path)), "adapter", cfg, None) == "my-llama, DPO (QLoRA adapter)"

    folder = tmp_path / "outputs" / "run" / "merged"  # no run beside it: the base from nowhere, the kind as given
    folder.mkdir(parents=True)
    assert "\n# a model, DPO (LoRA, merged)\n" in render(str(folder), model_id=str(folder), kind="merged")
    pushed = render(str(folder), model_id=str(folder), repo_id="me/tiny-merged", kind="merged")
    assert "\n# me/tiny-merged\n" in pushed and 'from_pretrained("me/tiny-merged")' in pushed
    assert str(folder) not in pushed


def test_a_merged_model_card_says_merged_and_loads_without_peft(lora_run, tmp_path):
    """merge.py's card (its merge is tested in tests/test_export.py): transformers, not peft; the weights' dtype."""
    from dpo_dist.publish.card import render

    out, _ = lora_run
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"dtype": "float32", "model_type": "llama"}))
    metadata, text, _ = parse_text(render(str(folder), run=str(out), model_id="me/merged", kind="merged"))
    assert metadata["library_name"] == "transformers" and "lora" in metadata["tags"]
    assert "with a LoRA adapter merged into its weights" in text and "Weights saved in float32." in text
    assert 'AutoModelForCausalLM.from_pretrained("me/merged")' in text and "PeftModel" not in text


def test_an_edited_card_is_kept_a_generated_one_replaced(lora_run, tmp_path):
    from dpo_dist.publish.card import replaceable_card, write_card

    out, _ = lora_run
    folder = tmp_path / "model"
    shutil.copytree(out / "model", folder)
    path = write_card(str(folder), run=str(out))
    assert replaceable_card(path), "written here, unedited"
    with open(path, "a") as handle:
        handle.write("\nTrained for the demo.\n")
    assert not replaceable_card(path), "edited: push.py keeps it"
    assert replaceable_card(str(tmp_path / "none.md")), "absent"


def test_the_hyperparameters_name_the_adapter_options_a_run_set():
    """DoRA, rsLoRA, an initialization, modules trained in full: each set one is a row; the defaults are not."""
    from dpo_dist.publish.card import RunFiles, hyperparameter_section

    cfg = load_config(None, ["lora.use_dora=true", "lora.init_lora_weights=pissa", "lora.modules_to_save=[lm_head]"])
    rows = "\n".join(hyperparameter_section(RunFiles(cfg=cfg)))
    assert "| lora.use_dora | True |" in rows and "| lora.init_lora_weights | pissa |" in rows
    assert "| lora.modules_to_save | ['lm_head'] |" in rows and "lora.use_rslora" not in rows
    plain = "\n".join(hyperparameter_section(RunFiles(cfg=load_config(None, []))))
    assert "| lora.r | 16 |" in plain and "use_dora" not in plain and "init_lora_weights" not in plain
