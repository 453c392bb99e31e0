"""Ranking mode end to end (data.responses=ranking, loss.loss_type=plackett_luce) on tiny models built here.

The numbers pinned: at step 1 the policy is the reference, so every log-ratio is 0 and Plackett-Luce's loss of a
ranking of k is ln k! (each of its k - 1 choices picks one of the j left with probability 1/j: ln k + ln(k-1) + ...
+ ln 2); a batch's loss is the mean over its rankings, so rows of k = 2, 3, 4 give the mean of ln 2, ln 6, ln 24.
With loss.ranking_top_m=1 only the first choice is scored: ln k. A ranking of 2 is a pair, and Plackett-Luce on it is
the sigmoid loss, so a ranking run on pair rows follows the pairs-mode sigmoid run step by step.
"""

import json
import logging
import math
import os
import random
import re

import pytest
import torch

from dpo_dist.config import ConfigError, load_config
from dpo_dist.data.load import DataError, load_pairs
from training import WORDS, assert_same_trajectory, read_jsonl, reset_accelerate_state, run

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
RANKING = {"data.responses": "ranking", "loss.loss_type": "plackett_luce"}
ENDINGS = ("yes", "maybe", "perhaps", "no")  # best first


def ranked_rows(path, n, sizes=(4,), seed=0):
    """``n`` scored rows, row i with ``sizes[i % len(sizes)]`` completions listed worst first (scores 1..k), so the
    loader must sort them: the best ends in 'yes', then 'maybe', 'perhaps', the worst in 'no'."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for i in range(n):
            k = sizes[i % len(sizes)]
            endings = ENDINGS[:k - 1] + ENDINGS[-1:]
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))
            completions = [f" {' '.join(rng.choices(WORDS, k=rng.randint(1, 4)))} {e}" for e in reversed(endings)]
            handle.write(json.dumps({"prompt": prompt, "completions": completions,
                                     "scores": list(range(1, k + 1))}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return ranked_rows(tmp_path_factory.mktemp("ranked") / "four.jsonl", 40)


@pytest.fixture(scope="module")
def ranking_run(tiny_model_dir, four, tmp_path_factory):
    """4 steps of 8 rankings of 4 (32 train, 8 eval), eval at steps 2 and 4, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("ranking") / "out"
    result = run(tiny_model_dir, four, out, **RANKING, **{"train.eval_every": 2, "train.save_every": 2})
    reset_accelerate_state()
    return result, out


def test_step_one_loss_is_ln_k_factorial(ranking_run):
    result, _ = ranking_run
    first = result["records"][0]
    assert first["loss"] == pytest.approx(math.log(24), abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference
    assert result["counts"]["train_pairs"] == 32 and result["counts"]["eval_pairs"] == 8  # rankings
    assert result["records"][-1]["examples_seen"] == 32


def test_metrics_and_eval_metrics(ranking_run):
    """The pair metrics' names, read on each ranking's best and worst response, beside ranking and top-1 accuracy;
    the eval pass reports the same with eval/."""
    result, out = ranking_run
    last = result["records"][-1]
    names = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "rewards/ranking_accuracies", "rewards/top1_accuracies")
    for name in names:
        assert math.isfinite(last[name]) and math.isfinite(last[f"eval/{name}"]), name
    assert 0 <= last["rewards/ranking_accuracies"] <= 1 and 0 <= last["eval/rewards/top1_accuracies"] <= 1
    assert last["loss"] < math.log(24)  # it learns
    assert [r["step"] for r in read_jsonl(os.path.join(out, "metrics.jsonl")) if "eval/loss" in r] == [2, 4]
    assert os.path.isfile(os.path.join(out, "summary.txt"))


def test_reference_cache_holds_one_logp_per_response(ranking_run, tiny_model_dir, four, tmp_path, caplog):
    """Train and eval: (32, 4) and (8, 4) log-probs; a second run reads them and trains the same."""
    from safetensors.torch import load_file

    result, out = ranking_run
    cache_dir = f"{out}-refcache"
    shapes = sorted(tuple(load_file(os.path.join(cache_dir, name))["logps"].shape) for name in os.listdir(cache_dir))
    assert shapes == [(8, 4), (32, 4)]
    with caplog.at_level(logging.INFO, logger="dpo_dist.train.reference"):
        again = run(tiny_model_dir, four, tmp_path / "again", **RANKING, **{
            "train.eval_every": 2, "reference.cache_dir": cache_dir})
    assert sum("read from" in r.getMessage() for r in caplog.records) == 2
    assert sorted(os.listdir(cache_dir)) == sorted(os.listdir(cache_dir))  # nothing new written
    assert len(os.listdir(cache_dir)) == 2
    assert_same_trajectory(result["records"], again["records"], atol=1e-6)


