"""launch/evaluate.py and what it is built from: local evaluate modules, the KL estimate, the report (the judges:
tests/test_judges.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tiny import make_llama, make_tokenizer
from training import ROOT, read_jsonl, reset_accelerate_state, run


# --- the local evaluate modules ------------------------------------------------------------------------------------

def test_local_accuracy_module():
    from dpo_dist.eval.metrics import load_metric

    metric = load_metric("accuracy")
    assert metric.compute(predictions=[1, 0, 1, 1], references=[1, 1, 1, 0])["accuracy"] == 0.5
    assert metric.compute(predictions=[1, 0], references=[1, 1], sample_weight=[3, 1])["accuracy"] == 0.75
    with pytest.raises(ValueError, match="no local metric"):
        load_metric("bleu")


def test_win_rate_module_counts_ties_half_and_bootstraps_prompts():
    from dpo_dist.eval.metrics import load_metric

    metric = load_metric("win_rate")
    result = metric.compute(outcomes=[1, 1, 0.5, 0, 1, 0], groups=[0, 0, 1, 1, 2, 2])
    assert (result["wins"], result["losses"], result["ties"], result["prompts"]) == (3, 2, 1, 3)
    assert result["win_rate"] == pytest.approx(3.5 / 6)
    assert result["ci_low"] <= result["win_rate"] <= result["ci_high"]
    assert metric.compute(outcomes=[1, 1, 0.5, 0, 1, 0], groups=[0, 0, 1, 1, 2, 2]) == result, "seeded"
    # Every prompt won: no resample can say otherwise.
    assert metric.compute(outcomes=[1.0] * 8, groups=[0, 0, 1, 1, 2, 2, 3, 3])["ci_low"] == 1.0
    # 200 prompts won 60% of the time: the interval is about +-0.07 around 0.6 and excludes 0.5.
    outcomes = [1.0 if i % 5 < 3 else 0.0 for i in range(200)]
    wide = metric.compute(outcomes=outcomes, groups=list(range(200)))
    assert 0.5 < wide["ci_low"] < 0.6 < wide["ci_high"] < 0.7
    with pytest.raises(ValueError, match="outcomes must be"):
        metric.compute(outcomes=[0.3], groups=[0])


def test_wilson_interval_against_hand_computed_values():
    """Wilson: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.95996 at 95%. 44 of 58 by hand:
    p = 0.758621, z²/n = 0.066232, centre = (0.758621 + 0.033116) / 1.066232 = 0.742556, half-width
    = 1.959964 * sqrt(0.0031572 + 0.00028548) / 1.066232 = 0.107857: 0.634699-0.850413."""
    from dpo_dist.eval.against_base import wilson_interval

    assert wilson_interval(44, 58) == pytest.approx((0.634699, 0.850413), abs=2e-6)
    # 0 of n and n of n: one end at the bound, the other at z²/(n+z²) from it (10 pairs: 0.27753).
    z2 = 1.959963984540054 ** 2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-12)
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0), abs=1e-12)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.27753, abs=1e-5)
    # Half of 100 at 99%: z = 2.575829, centre 0.5, half-width z * sqrt(0.0025 + z²/40000) / (1 + z²/100) = 0.124720.
    assert wilson_interval(50, 100, confidence=0.99) == pytest.approx((0.375280, 0.624720), abs=2e-6)
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson_interval(3, 2)
    with pytest.raises(ValueError, match="n > 0"):
        wilson_interval(0, 0)


# --- sampling and the KL estimate ------------------------------------------------------------------------------

def test_kl_estimate_from_samples_matches_the_exact_kl():
    """One-token responses: the exact KL is a sum over the vocabulary, which the sampled estimate must agree with."""
    from dpo_dist.eval.against_base import kl_estimate
    from dpo_dist.eval.scoring import response_logps
    from dpo_dist.model.generation import Sampling, sample_responses

    tokenizer = make_tokenizer("nobos")
    reference = make_llama(len(tokenizer), seed=0)
    policy = make_llama(len(tokenizer), seed=0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    prompts = [tokenizer("the movie was")["input_ids"], tokenizer("bread flour")["input_ids"]]
    n = 1500
    samples = sample_responses(policy, tokenizer, prompts, n=n, sampling=Sampling(max_new_tokens=1, seed=3),
                               batch_size=2, device=torch.device("cpu"))
    assert all(len(r) == 1 for rs in samples for r in rs)
    flat_prompts = [p for p in prompts for _ in range(n)]
    flat = [r for rs in samples for r in rs]
    kwargs = dict(batch_size=500, device=torch.device("cpu"))
    estimate = kl_estimate(response_logps(policy, flat_prompts, flat, **kwargs),
                           response_logps(reference, flat_prompts, flat, **kwargs), groups=list(range(len(flat))))
    exact = []
    with torch.no_grad():
        for ids in prompts:
            logp = torch.log_softmax(policy(torch.tensor([ids])).logits[0, -1].double(), -1)
            logq = torch.log_softmax(reference(torch.tensor([ids])).logits[0, -1].double(), -1)
            exact.append(float((logp.exp() * (logp - logq)).sum()))
    exact_kl = sum(exact) / len(exact)
    assert exact_kl > 0.05, "the perturbation must make a KL worth estimating"
    assert abs(estimate["kl"] - exact_kl) < 4 * estimate["kl_stderr"], (estimate, exact_kl)
    assert estimate["kl_stderr"] < 0.2 * exact_kl


def test_samples_stop_at_eos_and_use_the_same_random_numbers_for_the_same_model():
    from dpo_dist.model.generation import Sampling, sample_responses

    tokenizer = make_tokenizer("nobos")
    model = make_llama(len(tokenizer), seed=1)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos] += 0.5  # EOS likely enough to end some responses early
    prompts = [tokenizer("the film")["input_ids"], tokenizer("Human: What is the capital of France?")["input_ids"]]
    kwargs = dict(n=8, sampling=Sampling(max_new_tokens=12, seed=5), batch_size=1, device=torch.device("cpu"))
    first, second = sample_responses(model, tokenizer, prompts, **kwargs), sample_responses(model, tokenizer, prompts, **kwargs)
    assert first == second
    flat = [r for rs in first for r in rs]
    assert any(r[-1] == eos and len(r) < 12 for r in flat), "some responses ended"
    assert all(eos not in r[:-1] for r in flat), "nothing after the first EOS"
    assert all(len(r) == 12 or r[-1] == eos for r in flat)


# --- the whole evaluation on a trained run -----------------------------------------------------------------------

def lora_run(tiny_model_dir, data_file, out, **extra):
    reset_accelerate_state()
    settings = {"lora.enabled": True, "lora.r": 4, "train.max_steps": 6, "train.learning_rate": 5e-3,
                "train.eval_every": 6, **extra}
    run(tiny_model_dir, data_file, out, **settings)
    reset_accelerate_state()
    return out


def evaluate_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, data_file, tmp_path_factory):
    return lora_run(tiny_model_dir, data_file, tmp_path_factory.mktemp("evaluate") / "run")


@pytest.mark.slow
def test_evaluate_reproduces_the_trainers_eval_and_writes_the_report(trained_run):
    out = trained_run
    done = evaluate_cli(out, "--judge", "sentiment", "--samples_per_prompt", 3, "--max_new_tokens", 8)
    assert done.returncode == 0, done.stderr
    results = json.load(open(out / "eval" / "results.json"))
    trainer_eval = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/loss" in r][-1]
    p = results["preference"]
    assert p["pairs"] == 16
    assert p["loss"] == pytest.approx(trainer_eval["eval/loss"], abs=1e-5)
    assert p["reward_accuracy"] == pytest.approx(trainer_eval["eval/rewards/accuracies"], abs=1e-6)
    assert p["margin"] == pytest.approx(trainer_eval["eval/rewards/margins"], abs=1e-5)

    samples = read_jsonl(out / "eval" / "samples.jsonl")
    assert len(samples) == results["generation"]["prompts"] * 3 == results["win_rate"]["comparisons"]
    for s in samples:
        assert s["outcome"] == (1.0 if s["policy_score"] > s["base_score"] else 0.5 if s["policy_score"] == s["base_score"] else 0.0)
    assert results["win_rate"]["win_rate"] == pytest.approx(sum(s["outcome"] for s in samples) / len(samples))
    assert results["reward"]["policy_mean"] == pytest.approx(sum(s["policy_score"] for s in samples) / len(samples))
    assert results["kl"]["kl"] > 0, "a trained adapter moved away from its base"
    assert not results["kl"]["from_separate_samples"]
    for name in ("results.md", "reward_vs_kl.png"):
        assert os.path.getsize(out / "eval" / name) > 0
    from dpo_dist.eval.against_base import wilson_interval

    # The intervals are computed by the code and printed as computed.
    assert p["correct"] == round(p["reward_accuracy"] * 16)
    low, high = wilson_interval(p["correct"], 16)
    assert p["reward_accuracy_wilson"] == pytest.approx([low, high], abs=1e-12) and low <= p["reward_accuracy"] <= high
    assert f"| {p['reward_accuracy']:.3f} ({p['correct']} of 16) | {low:.3f}–{high:.3f} |" in done.stdout
    w = results["win_rate"]
    w_low, w_high = wilson_interval(w["wins"] + w["ties"] / 2, w["comparisons"])
    assert w["wilson"] == pytest.approx([w_low, w_high], abs=1e-12)
    assert f"| {w['win_rate']:.3f} | {w['ci_low']:.3f}–{w['ci_high']:.3f} | {w_low:.3f}–{w_high:.3f} |" in done.stdout


@pytest.mark.slow
def test_evaluate_with_an_llm_judge(trained_run, tiny_model_dir, tmp_path):
    done = evaluate_cli(trained_run, "--judge", f"llm:{tiny_model_dir}", "--num_prompts", 3, "--samples_per_prompt", 2,
                        "--max_new_tokens", 5, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    results = json.load(open(tmp_path / "results.json"))
    w = results["win_rate"]
    assert w["judge"].startswith("LLM judge") and w["comparisons"] == 6 == w["wins"] + w["losses"] + w["ties"]
    assert 0 <= w["judge_picked_a"] <= 1 and "reward" not in results
    assert not os.path.exists(tmp_path / "reward_vs_kl.png"), "no per-response scores to plot"
    assert "picked the response shown first" in open(tmp_path / "results.md").read()


@pytest.mark.slow
def test_an_unchanged_model_has_zero_kl_and_ties_everywhere(tiny_model_dir, data_file, tmp_path):
    """Learning rate 0: the adapter is still the identity, so the trained model is the base. Sampled with the same
    random numbers, every response pair is identical: KL exactly 0, every comparison a tie, win rate 0.5."""
    out = lora_run(tiny_model_dir, data_file, tmp_path / "run", **{"train.learning_rate": 0.0, "train.max_steps": 1,
                                                                   "train.eval_every": 1})
    done = evaluate_cli(out, "--judge", "sentiment", "--samples_per_prompt", 2, "--max_new_tokens", 6,
                        "--temperature", 0.7, "--num_prompts", 5, "--out", tmp_path / "eval")
    assert done.returncode == 0, done.stderr
    results = json.load(open(tmp_path / "eval" / "results.json"))
    assert results["kl"]["kl"] == 0.0 and results["kl"]["from_separate_samples"]
    assert results["win_rate"]["ties"] == results["win_rate"]["comparisons"] == 10
    assert results["win_rate"]["win_rate"] == 0.5
    assert results["preference"]["margin"] == 0.0


@pytest.mark.slow
def test_evaluate_errors_name_the_problem(tmp_path, tiny_model_dir):
    done = evaluate_cli(tmp_path)
    assert done.returncode == 1 and "no model here" in done.stderr
    done = evaluate_cli(tiny_model_dir)  # a model folder, not a run: no config.yaml says what its held-out data is
    assert done.returncode == 1 and "no config.yaml" in done.stderr


@pytest.mark.slow
def test_evaluate_a_fully_fine_tuned_model_against_its_base(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    reset_accelerate_state()
    run(tiny_model_dir, data_file, out, **{"train.eval_every": 4})
    reset_accelerate_state()
    done = evaluate_cli(out, "--judge", "none", "--num_prompts", 4, "--samples_per_prompt", 2, "--max_new_tokens", 6)
    assert done.returncode == 0, done.stderr
    results = json.load(open(out / "eval" / "results.json"))
    trainer_eval = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/loss" in r][-1]
    assert not results["adapter"] and results["base"] == tiny_model_dir
    assert results["preference"]["loss"] == pytest.approx(trainer_eval["eval/loss"], abs=1e-5)
    assert results["preference"]["margin"] == pytest.approx(trainer_eval["eval/rewards/margins"], abs=1e-5)
    # 8 responses: the estimate is noisy (it can fall below 0 for a model this close to its base), but it varies.
    assert results["kl"]["kl_stderr"] > 0 and "win_rate" not in results
    assert "No win rate: no judge was given" in done.stdout


# --- which prompts evaluation samples from --------------------------------------------------------------------------

def test_builtin_set_records_every_held_out_prompt_and_evaluation_samples_them_all(tmp_path, monkeypatch):
    """The data build writes the held-out prompts beside the pairs, also those whose completions made no pair (here
    none does: no two VADER scores are 1.99 apart), and evaluation samples from that list, tokenized as in training;
    a set cached before the list existed gets it without sampling again."""
    pytest.importorskip("vaderSentiment", reason="the built-in set is scored with VADER (a core dependency)")
    from dpo_dist.config import load_config
    from dpo_dist.data.sentiment import chosen_prompts, dataset_paths, ensure_sentiment_data, prompts_path
    from dpo_dist.data.tokenization import Truncation, tokenize_prompt
    from dpo_dist.eval.against_base import EvalOptions, generation_prompts
    from dpo_dist.model.builtin import cache_root

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = load_config(None, ["data.sentiment.num_prompts=16", "data.sentiment.eval_prompts=4",
                             "data.sentiment.completions_per_prompt=2", "data.sentiment.max_new_tokens=3",
                             "data.sentiment.min_score_gap=1.99"])
    tokenizer = make_tokenizer("nobos")
    tokenizer.pad_token = tokenizer.eos_token  # as the trainer loads it
    model, identity = make_llama(len(tokenizer), seed=0), {"model": "tiny"}
    paths = ensure_sentiment_data(lambda: model, tokenizer, cfg.data.sentiment, identity, torch.device("cpu"),
                                  cache_root())
    assert paths == dataset_paths(cfg.data.sentiment, identity, cache_root())
    assert open(paths[1]).read() == "", "no held-out prompt made a pair"
    held_out = chosen_prompts(cfg.data.sentiment)[1]
    assert len(held_out) == 4 and not set(held_out) & set(chosen_prompts(cfg.data.sentiment)[0])
    assert [r["prompt"] for r in read_jsonl(prompts_path(paths))] == held_out

    ids, texts, said = generation_prompts(cfg, EvalOptions(), None, {}, tokenizer, identity)
    truncation = Truncation(cfg.data.max_length, cfg.data.max_prompt_length)
    assert texts == held_out and ids == [tokenize_prompt(p, tokenizer, truncation) for p in held_out]
    assert said.startswith("every held-out prompt of the built-in sentiment set") and prompts_path(paths) in said
    assert ids[0] == tokenizer(held_out[0], add_special_tokens=False)["input_ids"]  # no BOS for this tokenizer
    assert len(generation_prompts(cfg, EvalOptions(num_prompts=3), None, {}, tokenizer, identity)[0]) == 3

    os.remove(prompts_path(paths))

    def no_sampling():
        raise AssertionError("the cached pairs are reused")

    ensure_sentiment_data(no_sampling, tokenizer, cfg.data.sentiment, identity, torch.device("cpu"), cache_root())
    assert [r["prompt"] for r in read_jsonl(prompts_path(paths))] == held_out


@pytest.mark.slow
def test_a_run_without_eval_split_is_evaluated_on_prompts_it_is_given(tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "run"
    reset_accelerate_state()
    run(tiny_model_dir, data_file, out, **{"data.eval_ratio": 0.0, "train.max_steps": 2})
    reset_accelerate_state()
    done = evaluate_cli(out, "--judge", "none", "--samples_per_prompt", 1, "--max_new_tokens", 4)
    assert done.returncode == 1 and "no eval split" in done.stderr and "--prompts FILE" in done.stderr
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("the movie was", "bread flour water")))
    done = evaluate_cli(out, "--judge", "none", "--samples_per_prompt", 2, "--max_new_tokens", 4, "--prompts", prompts,
                        "--out", tmp_path / "eval")
    assert done.returncode == 0, done.stderr
    results = json.load(open(tmp_path / "eval" / "results.json"))
    assert results["preference"] is None and results["generation"]["prompts"] == 2
    assert [s["prompt"] for s in read_jsonl(tmp_path / "eval" / "samples.jsonl")] == ["the movie was"] * 2 + ["bread flour water"] * 2
    assert f"Prompts: --prompts {prompts}." in done.stdout and "No held-out pairs: the run has no eval split" in done.stdout
    prompts.write_text(json.dumps({"text": "x"}) + "\n")
    done = evaluate_cli(out, "--prompts", prompts, "--out", tmp_path / "eval")
    assert done.returncode == 1 and f"{prompts}: line 1: needs a non-empty \"prompt\"" in done.stderr
