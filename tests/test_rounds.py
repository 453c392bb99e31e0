"""Iterative DPO rounds (rounds.count > 1) end to end, on a tiny model built here and a deterministic judge.

The judge is ``python:tests.judge_functions:length_score``: the longer completion wins, so which completion of a
prompt is chosen is known from its text. Every run here is 2 rounds of 3 steps over 16 training prompts (3
completions each) and 4 held-out prompts (2 each), at a learning rate high enough that round 1 moves the policy.
"""

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from dpo_dist.config import load_config
from training import (LENGTH, ROOT, accelerate_launch, prompt_rows, read_jsonl, reset_accelerate_state,
                      rounds_overrides)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
# Compared between runs: everything a rounds.jsonl line says except how long it took.
TIMES = ("seconds", "seconds_by_stage")
STEP_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
             "grad_norm", "lr", "round")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    return prompt_rows(tmp_path_factory.mktemp("prompts") / "prompts.jsonl")


def settings(model_dir, prompts, out, **extra):
    return rounds_overrides(model_dir, prompts, out, **extra)


def run_rounds(model_dir, prompts, out, **extra):
    from dpo_dist.rounds.loop import train_rounds

    result = train_rounds(load_config(None, settings(model_dir, prompts, out, **extra)))
    reset_accelerate_state()
    return result


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("rounds-lora") / "out"
    return run_rounds(tiny_model_dir, prompts_file, out), out


@pytest.fixture(scope="module")
def full_run(tiny_model_dir, prompts_file, tmp_path_factory):
    """Full fine-tuning: the reference and the KL come from a frozen copy of the starting model."""
    out = tmp_path_factory.mktemp("rounds-full") / "out"
    return run_rounds(tiny_model_dir, prompts_file, out, **{"lora.enabled": False}), out


def without_times(lines):
    return [{k: v for k, v in line.items() if k not in TIMES} for line in lines]


def assert_same_rounds(a, b, atol):
    """Two runs' rounds.jsonl lines: the same counts and samples' scores, the evaluations within ``atol``."""
    assert len(a) == len(b)
    for x, y in zip(without_times(a), without_times(b)):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], float):
                assert x[key] == pytest.approx(y[key], abs=atol), (x["round"], key)
            else:
                assert x[key] == y[key], (x["round"], key)


def assert_same_steps(a, b, atol):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in STEP_KEYS:
            assert x[key] == pytest.approx(y[key], abs=atol), (x["step"], key)


def samples_of(out, r):
    return [row["completions"] for row in read_jsonl(os.path.join(out, f"round-{r}", "samples.jsonl"))]


def test_each_round_writes_its_line_its_pairs_and_its_evaluation(lora_run):
    result, out = lora_run
    lines = read_jsonl(out / "rounds.jsonl")
    assert [line["round"] for line in lines] == [1, 2] == [line["round"] for line in result["rounds"]]
    for line in lines:
        for key in ("round", "pairs", "dropped_pairs", "mean_score", "eval_score", "win_rate", "kl", "seconds"):
            assert key in line and math.isfinite(line[key]), key
        assert 0 <= line["win_rate"] <= 1 and line["pairs"] > 0 and line["judge"] == LENGTH
        folder = out / f"round-{line['round']}"
        samples = read_jsonl(folder / "samples.jsonl")
        assert len(samples) == 16 and all(len(row["completions"]) == len(row["scores"]) == 3 for row in samples)
        assert line["mean_score"] == pytest.approx(sum(sum(r["scores"]) for r in samples) / 48)
        for row in samples:  # the judge's scores are the lengths
            assert row["scores"] == [float(len(c)) for c in row["completions"]]
        pairs = read_jsonl(folder / "pairs.jsonl")
        assert len(pairs) == line["pairs"]
        for pair in pairs:  # best against worst: the longest completion against the shortest
            row = next(r for r in samples if r["prompt"] == pair["prompt"])
            assert len(pair["chosen"]) == max(map(len, row["completions"]))
            assert len(pair["rejected"]) == min(len(c) for c in row["completions"] if c.strip())
        # every prompt gives a pair or is counted as giving none
        assert line["pairs"] + line["prompts_without_pairs"] == 16
        evaluation = json.loads((folder / "eval.json").read_text())
        assert evaluation["eval_completions"] == 8 and evaluation["eval_score"] == pytest.approx(line["eval_score"])
    steps = read_jsonl(out / "metrics.jsonl")
    assert [(r["step"], r["round"]) for r in steps] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference at step 1
    assert os.path.isdir(out / "checkpoint-3") and os.path.isdir(out / "model")
    assert json.loads((out / "run.json").read_text())["pairs"]["train_pairs"] == sum(line["pairs"] for line in lines)