@pytest.mark.slow
def test_resume_repeats_the_uninterrupted_run(ranking_run, tiny_model_dir, four, tmp_path):
    """Resumed from checkpoint-2 of the shared run, steps 3 and 4 are the uninterrupted run's."""
    result, out = ranking_run
    resumed = run(tiny_model_dir, four, tmp_path / "resumed", **RANKING, **{
        "train.eval_every": 2, "train.resume": str(out / "checkpoint-2"), "reference.cache_dir": f"{out}-refcache"})
    assert resumed["state"].global_step == 4
    tail = read_jsonl(os.path.join(tmp_path / "resumed", "metrics.jsonl"))
    assert [r["step"] for r in tail] == [1, 2, 3, 4] or [r["step"] for r in tail] == [3, 4]
    for want, got in zip(result["records"][2:], [r for r in tail if r["step"] > 2]):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "grad_norm", "rewards/ranking_accuracies",
                    "eval/loss", "eval/rewards/top1_accuracies"):
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=1e-6), (want["step"], key)


@pytest.mark.slow
def test_mixed_k_and_top_m(tiny_model_dir, tmp_path):
    """Rows of k = 2, 3, 4 in one batch of all 12: the mean of ln k!; with ranking_top_m=1 the mean of ln k."""
    rows = ranked_rows(tmp_path / "mixed.jsonl", 12, sizes=(2, 3, 4))
    settings = {**RANKING, "data.eval_ratio": 0.0, "train.per_device_batch_size": 12, "train.max_steps": 1}
    whole = run(tiny_model_dir, rows, tmp_path / "whole", **settings)["records"][0]
    assert whole["loss"] == pytest.approx((math.log(2) + math.log(6) + math.log(24)) / 3, abs=1e-6)
    reset_accelerate_state()
    top = run(tiny_model_dir, rows, tmp_path / "top", **settings, **{"loss.ranking_top_m": 1})["records"][0]
    assert top["loss"] == pytest.approx((math.log(2) + math.log(3) + math.log(4)) / 3, abs=1e-6)


@pytest.mark.slow
def test_rankings_of_two_follow_the_pairs_sigmoid_run(tiny_model_dir, data_file, tmp_path):
    """Pair rows in ranking mode are rankings of 2: the same data order and batches (one example per row either
    way), the same log-probs, and Plackett-Luce on 2 is the sigmoid loss: the same trajectory, eval included. Their
    reference caches share a folder and are keyed apart (4 files: train and eval of each mode)."""
    cache_dir = str(tmp_path / "refcache")
    settings = {"train.max_steps": 6, "train.eval_every": 3, "reference.cache_dir": cache_dir}
    pairs = run(tiny_model_dir, data_file, tmp_path / "pairs", **settings)["records"]
    reset_accelerate_state()
    ranking = run(tiny_model_dir, data_file, tmp_path / "ranking", **RANKING, **settings)["records"]
    assert pairs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert_same_trajectory(pairs, ranking, atol=1e-6)
    for record in ranking:  # of a pair, the top-1 and ranking accuracies are its accuracy
        assert record["rewards/ranking_accuracies"] == record["rewards/top1_accuracies"] == record["rewards/accuracies"]
    assert len(os.listdir(cache_dir)) == 4


@pytest.mark.slow
def test_online_reference_and_none(ranking_run, tiny_model_dir, four, tmp_path):
    """reference.mode=online scores each batch's responses as the precomputed cache does: the same trajectory;
    reference.mode=none trains on the policy's log-probs alone (step 1 is no longer ln 4!)."""
    result, _ = ranking_run
    online = run(tiny_model_dir, four, tmp_path / "online", **RANKING, **{
        "train.eval_every": 2, "reference.mode": "online"})["records"]
    assert_same_trajectory(result["records"], online, atol=1e-5)
    reset_accelerate_state()
    free = run(tiny_model_dir, four, tmp_path / "none", **RANKING, **{"reference.mode": "none"})["records"]
    assert all(math.isfinite(r["loss"]) for r in free) and free[0]["loss"] != pytest.approx(math.log(24), abs=1e-3)


