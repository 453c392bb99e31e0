"""The training loop on tiny models built here: first step, learning, batch arithmetic, DDP, resume, stops."""

import functools
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from dpo_dist.config import load_config
from dpo_dist.train import host_memory
from dpo_dist.train.metrics import read_metrics
from tiny import make_llama, make_tokenizer
from training import (ROOT, WORDS, accelerate_launch, assert_same_trajectory, copy_run, overrides, reset_accelerate_state,
                      run, synthetic_pairs)


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest.py


def test_first_step_is_ln2_with_zero_rewards(tiny_model_dir, data_file, tmp_path):
    """Policy = reference at step 1: every loss is -log sigma(0) = ln 2 = 0.693147, every reward 0 (up to the fp32
    noise between the precomputed reference's batches and the training batches, ~1e-7)."""
    first = run(tiny_model_dir, data_file, tmp_path / "out", **{"train.max_steps": 1})["records"][0]
    assert first["step"] == 1
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(first[key]) < 1e-5, key
    lines = read_metrics(str(tmp_path / "out" / "metrics.jsonl"))
    assert lines == [first]
    assert {"grad_norm", "lr", "tokens/s", "examples_seen", "epoch", "logps/chosen", "logps/rejected"} <= set(first)
    assert first["examples_seen"] == 8 and first["grad_norm"] > 0


def test_learns_a_learnable_preference(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    result = run(tiny_model_dir, data_file, out, **{"train.max_steps": 30, "train.eval_every": 10})
    evals = [r for r in result["records"] if "eval/rewards/accuracies" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert evals[-1]["eval/rewards/accuracies"] > 0.9
    assert evals[-1]["eval/rewards/margins"] > evals[0]["eval/rewards/margins"] > 0
    assert {k: v for k, v in result["counts"].items() if k != "sources"} == {"train_pairs": 65, "eval_pairs": 16,
                                                                             "dropped_too_long": 0}
    [source] = result["counts"]["sources"]  # the card's test checks each field
    assert (source["entry"], source["used"], source["train_pairs"], source["eval_pairs"]) == ("data.source", 81, 65, 16)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out / "model"))  # the final full model loads
    assert os.path.isfile(out / "model" / "tokenizer.json") and os.path.isfile(out / "config.yaml")
    assert "eval (step 30)" in open(out / "summary.txt").read()


def test_batch_times_accumulation_is_one_global_batch(tiny_model_dir, data_file, tmp_path):
    """8 x 1, 4 x 2 and 2 x 4 see the same 8 pairs per step and give the same trajectory (fp32 tolerance)."""
    runs = [
        run(tiny_model_dir, data_file, tmp_path / f"b{b}", **{
            "train.per_device_batch_size": b, "train.gradient_accumulation_steps": 8 // b, "train.max_grad_norm": 0.5,
        })["records"]
        for b in (8, 4, 2)
    ]
    assert runs[0][0]["grad_norm"] > 0.5, "clipping must be active for this test to cover it"
    assert_same_trajectory(runs[0], runs[1], atol=1e-5)
    assert_same_trajectory(runs[0], runs[2], atol=1e-5)


def ddp_settings(tmp_path, data_file, lora):
    """The DDP comparison's settings, with checkpoint-3, which the resume tests continue on another process count: an
    odd step, so that a resume that kept Accelerate's count of micro-steps (3) would step mid-way with accumulation 2."""
    extra = {"lora.enabled": lora, "train.eval_every": 2, "train.max_steps": 5, "train.sample_prompts": 2,
             "train.save_every": 3, "train.keep_last": 5}
    if lora:  # a weighted mixture, which each process draws for itself: the same pairs in the same order, or no match
        more = synthetic_pairs(tmp_path / "more.jsonl", 40, seed=1)
        extra.update({"data.source": "builtin:sentiment",  # (not data_file: data.sources replaces it)
                      "data.sources": [{"source": data_file, "weight": 1}, {"source": more, "weight": 2}]})
    return extra


def launch_ddp(tiny_model_dir, data_file, out, **extra):
    command = accelerate_launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                                "--dynamo_backend", "no", os.path.join(ROOT, "launch", "train.py"))
    command += overrides(tiny_model_dir, data_file, out, **extra)
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def ddp_runs(tiny_model_dir, data_file, tmp_path_factory):
    """One process (8 pairs per device) and 2 DDP processes (4 each) on the same data, launched once for the tests
    that check them: ``ddp_runs(lora)`` is (the settings, the one-process records and folder, the launch result and
    its folder)."""
    @functools.cache
    def get(lora):
        root = tmp_path_factory.mktemp(f"ddp-lora{lora}")
        extra = ddp_settings(root, data_file, lora)
        one = run(tiny_model_dir, data_file, root / "one", **extra)["records"]
        reset_accelerate_state()
        # LoRA's two processes lay attention out segment by segment, the one process as the cost model picks: equal too
        layout = {"train.attention_layout": "segmented"} if lora else {}
        two = launch_ddp(tiny_model_dir, data_file, root / "two", **extra, **layout, **{"train.per_device_batch_size": 4})
        return extra, (one, root / "one"), (two, root / "two")

    return get