def policy_at(checkpoint):
    """The policy a checkpoint holds, loaded as a model (its adapter on its base)."""
    from dpo_dist.model.trained import load_trained
    from dpo_dist.publish.export import export_checkpoint

    return load_trained(export_checkpoint(str(checkpoint)), device=torch.device("cpu"))


def resample(model, tokenizer, cfg, r, ids, tmp_path):
    """Round ``r``'s sampling again, in this process, from ``model``."""
    from accelerate import Accelerator
    from accelerate.state import PartialState

    from dpo_dist.rounds.loop import round_sampling
    from dpo_dist.rounds.sampling import sample_round

    PartialState(cpu=True)
    accelerator = Accelerator(cpu=True)
    out = sample_round(model, tokenizer, ids, n=cfg.rounds.samples_per_prompt, sampling=round_sampling(cfg, r),
                       batch_size=cfg.rounds.generation_batch_size, accelerator=accelerator,
                       cache_dir=str(tmp_path / f"resampled-{r}"), show_progress=False)
    completions = out.completions
    reset_accelerate_state()
    return [tokenizer.batch_decode(group, skip_special_tokens=True) for group in completions]


def training_prompt_ids(cfg, tokenizer):
    from dpo_dist.data.prompts import load_prompts
    from dpo_dist.data.tokenization import Truncation, tokenize_prompt

    truncation = Truncation(cfg.data.max_length, cfg.data.max_prompt_length)
    return [tokenize_prompt(p, tokenizer, truncation) for p in load_prompts(cfg).train]


def test_round_two_samples_from_the_policy_round_one_ended_with(lora_run, tiny_model_dir, prompts_file, tmp_path):
    """Regenerated from checkpoint-3 (round 1's end), round 2's completions come back token for token; from the
    starting model with the same random numbers they do not, so the test tells the two apart."""
    from dpo_dist.model.trained import load_base_model

    _, out = lora_run
    cfg = load_config(None, settings(tiny_model_dir, prompts_file, out))
    trained = policy_at(out / "checkpoint-3")
    ids = training_prompt_ids(cfg, trained.tokenizer)
    assert resample(trained.model, trained.tokenizer, cfg, 2, ids, tmp_path) == samples_of(out, 2)
    start = load_base_model(trained, torch.device("cpu"))
    assert resample(start, trained.tokenizer, cfg, 2, ids, tmp_path / "start") != samples_of(out, 2)
    assert resample(start, trained.tokenizer, cfg, 1, ids, tmp_path / "start") == samples_of(out, 1)


def round_reference(out, r):
    """The reference log-probs a round trained with, (N, 2), in pairs.jsonl's order."""
    from safetensors.torch import load_file

    [path] = glob.glob(os.path.join(out, f"round-{r}", "reference", "reference-*.safetensors"))
    return load_file(path)["logps"]


def pair_logps(model, tokenizer, cfg, out, r):
    """Each of round ``r``'s pairs' (chosen, rejected) summed log-probs under ``model``, computed apart from the
    trainer: a plain forward of each prompt + response as training tokenizes them."""
    import datasets

    from dpo_dist.data.tokenization import Truncation, tokenize_pairs
    from dpo_dist.eval.scoring import response_logps

    pairs = datasets.Dataset.from_list(read_jsonl(os.path.join(out, f"round-{r}", "pairs.jsonl")))
    tokenized, dropped = tokenize_pairs(pairs, tokenizer, Truncation(cfg.data.max_length, cfg.data.max_prompt_length))
    assert dropped == 0
    score = dict(batch_size=8, device=torch.device("cpu"), pad_id=tokenizer.pad_token_id or 0)
    prompts = list(tokenized["prompt_input_ids"])
    return torch.stack([response_logps(model, prompts, list(tokenized[f"{side}_input_ids"]), **score)
                        for side in ("chosen", "rejected")], dim=1)


def test_reference_start_is_the_starting_model(lora_run, tiny_model_dir, prompts_file):
    from dpo_dist.model.trained import load_base_model

    _, out = lora_run
    cfg = load_config(None, settings(tiny_model_dir, prompts_file, out))
    trained = policy_at(out / "checkpoint-3")
    start = load_base_model(trained, torch.device("cpu"))
    expected = pair_logps(start, trained.tokenizer, cfg, out, 2)
    torch.testing.assert_close(round_reference(out, 2), expected, atol=1e-4, rtol=0)
    moved = pair_logps(trained.model, trained.tokenizer, cfg, out, 2)
    assert (moved - expected).abs().max() > 1e-2  # the policy at round 2's start is another model