def test_rows_in_ranking_mode(tmp_path):
    """A ranked row is one example, its responses best first; a pair row a ranking of 2; tied scores and a chosen
    beside a list of rejected are partial orders, bad rows."""
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": "Q", "completions": [" b", " a", " c"], "scores": [2, 3, 1]},
            {"prompt": "Q", "completions": [" b", " a", " c"], "ranking": [2, 0, 1]},
            {"prompt": "Q", "completions": [" b", " a", " c"], "scores": [2, 2, 1]},
            {"prompt": "Q", "chosen": " a", "rejected": [" b", " c"]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=re.escape("row 2: completions[0] and completions[1] tie at score 2: "
                                                  "data.responses=ranking needs a strict order")):
        load_pairs(str(path), responses="ranking")
    got, report = load_pairs(str(path), responses="ranking", on_bad_row="skip")
    assert got["responses"] == [[" a", " b", " c"], [" c", " b", " a"]]
    assert got["chosen"] == [" a", " c"] and got["rejected"] == [" c", " a"]
    assert report.skipped == {"partial_order": 2} and report.rows_kept == 2
    pair = tmp_path / "pair.jsonl"
    pair.write_text(json.dumps({"prompt": "Q", "chosen": " y", "rejected": " n"}) + "\n")
    assert load_pairs(str(pair), responses="ranking")[0]["responses"] == [[" y", " n"]]


def test_tokenized_rankings_are_pairs_token_for_token(tiny_model_dir):
    """Each response of a ranking is tokenized and cut as a pair's: a ranking of 2 has the pair's token ids."""
    from transformers import AutoTokenizer

    from dpo_dist.data.tokenization import Truncation, tokenize_group, tokenize_pair

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    truncation = Truncation(max_length=12, max_prompt_length=6)
    prompt = " ".join(WORDS[:9])
    chosen, rejected = " great music acting " * 3, " no"
    pair = tokenize_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected}, tokenizer, truncation,
                         add_bos=False)
    group = tokenize_group({"prompt": prompt, "responses": [chosen, rejected]}, tokenizer, truncation, add_bos=False)
    assert group == {"prompt_input_ids": pair["prompt_input_ids"],
                     "responses_input_ids": [pair["chosen_input_ids"], pair["rejected_input_ids"]]}
    assert len(group["prompt_input_ids"]) == 6 and len(group["responses_input_ids"][0]) == 6


@pytest.mark.parametrize("changes, message", [
    ({"data.min_score_gap": 1.0}, "data.min_score_gap=1.0 drops pairs; data.responses=ranking keeps every response"),
    ({"data.pair_rule": "all_pairs"}, "data.pair_rule=all_pairs makes pairs of a ranked row; data.responses=ranking"),
    ({"loss.loss_type": "sigmoid"}, "loss.loss_type=sigmoid is pairwise"),
    ({"loss.ld_alpha": 0.5}, "loss.ld_alpha (LD-DPO) weights a pair's longer response"),
    ({"loss.use_weighting": True}, "loss.use_weighting (WPO) weights a pair"),
    ({"loss.rpo_alpha": 1.0}, "loss.rpo_alpha (RPO) adds an NLL on a pair's chosen response"),
    ({"loss.label_smoothing": 0.1}, "loss.label_smoothing is not defined for plackett_luce"),
])
def test_ranking_refusals(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, [f"{k}={v}" for k, v in {**RANKING, **changes}.items()])
    cfg = load_config(None, [f"{k}={v}" for k, v in RANKING.items()])  # the mode itself loads
    assert cfg.data.responses == "ranking"


def test_step_stats_of_groups_by_hand():
    """ranking_losses' stats on a hand batch: best and worst of a group of 3 and one of 2 (padded)."""
    from dpo_dist.train.metrics import reduce_stats

    # loss, chosen, rejected, accuracy, logps/chosen, logps/rejected, tokens; then the ranking counts
    stats = torch.tensor([[1.0, 0.3, -0.1, 1.0, -5.0, -7.0, 10.0, 2.0, 3.0, 0.0, 1.0],
                          [0.5, 0.1, 0.2, 0.0, -4.0, -6.0, 6.0, 0.0, 1.0, 0.0, 1.0]])
    reduced = reduce_stats(stats, prefix="eval/")
    assert reduced["eval/rewards/ranking_accuracies"] == pytest.approx(0.5)
    assert reduced["eval/rewards/top1_accuracies"] == 0.0
    assert reduced["eval/rewards/margins"] == pytest.approx(0.2 - 0.05)