@pytest.mark.multiprocess
@pytest.mark.parametrize("lora", [False, True])
def test_two_process_ddp_equals_one_process(ddp_runs, lora):
    extra, (one, one_folder), (result, two_folder) = ddp_runs(lora)
    assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(r"x 2 processes, \d+ CPU threads each", result.stdout), result.stdout[-2000:]
    assert ("attention: segmented (" in result.stdout) == lora, result.stdout[-2000:]
    two = read_metrics(str(two_folder / "metrics.jsonl"))
    assert_same_trajectory(one, two, atol=1e-5)
    pairs = [json.load(open(folder / "run.json"))["pairs"] for folder in (one_folder, two_folder)]
    assert pairs[1] == pairs[0] and len(pairs[0]["sources"]) == (2 if lora else 1)
    if lora:  # a weighted mixture's entries: what each put in went to train and eval
        assert [s["entry"] for s in pairs[0]["sources"]] == ["data.sources[0]", "data.sources[1]"]
        assert all(s["used"] == s["train_pairs"] + s["eval_pairs"] and s["probability"] for s in pairs[0]["sources"])
        assert "  data.sources[1] " in result.stdout and " used: " in result.stdout, result.stdout[-2000:]
    # Both processes generate the samples (steps 2, 4, 5), the main one writes them: the one-process completions.
    samples = [read_metrics(str(folder / "samples.jsonl")) for folder in (one_folder, two_folder)]
    assert [r["step"] for r in samples[1]] == [2, 2, 4, 4, 5, 5] and samples[1] == samples[0]


@pytest.mark.multiprocess
@pytest.mark.parametrize("lora", [False, True])
def test_a_two_process_checkpoint_continues_on_one_process(ddp_runs, lora, tiny_model_dir, data_file, tmp_path, capsys):
    """Checkpoint-3 of the 2-process run (4 pairs per device), resumed by one process launched with the same settings:
    accumulation 2 keeps the global batch of 8 pairs, and the losses are the uninterrupted 2-process run's."""
    extra, _, (result, two_folder) = ddp_runs(lora)
    assert result.returncode == 0, result.stderr[-4000:]
    copy_run(two_folder, tmp_path / "out")
    resumed = run(tiny_model_dir, data_file, tmp_path / "out", **extra, **{
        "train.per_device_batch_size": 4, "train.resume": str(tmp_path / "out" / "checkpoint-3")})
    said = capsys.readouterr().out
    assert ("train.gradient_accumulation_steps 1 -> 2, to keep checkpoint-3's global batch: 8 pairs = 4 per device x 2 "
            "accumulation x 1 processes (it was written with 8 pairs = 4 per device x 1 accumulation x 2 processes)"
            in said), said[-3000:]
    assert resumed["state"].global_step == 5 and resumed["state"].pairs_seen == 40
    assert_same_trajectory(read_metrics(str(two_folder / "metrics.jsonl")), read_metrics(str(tmp_path / "out" / "metrics.jsonl")),
                           atol=1e-5)


@pytest.mark.multiprocess
def test_a_one_process_checkpoint_continues_on_two(ddp_runs, tiny_model_dir, data_file, tmp_path):
    """LoRA checkpoint-3 of the one-process run (8 pairs per device), resumed by 2 DDP processes with 4 each: the same
    global batch, the uninterrupted run's losses."""
    extra, (one, one_folder), _ = ddp_runs(True)
    copy_run(one_folder, tmp_path / "out")
    result = launch_ddp(tiny_model_dir, data_file, tmp_path / "out", **extra, **{
        "train.per_device_batch_size": 4, "train.resume": str(tmp_path / "out" / "checkpoint-3")})
    assert result.returncode == 0, result.stderr[-4000:]
    assert ("resumed checkpoint-3 with its global batch of 8 pairs = 4 per device x 1 accumulation x 2 processes (it "
            "was written with 8 pairs = 8 per device x 1 accumulation x 1 processes)" in result.stdout), result.stdout[-3000:]
    assert_same_trajectory(one, read_metrics(str(tmp_path / "out" / "metrics.jsonl")), atol=1e-5)


def test_resumed_run_continues_the_same_trajectory(tiny_model_dir, data_file, tmp_path, monkeypatch):
    extra = {"train.max_steps": 6, "train.save_every": 3, "train.eval_every": 3, "lora.enabled": True,
             "train.warmup_ratio": 0.34}
    whole = run(tiny_model_dir, data_file, tmp_path / "whole", **extra)["records"]

    from dpo_dist.train import metrics as metrics_module

    real_write = metrics_module.MetricsLog.write

    def interrupted(self, record):
        if record["step"] == 5:
            raise KeyboardInterrupt("killed after step 5, before its log line")
        real_write(self, record)

    monkeypatch.setattr(metrics_module.MetricsLog, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_model_dir, data_file, tmp_path / "cut", **extra)
    monkeypatch.setattr(metrics_module.MetricsLog, "write", real_write)
    reset_accelerate_state()
    assert [r["step"] for r in read_metrics(str(tmp_path / "cut" / "metrics.jsonl"))] == [1, 2, 3, 4]
    resumed = run(tiny_model_dir, data_file, tmp_path / "cut", **extra)
    assert resumed["state"].global_step == 6
    assert_same_trajectory(whole, read_metrics(str(tmp_path / "cut" / "metrics.jsonl")), atol=1e-6)


def test_checkpoints_keep_last_k_and_the_best(tiny_model_dir, data_file, tmp_path):
    """lr 0 keeps eval/loss flat, so the first eval stays the best: checkpoint-1 is kept beside the last two."""
    out = tmp_path / "out"
    result = run(tiny_model_dir, data_file, out, **{"train.max_steps": 5, "train.save_every": 1, "train.eval_every": 1,
                                                     "train.keep_last": 2, "train.learning_rate": 0.0})
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-4", "checkpoint-5"]
    assert result["state"].best_checkpoint == str(out / "checkpoint-1")