@pytest.fixture(scope="module")
def previous_run(tiny_model_dir, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("rounds-previous") / "out"
    return run_rounds(tiny_model_dir, prompts_file, out, **{"rounds.reference": "previous"}), out


def test_reference_previous_is_the_policy_at_the_rounds_start(previous_run, lora_run, tiny_model_dir, prompts_file):
    """Round 2's reference log-probs are the policy's at checkpoint-3 (its adapter on), so round 2's first step has
    the policy equal to its reference: rewards 0 and loss ln 2, where reference=start has rewards far from 0."""
    _, out = previous_run
    cfg = load_config(None, settings(tiny_model_dir, prompts_file, out))
    trained = policy_at(out / "checkpoint-3")
    expected = pair_logps(trained.model, trained.tokenizer, cfg, out, 2)
    torch.testing.assert_close(round_reference(out, 2), expected, atol=1e-4, rtol=0)
    [fourth] = [r for r in read_jsonl(out / "metrics.jsonl") if r["step"] == 4]
    assert fourth["loss"] == pytest.approx(math.log(2), abs=1e-5) and abs(fourth["rewards/margins"]) < 1e-5
    [started] = [r for r in read_jsonl(lora_run[1] / "metrics.jsonl") if r["step"] == 4]
    assert abs(started["rewards/chosen"]) > 1e-3
    assert [line["reference"] for line in read_jsonl(out / "rounds.jsonl")] == ["start", "previous"]


def test_a_finished_run_run_again_says_so_and_does_nothing(lora_run, tiny_model_dir, prompts_file, capsys):
    _, out = lora_run
    before = {path: os.stat(path).st_mtime_ns for path in glob.glob(str(out / "**"), recursive=True)}
    result = run_rounds(tiny_model_dir, prompts_file, out)
    assert result["finished_before"] and [line["round"] for line in result["rounds"]] == [1, 2]
    assert "all 2 rounds are done and model/ is written; nothing to do" in capsys.readouterr().out
    assert {path: os.stat(path).st_mtime_ns for path in glob.glob(str(out / "**"), recursive=True)} == before


@pytest.mark.parametrize("function, said", [
    ("nan_score", "scored a completion nan"),
    ("wrong_count", "scores for"),
    ("raises", "raised"),
])
def test_a_bad_judge_stops_the_round_naming_the_judge_and_the_prompt(function, said, tiny_model_dir, prompts_file,
                                                                     tmp_path):
    from dpo_dist.train.checks import TrainingError

    out = tmp_path / "out"
    with pytest.raises(TrainingError) as stop:
        run_rounds(tiny_model_dir, prompts_file, out, **{"rounds.judge": f"python:tests.judge_functions:{function}"})
    reset_accelerate_state()
    message = str(stop.value)
    assert "\n" not in message and message.startswith("round 1: judge python:tests.judge_functions:" + function)
    assert said in message and "prompt '" in message
    assert not any(os.path.exists(out / "round-1" / name) for name in ("ranked.jsonl", "pairs.jsonl", "samples.jsonl"))


@pytest.fixture(scope="module")
def launch_settings(tiny_model_dir, prompts_file):
    """The runs' settings as command-line overrides, for an output folder: ``launch_settings(out, **extra)``."""
    return lambda out, **extra: settings(tiny_model_dir, prompts_file, out, **extra)


def launch_one(launch_settings, stop, out):
    """``launch/train.py`` in its own process (the real entry point), or with ``stop`` (``ROUND:STAGE``)
    ``tests/round_stop_launch.py``, which sends itself SIGTERM as that stage begins."""
    script = [os.path.join(ROOT, "launch", "train.py")] if stop is None else [
        os.path.join(ROOT, "tests", "round_stop_launch.py"), stop]
    return subprocess.run([sys.executable, *script, *launch_settings(out)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)


@pytest.mark.slow
def test_a_stop_in_each_stage_of_round_two_then_a_rerun_gives_the_uninterrupted_run(lora_run, launch_settings,
                                                                                      tmp_path):
    """SIGTERM as round 2's sampling, judging, reference, training and evaluation begin, one stop per launch of the
    same command: each exits 75 at the stage's next safe point; the last launch finishes the run, with the rounds and
    the step metrics of the run that was never stopped."""
    _, whole = lora_run
    out = tmp_path / "out"
    first = launch_one(launch_settings, "2:sampling", out)
    assert first.returncode == 75, first.stderr[-3000:]
    assert "preempted: stopped by SIGTERM in round 2" in first.stderr
    assert [line["round"] for line in read_jsonl(out / "rounds.jsonl")] == [1]
    cached = glob.glob(str(out / "round-2" / "samples-*" / "batch-*.json"))
    assert 0 < len(cached) < 4  # stopped after its first wave of batches, with those kept
    for stage in ("judging", "reference", "training", "eval"):
        stopped = launch_one(launch_settings, f"2:{stage}", out)
        assert stopped.returncode == 75, (stage, stopped.stderr[-3000:])
        assert [line["round"] for line in read_jsonl(out / "rounds.jsonl")] == [1], stage
    assert os.path.isdir(out / "checkpoint-4")  # the stop in training wrote its step's checkpoint
    last = launch_one(launch_settings, None, out)
    assert last.returncode == 0, last.stderr[-3000:]
    assert_same_rounds(read_jsonl(whole / "rounds.jsonl"), read_jsonl(out / "rounds.jsonl"), atol=1e-5)
    assert samples_of(whole, 2) == samples_of(out, 2)
    assert_same_steps(read_jsonl(whole / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl"), atol=1e-5)
    seconds = read_jsonl(out / "rounds.jsonl")[1]["seconds_by_stage"]
    assert set(seconds) == {"sampling", "judging", "pairing", "reference", "training", "eval"}


def launch_two(launch_settings, config, out, **extra):
    command = accelerate_launch("--config_file", os.path.join(ROOT, "accelerate_configs", f"{config}.yaml"),
                                "--num_processes", "2", os.path.join(ROOT, "launch", "train.py"))
    result = subprocess.run(command + launch_settings(out, **extra), capture_output=True, text=True, timeout=600,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 per device x 1 accumulation x 2 processes" in result.stdout, result.stdout[-3000:]
    return result


@pytest.mark.multiprocess
@pytest.mark.parametrize("config, lora", [("ddp", True), ("zero3", False), ("fsdp", False)],
                         ids=["ddp-lora", "zero3-full", "fsdp2-full"])
def test_two_processes_give_the_one_process_rounds(config, lora, lora_run, full_run, launch_settings, tmp_path):
    """The same completions token for token (each batch of prompts sampled with its own seed, whichever process
    samples it), the same pairs, and the same steps and evaluations within float noise."""
    _, single = lora_run if lora else full_run
    out = tmp_path / "out"
    launch_two(launch_settings, config, out, **{"lora.enabled": lora, "train.per_device_batch_size": 2})
    for r in (1, 2):
        assert samples_of(single, r) == samples_of(out, r), r
        assert read_jsonl(single / f"round-{r}" / "pairs.jsonl") == read_jsonl(out / f"round-{r}" / "pairs.jsonl")
    assert_same_rounds(read_jsonl(single / "rounds.jsonl"), read_jsonl(out / "rounds.jsonl"), atol=1e-4)
    assert_same_steps(read_jsonl(single / "metrics.jsonl"), read_jsonl(out / "metrics.jsonl"), atol=1e-4)


def test_qlora_rounds_on_the_built_in_prompts(tiny_model_dir, prompts_file, tmp_path):
    """QLoRA, the single-GPU path (the 4-bit base with its adapters off is the start), on the default prompts: the
    built-in sentiment set's, split as the set splits them."""
    from dpo_dist.data.sentiment import chosen_prompts

    cfg = load_config(None, settings(tiny_model_dir, "builtin:sentiment", tmp_path / "out",
                                     **{"data.sentiment.num_prompts": 12, "data.sentiment.eval_prompts": 4}))
    result = run_rounds(tiny_model_dir, "builtin:sentiment", tmp_path / "out",
                        **{"model.quantization": "4bit", "data.sentiment.num_prompts": 12,
                           "data.sentiment.eval_prompts": 4})
    lines = result["rounds"]
    assert [line["round"] for line in lines] == [1, 2]
    assert all(math.isfinite(line["kl"]) and line["pairs"] > 0 for line in lines)
    train, held_out = chosen_prompts(cfg.data.sentiment)
    assert [row["prompt"] for row in read_jsonl(tmp_path / "out" / "round-2" / "samples.jsonl")] == train
    assert list(dict.fromkeys(row["prompt"] for row in read_jsonl(tmp_path / "out" / "round-1" /
                                                                   "eval_samples.jsonl"))) == held_out


def test_evaluate_a_rounds_run_samples_its_held_out_prompts_with_its_judge(lora_run):
    """launch/evaluate.py's work on a rounds run: no held-out pairs (the rounds sampled theirs), the run's held-out
    prompts against the base, judged by the run's own judge."""
    from dpo_dist.eval.against_base import evaluate_run
    from dpo_dist.eval.options import EvalOptions

    _, out = lora_run
    results = evaluate_run(str(out), EvalOptions(samples_per_prompt=1, max_new_tokens=6, batch_size=4))
    assert results["preference"] is None
    assert results["generation"]["prompts"] == 4 and "held-out prompts of the run's rounds" in \
        results["generation"]["prompt_source"]
    assert results["win_rate"]["judge"] == LENGTH and math.isfinite(results["kl"]["kl"])
    texts = [row["prompt"] for row in read_jsonl(out / "round-1" / "eval_samples.jsonl")]
    assert [sample["prompt"] for sample in results["samples"]] == list(dict.fromkeys(texts))


@pytest.mark.parametrize("given, said", [
    ({"rounds.samples_per_prompt": 0}, "rounds.samples_per_prompt must be positive, got 0"),
    ({"rounds.temperature": 0}, "rounds.temperature must be positive"),
    ({"rounds.top_p": 1.5}, "rounds.top_p must be in (0, 1]"),
    ({"rounds.min_score_gap": -0.1}, "rounds.min_score_gap must not be negative"),
    ({"rounds.steps_per_round": 0}, "rounds.steps_per_round must be positive (or null)"),
    ({"rounds.judge": "oracle"}, "rounds.judge: unknown judge 'oracle'"),
    ({"rounds.judge": "python:judges"}, "write it as python:MODULE:FUNCTION"),
    ({"rounds.judge_template": "Good? {response}"}, "a judge template is read by llm:PATH judges only"),
    ({"rounds.judge": "llm:/models/judge", "rounds.judge_template": "Good?"}, "must hold {response}"),
    ({"rounds.judge_quantization": "4bit"}, "quantization 4bit applies to model judges only"),
    ({"rounds.samples_per_prompt": 1}, "a pair needs two completions of a prompt"),
    ({"data.responses": "ranking", "loss.loss_type": "plackett_luce"}, "data.responses=ranking is not taken by rounds"),
    ({"train.max_steps": 10}, "set rounds.steps_per_round"),
    ({"train.early_stopping_patience": 2}, "leave it unset with rounds.count > 1"),
    ({"reference.mode": "online", "rounds.reference": "previous"}, "use reference.mode=precomputed"),
    ({"reference.mode": "none", "loss.loss_type": "simpo"}, "reference.mode=none (reference-free losses) is not taken"),
    ({"lora.init_lora_weights": "pissa"}, "use lora.init_lora_weights=true or gaussian"),
    ({"data.source": "builtin:sentiment", "data.sentiment.eval_prompts": 0}, "data.sentiment.eval_prompts=0"),
    ({"data.eval_ratio": 0}, "set data.eval_ratio above 0, data.eval_source or data.eval_split"),
])
def test_what_rounds_cannot_take_is_refused_before_anything_loads(given, said, tiny_model_dir, prompts_file, tmp_path):
    """Each rounds setting checked by the config, one line naming it and, where it is a combination, what to use."""
    from dpo_dist.config import ConfigError

    with pytest.raises(ConfigError) as refused:
        load_config(None, settings(tiny_model_dir, prompts_file, tmp_path / "out", **given))
    assert said in str(refused.value) and "\n" not in str(refused.value)


def test_one_round_is_the_offline_run_and_takes_no_rounds_check(tiny_model_dir, prompts_file, tmp_path):
    """rounds.count=1 (the default) is today's run: what only rounds refuse (train.max_steps, ranking) is taken."""
    cfg = load_config(None, settings(tiny_model_dir, prompts_file, tmp_path / "out",
                                     **{"rounds.count": 1, "train.max_steps": 10}))
    assert cfg.rounds.count == 1 and cfg.train.max_steps == 10


def test_the_plain_trainer_sends_rounds_to_their_loop(tiny_model_dir, prompts_file, tmp_path):
    from dpo_dist.train.trainer import TrainingError, train

    with pytest.raises(TrainingError, match="rounds.count=2: iterative rounds run through "
                                            "dpo_dist.rounds.loop.train_rounds"):
        train(load_config(None, settings(tiny_model_dir, prompts_file, tmp_path / "out")))
    assert not os.path.exists(tmp_path / "out")