def test_held_out_metrics_of_rankings(tiny_model_dir):
    """launch/evaluate.py's held-out preference metrics take rankings too: with the base as both policy and
    reference, the loss is ln k! and the ranking accuracies are there."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_dist.eval.against_base import preference_metrics

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rankings = [{"prompt_input_ids": [5, 6, 7], "responses_input_ids": [[8, 9, 2], [10, 2], [11, 12, 13, 2]]},
                {"prompt_input_ids": [7, 5], "responses_input_ids": [[9, 2], [12, 2], [8, 2]]}]
    cfg = load_config(None, [f"{k}={v}" for k, v in RANKING.items()])
    got = preference_metrics(model, model, rankings, cfg, tokenizer, batch_size=2, device=torch.device("cpu"))
    assert got["loss"] == pytest.approx(math.log(6), abs=1e-6) and got["pairs"] == 2
    assert "rewards/ranking_accuracies" in got and "rewards/top1_accuracies" in got


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"train.packing": "off"}, {"train.share_prompt": False}], ids=["padded", "unshared"])
def test_other_layouts_follow_the_packed_run(ranking_run, tiny_model_dir, four, tmp_path, layout):
    """train.packing=off (a padded row per response) and train.share_prompt=false (the prompt packed once per
    response), the reference computed that way too, train as the shared-prompt packing does."""
    result, _ = ranking_run
    other = run(tiny_model_dir, four, tmp_path / "other", **RANKING, **{"train.eval_every": 2, **layout})["records"]
    assert other[0]["loss"] == pytest.approx(math.log(24), abs=1e-6)
    assert_same_trajectory(result["records"], other, atol=1e-5)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_process_ddp_equals_one_process(ranking_run, tiny_model_dir, four, tmp_path):
    """2 DDP processes with 4 rankings each (the reference precompute and the eval sharded over them) follow the
    shared one-process run with 8."""
    import subprocess

    from training import ROOT, accelerate_launch, overrides

    result, _ = ranking_run
    command = accelerate_launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                                "--dynamo_backend", "no", os.path.join(ROOT, "launch", "train.py"))
    command += overrides(tiny_model_dir, four, tmp_path / "two", **RANKING, **{
        "train.eval_every": 2, "train.save_every": 2, "train.per_device_batch_size": 4})
    launched = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert "x 2 processes" in launched.stdout, launched.stdout[-2000:]
    two = read_jsonl(os.path.join(tmp_path / "two", "metrics.jsonl"))
    assert_same_trajectory(result["records"], two, atol=1e-5)
    for want, got in zip(result["records"], two):
        for key in ("rewards/ranking_accuracies", "rewards/top1_accuracies"):
            if want["step"] > 1:
                assert got[key] == pytest.approx(want[key], abs=1e-6), (want["step"], key)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("config", ["zero3", "fsdp"])
def test_sharded_runs_equal_one_process(ranking_run, tiny_model_dir, four, tmp_path, config):
    """ZeRO-3 and FSDP2 over 2 processes with 4 rankings each (the reference precompute served by the shards) follow
    the shared one-process run, at the tolerance their pair runs are held to (tests/test_deepspeed.py, test_fsdp.py)."""
    import subprocess

    from training import ROOT, accelerate_launch, overrides

    if config == "zero3":
        pytest.importorskip("deepspeed")
    result, _ = ranking_run
    command = accelerate_launch("--config_file", os.path.join(ROOT, "accelerate_configs", f"{config}.yaml"),
                                "--num_processes", "2", os.path.join(ROOT, "launch", "train.py"))
    command += overrides(tiny_model_dir, four, tmp_path / "out", **RANKING, **{
        "train.eval_every": 2, "train.per_device_batch_size": 4})
    launched = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert launched.returncode == 0, launched.stderr[-4000:]
    assert "4 per device x 1 accumulation x 2 processes" in launched.stdout, launched.stdout[-2000:]
    assert_same_trajectory(result["records"], read_jsonl(os.path.join(tmp_path / "out", "metrics.jsonl")), atol=1e-4)


@pytest.mark.slow
def test_evaluate_command_reports_the_rankings(ranking_run, tmp_path):
    """launch/evaluate.py on the shared ranking run: its held-out metrics are the trainer's last eval (the base as
    the reference), ranking and top-1 accuracy included, and the report says what chosen and rejected mean."""
    import subprocess
    import sys

    from training import ROOT

    result, out = ranking_run
    done = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), str(out), "--num_prompts", "2",
                           "--max_new_tokens", "4", "--samples_per_prompt", "1", "--no_plot", "--out",
                           str(tmp_path / "eval")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    p = json.load(open(tmp_path / "eval" / "results.json"))["preference"]
    last = [r for r in result["records"] if "eval/loss" in r][-1]
    assert p["pairs"] == 8
    for key, metric in (("loss", "eval/loss"), ("reward_accuracy", "eval/rewards/accuracies"),
                        ("rewards/ranking_accuracies", "eval/rewards/ranking_accuracies"),
                        ("rewards/top1_accuracies", "eval/rewards/top1_accuracies")):
        assert p[key] == pytest.approx(last[metric], abs=1e-5), key
    assert "Rankings: chosen is each one's best response, rejected its worst; ranking accuracy" in done.stdout