def test_the_best_checkpoint_is_kept_however_output_dir_is_spelled(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """A run with a relative output_dir records checkpoint-1 as its best (lr 0: eval/loss stays flat); resumed with
    the absolute path of the same folder it still keeps checkpoint-1 beside the last two."""
    monkeypatch.chdir(tmp_path)
    settings = {"train.save_every": 1, "train.eval_every": 1, "train.keep_last": 2, "train.learning_rate": 0.0}
    run(tiny_model_dir, data_file, "out", **settings, **{"train.max_steps": 3})
    reset_accelerate_state()
    result = run(tiny_model_dir, data_file, tmp_path / "out", **settings, **{"train.max_steps": 5})
    assert [r["step"] for r in result["records"]] == [1, 2, 3, 4, 5]
    assert result["state"].best_checkpoint == os.path.join("out", "checkpoint-1")  # as the first run wrote it
    assert sorted(n for n in os.listdir(tmp_path / "out") if n.startswith("checkpoint")) == [
        "checkpoint-1", "checkpoint-4", "checkpoint-5"]


def test_early_stopping_with_patience(tiny_model_dir, data_file, tmp_path, capsys):
    result = run(tiny_model_dir, data_file, tmp_path / "out", **{
        "train.max_steps": 20, "train.eval_every": 2, "train.early_stopping_patience": 2, "train.learning_rate": 0.0})
    assert result["records"][-1]["step"] == 6  # best at 2, no improvement at 4 and 6
    assert "early stopping at step 6" in capsys.readouterr().out


def adapter_or_model_tensors(folder):
    """The tensors of a checkpoint or of the final export, named alike (PEFT drops the adapter name on export)."""
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if os.path.isfile(os.path.join(folder, "adapter_model.safetensors")) else "model.safetensors"
    return {k.replace(".default.", "."): v for k, v in load_file(os.path.join(folder, name)).items()}


@pytest.mark.parametrize("lora,save_every", [(False, 2), (False, None), (True, 2)],
                         ids=["full", "full-no-save-every", "lora"])
def test_early_stopping_exports_the_best_checkpoint(lora, save_every, tiny_model_dir, data_file, tmp_path, capsys):
    """greater_is_better on eval/loss makes the first eval (step 2, before learning lowers the loss) the best: the
    patience of 2 evals runs out at step 6, and model/ holds the weights of checkpoint-2 (written as the best even
    without save_every), not those of step 6; the log says which."""
    out = tmp_path / "out"
    result = run(tiny_model_dir, data_file, out, **{
        "lora.enabled": lora, "train.max_steps": 20, "train.eval_every": 2, "train.early_stopping_patience": 2,
        "train.greater_is_better": True, "train.save_every": save_every})
    losses = [r["eval/loss"] for r in result["records"] if "eval/loss" in r]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    assert result["records"][-1]["step"] == 6
    exported, best = adapter_or_model_tensors(out / "model"), adapter_or_model_tensors(out / "checkpoint-2")
    assert set(exported) == set(best) and len(best) > 0
    for name in best:
        torch.testing.assert_close(exported[name], best[name], rtol=0, atol=0)
    if save_every:  # checkpoint-6 holds the last weights: they differ
        last = adapter_or_model_tensors(out / "checkpoint-6")
        assert any(not torch.equal(last[name], best[name]) for name in best)
    log = capsys.readouterr().out
    said = f"the weights of {out / 'checkpoint-2'}, the best eval/loss ({losses[0]:.4f}), not those of the last step 6"
    assert f"model/: {said}" in log
    assert json.load(open(out / "run.json")) == {"pairs": result["counts"], "model_step": 2, "model": said}  # the card's


@pytest.mark.slow
def test_a_damaged_best_checkpoint_is_not_exported(tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    """The early-stopping run above, its best checkpoint-2 truncated after it was written: the final export checks it
    against its manifest, keeps the last step's weights, and says why."""
    from dpo_dist.train import trainer

    out = tmp_path / "out"
    real = trainer.save_checkpoint

    def save_then_damage_the_best(accelerator, output_dir, state, **kwargs):
        written = real(accelerator, output_dir, state, **kwargs)
        if state.global_step == 4:
            weights = out / "checkpoint-2" / "model.safetensors"
            weights.write_bytes(weights.read_bytes()[:-64])
        return written

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_damage_the_best)
    result = run(tiny_model_dir, data_file, out, **{
        "lora.enabled": False, "train.max_steps": 20, "train.eval_every": 2, "train.early_stopping_patience": 2,
        "train.greater_is_better": True, "train.save_every": 2})
    assert result["records"][-1]["step"] == 6
    said = (f"model/: the weights at step 6, the last: the best checkpoint {out / 'checkpoint-2'} is damaged "
            "(model.safetensors is ")
    assert said in capsys.readouterr().out
    exported, last = adapter_or_model_tensors(out / "model"), adapter_or_model_tensors(out / "checkpoint-6")
    assert all(torch.equal(exported[name], last[name]) for name in last)


def test_non_finite_loss_stops_naming_the_step(tiny_model_dir, data_file, tmp_path, monkeypatch):
    from dpo_dist.train import objective, trainer

    real = objective.preference_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        losses, chosen, rejected = real(*args, **kwargs)
        return (losses * float("nan") if calls["n"] == 3 else losses), chosen, rejected

    monkeypatch.setattr(objective, "preference_loss", poisoned)
    out = tmp_path / "out"
    stopped = (r"^non-finite loss at step 3 \(loss=nan; the step stopped before its backward, so no gradient norm\): "
               r"stopped before applying it\. "
               r"Last checkpoint: \S+/checkpoint-2 ")
    with pytest.raises(trainer.TrainingError, match=stopped):
        run(tiny_model_dir, data_file, out, **{"train.save_every": 2, "train.max_steps": 6})
    from safetensors.torch import load_file

    assert load_file(str(out / "checkpoint-2" / "model.safetensors"))  # intact and loadable
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2]


def test_diverged_weights_name_the_gradient_and_the_way_out(tiny_model_dir, data_file, tmp_path):
    """lr 1e6: Adam moves every weight by about the learning rate at step 1 (largest |weight| 1 -> 1e6), so at step 2
    the loss is still finite (about ln 2) but the gradient norm is NaN. The message said "non-finite loss" and sent
    the user to checkpoint-1 as the last good one, from which a rerun fails the same way, even with a lower learning
    rate. Now it names grad_norm, gives the checkpoint's largest |weight| beside the starting model's, and the way out,
    which works: starting over with train.resume=never and a lower learning rate."""
    from dpo_dist.train.checks import TrainingError

    out = tmp_path / "out"
    settings = {"train.save_every": 1, "train.max_steps": 4, "train.learning_rate": 1e6}
    with pytest.raises(TrainingError) as error:
        run(tiny_model_dir, data_file, out, **settings)
    reset_accelerate_state()
    message = str(error.value)
    assert re.match(r"non-finite grad_norm at step 2 \(loss=0\.6\d+, grad_norm=nan\): stopped before applying it\. ",
                    message), message
    assert (f"Last checkpoint: {out}/checkpoint-1 (largest |weight| 1e+06; the starting model's: 1); if it has "
            "diverged already, a rerun resumes from it (train.resume=auto) and fails the same way, even with a lower "
            "learning rate: start over with train.resume=never and a lower train.learning_rate (now 1e+06), or resume "
            "from an earlier checkpoint with train.resume=<path> (none earlier is kept)") in message, message
    again = r"^non-finite grad_norm at step 2 .*checkpoint-1 \(largest \|weight\| 1e\+06"
    with pytest.raises(TrainingError, match=again):
        run(tiny_model_dir, data_file, out, **{**settings, "train.learning_rate": 1e-3})  # resumes from checkpoint-1
    reset_accelerate_state()
    records = run(tiny_model_dir, data_file, out, **{**settings, "train.learning_rate": 1e-3, "train.resume": "never"})
    assert [r["step"] for r in records["records"]] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records["records"])


def test_non_finite_message_without_checkpoints_and_for_lora(tmp_path):
    """No checkpoint: say so and lower the learning rate. LoRA: the adapter's largest |weight| alone (there is no
    starting adapter to compare with), NaN if a weight is; earlier checkpoints are listed."""

    from safetensors.torch import save_file

    from dpo_dist.train.checks import non_finite_error

    cfg = load_config(None, [f"train.output_dir={tmp_path}", "train.learning_rate=0.5"])
    record = {"loss": float("inf"), "grad_norm": 3.0}
    assert str(non_finite_error(cfg, 7, record, applied=False)) == (
        "non-finite loss at step 7 (loss=inf; the step stopped before its backward, so no gradient norm): stopped "
        "before applying it; no checkpoint was written "
        "(set train.save_every to keep some); lower train.learning_rate (now 0.5)")
    for step, weight in ((2, 0.25), (4, float("nan"))):
        os.makedirs(tmp_path / f"checkpoint-{step}")
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        save_file({"a": torch.tensor([0.5, -weight]), "b": torch.tensor([0.1])},
                  str(tmp_path / f"checkpoint-{step}" / "model.safetensors"))
    message = str(non_finite_error(cfg, 5, record, applied=False))
    assert f"Last checkpoint: {tmp_path}/checkpoint-4 (largest |weight| nan); if it has diverged already" in message
    assert message.endswith(f"train.resume=<path> (kept: {tmp_path}/checkpoint-2)")
    assert "DeepSpeed applied this update before it could be checked" in str(
        non_finite_error(cfg, 5, record, applied=True))


def test_lora_adapter_is_saved_for_peft(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    run(tiny_model_dir, data_file, out, **{"lora.enabled": True, "lora.r": 4, "train.max_steps": 3})
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before = base(ids).logits
    model = PeftModel.from_pretrained(base, str(out / "model"))
    assert not torch.allclose(model(ids).logits, before), "the trained adapter changes the model"


def test_online_reference_equals_precomputed(tiny_model_dir, data_file, tmp_path):
    for lora in (False, True):
        extra = {"lora.enabled": lora, "train.max_steps": 4}
        precomputed = run(tiny_model_dir, data_file, tmp_path / f"pre{lora}", **extra)["records"]
        reset_accelerate_state()
        online = run(tiny_model_dir, data_file, tmp_path / f"on{lora}", **extra, **{"reference.mode": "online"})["records"]
        assert_same_trajectory(precomputed, online, atol=1e-5)


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_bad_config_exits_nonzero_naming_the_key():
    result = cli("train.learning_rat=0.1")
    assert result.returncode == 2
    assert "unknown config key 'train.learning_rat'" in result.stderr and "train.learning_rate" in result.stderr
    result = cli("train.max_steps=ten")
    assert result.returncode == 2 and "train.max_steps: 'ten' is not int or null" in result.stderr


@pytest.mark.slow
def test_a_sharded_checkpoint_on_another_shape_is_refused_in_one_line_before_any_work(tmp_path):
    """The latest checkpoint holds 2 processes' ZeRO-3 shards; one plain process is refused before the model loads (the
    model named does not exist: reaching it would be another error). launch/train.py prints it as ``error: ...``."""
    from dpo_dist.train.checkpoint import CheckpointError

    folder = tmp_path / "out" / "checkpoint-3"
    folder.mkdir(parents=True)
    shape = {"processes": 2, "per_device_batch_size": 4, "gradient_accumulation_steps": 1, "engine": "ZeRO-3"}
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3, "pairs_seen": 24, "shape": shape}))
    with pytest.raises(CheckpointError) as error:
        run(str(tmp_path / "no-model"), str(tmp_path / "no-data.jsonl"), tmp_path / "out")
    assert str(error.value) == ("checkpoint-3 was written under ZeRO-3 (2 processes), this launch runs one process: "
                                "resume it under ZeRO-3, any process count, or start over with train.resume=never")


def test_bad_data_exits_nonzero_naming_the_row(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}) + "\n"
                   + json.dumps({"prompt": "p", "chosen": " same", "rejected": " same"}) + "\n")
    result = cli(*overrides(tiny_model_dir, str(bad), tmp_path / "out"))
    assert result.returncode == 1
    assert "bad.jsonl: row 1: chosen is identical to rejected" in result.stderr


def test_help_lists_every_option():
    from dpo_dist.config import Config, describe

    result = cli("--help", timeout=60)
    assert result.returncode == 0
    lines = describe(Config())
    assert len(lines) > 50
    for line in lines:
        key = line.split()[0]
        assert key in result.stdout


@pytest.mark.slow
def test_the_launch_warning_is_the_one_the_readme_explains_and_the_shipped_config_silences_it(tmp_path):
    """With no accelerate config on the machine (HF_HOME empty), plain `accelerate launch` lists the four launcher
    values it defaulted (the README says what they mean); --config_file accelerate_configs/single_process.yaml sets
    them and it prints nothing of the kind. --help: the cheap path through the same launcher."""
    env = {**os.environ, "HF_HOME": str(tmp_path)}
    script = os.path.join(ROOT, "launch", "train.py")
    plain = subprocess.run(accelerate_launch(script, "--help"), capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    said = plain.stdout + plain.stderr
    assert plain.returncode == 0 and "were not passed to `accelerate launch`" in said, said[-2000:]
    for flag in ("--num_processes", "--num_machines", "--mixed_precision", "--dynamo_backend"):
        assert f"`{flag}` was set to a value of" in said
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "values were not passed to `accelerate launch`" in readme
    config = os.path.join(ROOT, "accelerate_configs", "single_process.yaml")
    quiet = subprocess.run(accelerate_launch("--config_file", config, script, "--help"), capture_output=True,
                           text=True, timeout=120, cwd=ROOT, env=env)
    assert quiet.returncode == 0 and "usage: train.py" in quiet.stdout
    assert "not passed" not in quiet.stdout + quiet.stderr


@pytest.mark.slow
def test_accelerate_launch_on_cpu_uses_every_core(tiny_model_dir, data_file, tmp_path):
    """Plain `accelerate launch` sets OMP_NUM_THREADS=1 without GPUs; the trainer gives one process all the CPUs."""
    command = accelerate_launch("--num_processes", "1", os.path.join(ROOT, "launch", "train.py"),
                                *overrides(tiny_model_dir, data_file, tmp_path / "out", **{"train.max_steps": 1}))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"x 1 processes, {len(os.sched_getaffinity(0))} CPU threads each" in result.stdout
    if host_memory.glibc() is not None:  # and it keeps what PyTorch frees (tests/test_host_memory.py)
        assert re.search(r"host memory: what PyTorch frees is kept for reuse, for this process's life \(malloc: blocks "
                         r"up to (1 GiB|32 MiB) from the heap", result.stdout)


def test_every_pair_dropped_is_an_error(tiny_model_dir, tmp_path):
    long_prompts = tmp_path / "long.jsonl"
    long_prompts.write_text("".join(
        json.dumps({"prompt": " ".join(WORDS * 3), "chosen": " yes", "rejected": " no"}) + "\n" for _ in range(10)))
    from dpo_dist.data.load import DataError

    with pytest.raises(DataError, match="every training pair was dropped"):
        run(tiny_model_dir, str(long_prompts), tmp_path / "out", **{"data.max_prompt_length": None,
                                                                     "data.max_length": 16})


def test_gradient_checkpointing_gives_the_same_trajectory(tiny_model_dir, data_file, tmp_path):
    for lora in (False, True):
        plain = run(tiny_model_dir, data_file, tmp_path / f"plain{lora}", **{"lora.enabled": lora})["records"]
        reset_accelerate_state()
        checkpointed = run(tiny_model_dir, data_file, tmp_path / f"ckpt{lora}",
                           **{"lora.enabled": lora, "model.gradient_checkpointing": True})["records"]
        assert_same_trajectory(plain, checkpointed, atol=1e-5)


def test_dropout_is_off_in_the_policy(tmp_path):
    """Attention dropout 0.5 in the config: after loading, two training-mode forwards agree exactly."""
    from dpo_dist.model.load import load_policy

    tokenizer = make_tokenizer("nobos")
    folder = str(tmp_path / "m")
    make_llama(len(tokenizer), attention_dropout=0.5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    for lora in (False, True):
        cfg = load_config(None, [f"model.name_or_path={folder}", f"lora.enabled={str(lora).lower()}", "lora.dropout=0.0"])
        model, tok = load_policy(cfg, torch.device("cpu"))
        model.train()
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
        assert tok.pad_token == tok.eos_token


def test_debug_shows_a_pair_with_masked_labels_and_first_step_costs(tiny_model_dir, data_file, tmp_path, capsys):
    run(tiny_model_dir, data_file, tmp_path / "out", **{"train.debug": True, "train.max_steps": 3})
    shown = capsys.readouterr().out
    assert "as the model sees it: [masked] <scored>" in shown
    chosen_line = shown.split("chosen: ")[1].split("\n")[1]
    assert chosen_line.strip().startswith("[") and chosen_line.strip().endswith("<<|endoftext|>>"), chosen_line
    assert "debug: step 3 took" in shown and "GiB (cpu)" in shown
    assert torch.is_anomaly_enabled()
    torch.autograd.set_detect_anomaly(False)


def test_the_debug_pair_marks_padding_as_padding_even_when_it_is_eos():
    """Without a pad token the trainer pads with EOS: the shorter row's padding is one {pad ×N} marker, counted by
    the attention mask, while the response's own EOS is a scored token, shown once."""
    from dpo_dist.data.show import show_pair

    tokenizer = make_tokenizer("nobos")
    tokenizer.pad_token = tokenizer.eos_token  # as load_tokenizer does
    eos, word = tokenizer.eos_token_id, tokenizer(" good", add_special_tokens=False)["input_ids"]
    prompt = tokenizer("The movie was", add_special_tokens=False)["input_ids"]
    example = {"prompt_input_ids": prompt, "chosen_input_ids": word + [eos], "rejected_input_ids": word * 9 + [eos],
               "row": 7}
    shown = show_pair(example, tokenizer).splitlines()
    assert shown[0] == ("one training pair (row 7), as the model sees it: [masked] <scored> {pad ×N}: N positions of "
                        "padding, not data")
    n = len(prompt) + len(word) + 1
    padding = 8 * len(word)
    assert shown[1] == f"chosen: {n} tokens, {len(prompt)} masked, {len(word) + 1} scored; {padding} padding"
    assert shown[2].endswith(f"<{tokenizer.eos_token}>{{pad ×{padding}}}") and shown[2].count(tokenizer.eos_token) == 1
    assert shown[3] == f"rejected: {n + padding} tokens, {len(prompt)} masked, {9 * len(word) + 1} scored"
    assert "pad ×" not in shown[4] and shown[4].endswith(f"<{tokenizer.eos_token}>")


@pytest.mark.parametrize("kind, expected", [
    ("constant", [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]),
    ("cosine", [1 / 3, 2 / 3, 1.0, 0.8535534, 0.5, 0.1464466]),
])
def test_learning_rate_schedules(kind, expected):
    """Warmup 2 of 6 steps: (step + 1) / 3, then constant, linear to 0, or half a cosine to 0 over the last 4."""
    from dpo_dist.train.optim import lr_lambda

    factor = lr_lambda(6, 2, kind)
    assert [factor(step) for step in range(6)] == pytest.approx(expected, abs=1e-6)


def test_adamw_is_torchs_fused_kernel_with_the_loops_update():
    """On CPU (and CUDA) torch's fused AdamW: the update of the per-tensor loop to float rounding, after 10 steps
    with weight decay and a schedule-like learning rate change; integer or other-device parameters keep the default."""
    from dpo_dist.train.optim import build_optimizer, torch_adamw_kernel

    cfg = load_config(None, ["train.learning_rate=1e-2", "train.weight_decay=0.1"])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Linear(32, 8))
    frozen = model[0].bias.requires_grad_(False)
    twin = [p.detach().clone().requires_grad_(True) for p in model.parameters() if p.requires_grad]
    ours = build_optimizer(model, cfg)
    assert ours.defaults["fused"] is True and len(ours.param_groups[0]["params"]) == 3  # the frozen bias left out
    loop = torch.optim.AdamW(twin, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), foreach=False)
    for step in range(10):
        grads = [torch.randn_like(p) for p in twin]
        for p, q, g in zip(ours.param_groups[0]["params"], twin, grads):
            p.grad, q.grad = g.clone(), g.clone()
        for optimizer in (ours, loop):
            optimizer.param_groups[0]["lr"] = 1e-2 / (step + 1)
            optimizer.step()
    for p, q in zip(ours.param_groups[0]["params"], twin):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-7, rtol=1e-6)
    assert not build_optimizer(model, cfg, grad_scaler=True).defaults["fused"]  # see test_an_fp16_overflow_skips_...
    assert torch_adamw_kernel([torch.zeros(2, dtype=torch.int64)]) == {}
    assert torch_adamw_kernel([torch.zeros(2, device="meta")]) == {}
    assert frozen.grad is None


FUSED_ADAMW_PROBE = """
import torch
# one thread: with 2 threads on the DEFAULT (no AVX) kernel, 1 of 16 fresh processes differed by 3.2e-6 (stop 15;
# cause not found, left in the notes); 16 of 16 with one thread gave 1.5e-8
torch.set_num_threads(1)
torch.manual_seed(0)
shapes = [(16, 576), (1536, 16), (7,)]
ours = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
loop = [torch.nn.Parameter(p.detach().clone()) for p in ours]
fused = torch.optim.AdamW(ours, lr=1e-2, weight_decay=0.1, fused=True)
plain = torch.optim.AdamW(loop, lr=1e-2, weight_decay=0.1, foreach=False)
for _ in range(10):
    for p, q in zip(ours, loop):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    fused.step()
    plain.step()
print(torch.backends.cpu.get_cpu_capability(), max((p - q).abs().max().item() for p, q in zip(ours, loop)))
"""


@pytest.mark.parametrize("capability", ["AVX512", "AVX2", "DEFAULT"])
def test_fused_adamw_matches_the_loop_on_each_cpu_kernel(capability):
    """torch picks its CPU kernels by the CPU (AVX512, AVX2, plain): the fused AdamW's update equals the per-tensor
    loop's on each (ATEN_CPU_CAPABILITY simulates a smaller CPU; AVX512 only where the CPU has it)."""
    result = subprocess.run([sys.executable, "-c", FUSED_ADAMW_PROBE], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "ATEN_CPU_CAPABILITY": capability.lower()})
    assert result.returncode == 0, result.stderr
    used, diff = result.stdout.split()
    if capability == "AVX512" and used != "AVX512":
        pytest.skip(f"this CPU has no AVX512 kernels for torch (it uses {used})")
    assert used == capability
    assert float(diff) < 1e-6  # measured: 1.5e-8 on each of the three


@pytest.mark.parametrize("environ, affinity, expected", [
    ({}, {0, 1, 2, 3}, (4, "the affinity mask")),
    ({"SLURM_CPUS_ON_NODE": "1"}, {0, 1}, (1, "SLURM_CPUS_ON_NODE=1")),  # the local cluster: no binding, 1 CPU a node
    ({"SLURM_CPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "2"}, set(range(16)), (4, "SLURM_CPUS_ON_NODE=8 / 2 tasks")),
    ({"SLURM_CPUS_PER_TASK": "3", "SLURM_CPUS_ON_NODE": "8"}, set(range(16)), (3, "SLURM_CPUS_PER_TASK=3")),
    ({"SLURM_CPUS_PER_TASK": "8"}, {0, 1}, (2, "the affinity mask (smaller than SLURM_CPUS_PER_TASK=8)")),
])
def test_cpu_budget_under_slurm_and_without(environ, affinity, expected):
    """SLURM's share of the node counts, not the machine (slurmd without task binding leaves the mask whole); the
    affinity mask caps it; without SLURM the mask decides."""
    from dpo_dist.distributed import cpu_budget

    assert cpu_budget(environ, affinity) == expected


@pytest.mark.parametrize("environ, local, expected", [
    ({"SLURM_CPUS_ON_NODE": "1"}, "1", 1),
    ({"SLURM_CPUS_ON_NODE": "2"}, "2", 1),
    ({}, "1", None),  # the affinity mask: every CPU this test may use
])
def test_cpu_threads_divide_the_budget_by_local_processes(monkeypatch, environ, local, expected):
    from types import SimpleNamespace

    from dpo_dist.distributed import set_cpu_threads

    for name in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    expected = expected or len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        threads, why = set_cpu_threads(None, SimpleNamespace(device=torch.device("cpu"), num_processes=2))
        assert threads == expected == torch.get_num_threads()
        assert why.endswith(f"/ {local} processes on this machine"), why
        assert set_cpu_threads(3, SimpleNamespace(device=torch.device("cpu"), num_processes=2)) == (3, "train.cpu_threads")
        assert set_cpu_threads(None, SimpleNamespace(device=torch.device("cuda", 0), num_processes=2)) is None
    finally:
        torch.set_num_threads(before)


NOISY = """
import logging, sys, warnings
sys.path.insert(0, {root!r})
from dpo_dist.distributed import configure_logging
configure_logging(int(sys.argv[1]))
import transformers
for _ in range(3):  # a library's deprecation, called at every step
    warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)
warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)  # the same from another line: once
warnings.warn_explicit("`is_gradient_checkpointing` is deprecated and will be removed in v6", FutureWarning,
                       "transformers/modeling_utils.py", 3314, module="transformers.modeling_utils")  # peft's: none
logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
transformers.utils.logging.get_logger("transformers.modeling_utils").warning("a transformers notice")
deepspeed = logging.getLogger("DeepSpeed")  # what DeepSpeed does when it is imported, after the setup
deepspeed.setLevel(logging.WARNING)
deepspeed.propagate = False
deepspeed.addHandler(logging.StreamHandler(sys.stdout))
deepspeed.warning("Setting accelerator to CPU.")
logging.getLogger("dpo_dist.model.load").info("policy loaded")
logging.getLogger("matplotlib.font_manager").info("generated new fontManager")  # another library's INFO
logging.getLogger("dpo_dist.train").error("rank-specific trouble")
"""


@pytest.mark.slow
def test_non_main_ranks_are_quiet_and_warnings_are_one_line_once():
    """Rank 0 shows our INFO and each library's notice once, a Python warning on one line and once wherever it is
    issued from (not peft's read of a renamed transformers property: filter_warnings), but not other libraries' INFO;
    another rank only its errors (every process printed the same FutureWarnings and notices: nodes x processes copies
    in slurm-<job>.out)."""
    def output(rank):
        result = subprocess.run([sys.executable, "-c", NOISY.format(root=ROOT), str(rank)], capture_output=True,
                                text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": ""})
        assert result.returncode == 0, result.stderr
        return [re.sub(r"^[\d-]+ [\d:,]+ ", "", line) for line in (result.stdout + result.stderr).splitlines()]

    main = output(0)
    assert sum("FutureWarning" in line for line in main) == 1, main
    assert "FutureWarning: `is_gradient_checkpointing` is deprecated (<string>:8)" in main
    for notice in ("Failed to load CPU gemm_4bit_forward", "a transformers notice", "Setting accelerator to CPU.",
                   "INFO dpo_dist.model.load: policy loaded", "ERROR dpo_dist.train: rank-specific trouble"):
        assert sum(notice in line for line in main) == 1, (notice, main)
    assert not any("fontManager" in line for line in main), main
    assert output(1) == ["ERROR dpo_dist.train: rank-specific trouble"]


def test_explicit_cpu_threads(tiny_model_dir, data_file, tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        run(tiny_model_dir, data_file, tmp_path / "out", **{"train.cpu_threads": 1, "train.max_steps": 1})
        assert torch.get_num_threads() == 1 and "1 CPU threads each" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)


def test_a_given_eval_file_wins_over_eval_ratio(tiny_model_dir, data_file, tmp_path):
    """data.eval_ratio has a default; naming an eval file must not clash with it (it is ignored, as --help says)."""
    result = run(tiny_model_dir, data_file, tmp_path / "out", **{"data.eval_source": data_file, "data.eval_ratio": 0.2,
                                                                "train.max_steps": 1})
    assert result["counts"]["train_pairs"] == 81 and result["counts"]["eval_pairs"] == 81


@pytest.mark.parametrize("loss, first", [
    ({"loss.loss_type": "robust", "loss.label_smoothing": 0.1}, math.log(2)),
    ({"loss.loss_type": "hinge"}, 1.0),
    ({"loss.loss_type": "ipo"}, (1 / (2 * 0.1)) ** 2),
    ({"loss.loss_type": "sigmoid", "loss.label_smoothing": 0.2}, math.log(2)),
    ({"loss.loss_type": "simpo", "reference.mode": "none"}, None),  # reference-free, length-averaged
    ({"loss.loss_type": "sigmoid", "loss.rpo_alpha": 1.0}, None),  # ln 2 + the chosen NLL per token
    # a weighted list: 0.5 sigmoid + 2 hinge at h = 0 is 0.5 ln 2 + 2 (1 - 0)
    ({"loss.loss_type": ["sigmoid", "hinge"], "loss.loss_weights": [0.5, 2.0]}, 0.5 * math.log(2) + 2.0),
    ({"loss.loss_type": "apo_zero"}, 1.0),  # (1 - sig(0)) + sig(0)
    ({"loss.loss_type": "orpo", "reference.mode": "none"}, None),  # reference-free: NLL per token + odds ratio
    # LD-DPO on policy and (cached, precomputed) reference alike: at policy = reference h = 0 again, ln 2
    ({"loss.ld_alpha": 0.5}, math.log(2)),
    ({"loss.ld_alpha": 0.5, "reference.mode": "online"}, math.log(2)),
    ({"loss.f_divergence_type": "js_divergence"}, math.log(2)),  # equal scores on both sides at policy = reference
    ({"loss.use_weighting": True}, None),  # WPO: ln 2 times a weight in (0, 1)
], ids=["robust", "hinge", "ipo", "cdpo", "simpo", "rpo", "weighted-list", "apo_zero", "orpo", "ld_dpo",
        "ld_dpo-online", "js_divergence", "wpo"])
def test_every_loss_type_trains(loss, first, tiny_model_dir, data_file, tmp_path):
    """Each loss through the whole trainer: its value at policy = reference (step 1) where it has one, and it falls."""
    records = run(tiny_model_dir, data_file, tmp_path / "out", **{"train.max_steps": 6, **loss})["records"]
    losses = [r["loss"] for r in records]
    if first is not None:
        assert losses[0] == pytest.approx(first, abs=1e-4)
    if "loss.rpo_alpha" in loss:
        nll = -records[0]["logps/chosen"]  # summed; the RPO term is per token, so it is positive and below the sum
        assert math.log(2) < losses[0] < math.log(2) + nll
    if loss.get("loss.loss_type") == "orpo":  # NLL per token + 0.1 x (-log sig(log odds)): above the NLL per token
        nll = -records[0]["logps/chosen"]
        assert 0 < losses[0] < nll + 0.1 * 20 and records[0]["rewards/chosen"] < 0  # beta x a log-prob per token
    if loss.get("loss.ld_alpha") is not None or loss.get("loss.use_weighting"):
        assert records[0]["rewards/chosen"] == pytest.approx(0, abs=1e-4)
    if loss.get("loss.use_weighting"):  # the weight grows as the policy grows sure of both responses, so the loss
        assert 0 < losses[0] < math.log(2)  # need not fall: the margin it trains must grow
        assert records[-1]["rewards/margins"] > records[0]["rewards/margins"] + 0.1
        assert all(math.isfinite(x) for x in losses)
        return
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses


def test_the_gguf_conversion_bar_is_off_in_a_log_file_only(monkeypatch):
    """transformers' GGUF loader has its own tqdm bar; in a log file (not a terminal) it is disabled while the
    built-in model converts, and put back after; on a terminal it shows."""
    from transformers import modeling_gguf_pytorch_utils as gguf

    from dpo_dist.model import builtin

    original = gguf.tqdm
    monkeypatch.setattr(builtin.sys.stderr, "isatty", lambda: False, raising=False)
    with builtin.quiet_gguf_progress():
        assert gguf.tqdm(range(3)).disable
    assert gguf.tqdm is original
    monkeypatch.setattr(builtin.sys.stderr, "isatty", lambda: True, raising=False)
    with builtin.quiet_gguf_progress():
        bar = gguf.tqdm(range(3))
        assert not bar.disable
        bar.close()
