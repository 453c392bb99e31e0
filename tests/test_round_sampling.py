"""A round's completions (``dpo_dist.rounds.sampling.sample_round``): the same token for token under 1 process and 2
(DDP, ZeRO-3, FSDP2), resumable from its cache batch by batch, refusing a cache sampled with other settings; and the
batches they are cut into (``model.generation.prompt_batches``)."""

import functools
import importlib.util
import json
import os
import random
import shutil
import subprocess

import pytest
import torch

from dpo_dist.model.generation import Sampling, prompt_batches
from training import ROOT, accelerate_launch, reset_accelerate_state

# 13 prompts in batches of 3: 5 batches, so 2 processes' last wave has a batch for one of them only (the other runs a
# stand-in under ZeRO-3 and FSDP2). Top-p below 1 and a temperature: the draws go through every sampling step.
N, BATCH_SIZE = 3, 3
SAMPLING = Sampling(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=7)
ENGINES = {"ddp": "ddp.yaml", "zero3": "zero3.yaml", "fsdp2": "fsdp.yaml"}
# Launched here: FSDP2, a sharded engine (the synced path, with its stand-in batch). tests/test_rounds.py launches
# whole rounds under DDP, ZeRO-3 and FSDP2 and compares their completions with one process's, token for token.
LAUNCHED = ("fsdp2",)


def prompts(vocab_size, count=13, seed=0):
    """``count`` prompts of 2 to 12 random token ids (special tokens left out), in no order of length."""
    rng = random.Random(seed)
    return [[rng.randrange(8, vocab_size) for _ in range(rng.randint(2, 12))] for _ in range(count)]


def save_ending_model(folder):
    """A tiny llama that ends a completion (EOS) about one step in 9, so completions end at different lengths and the
    EOS cut, and under ZeRO-3 and FSDP2 a process finished before the other, are exercised. A random tiny model almost
    never draws EOS (1 in 400): here the last MLP's bias writes 1.0 into dimension 0 of every hidden state, which
    then dominates the final norm's output (about sqrt(32)), and the EOS row of the (untied) head reads it."""
    from tiny import make_llama, make_tokenizer

    tokenizer = make_tokenizer("nobos")
    model = make_llama(len(tokenizer), seed=0, tie_word_embeddings=False, mlp_bias=True)
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.bias[0] = 1.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 0.6
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_ending_model(tmp_path_factory.mktemp("ending-llama"))


class Counted:
    """``model.generate`` wrapped to count its calls."""

    def __init__(self, model):
        self.calls, self.generate = 0, model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.generate(*args, **kwargs)


def one_process(model_dir, cache_dir, **kwargs):
    """``sample_round`` in this process (1 process, no sharding): (its result, the generate calls it made)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_dist.distributed import build_accelerator
    from dpo_dist.rounds.sampling import sample_round

    reset_accelerate_state()
    accelerator = build_accelerator()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    counted = Counted(model)
    settings = {"n": N, "sampling": SAMPLING, "batch_size": BATCH_SIZE, "show_progress": False, **kwargs}
    try:
        result = sample_round(model, tokenizer, prompts(len(tokenizer)), accelerator=accelerator,
                              cache_dir=str(cache_dir), **settings)
    finally:
        reset_accelerate_state()
    return result, counted.calls


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    """The 1-process round every other run is compared with, and its cache folder."""
    cache = tmp_path_factory.mktemp("single") / "cache"
    state = torch.get_rng_state()
    result, calls = one_process(model_dir, cache)
    assert torch.equal(torch.get_rng_state(), state), "sampling drew from the caller's generator"
    assert calls == 5
    return result, cache


def test_a_round_has_n_completions_of_every_prompt_cut_after_eos(single, model_dir):
    from transformers import AutoTokenizer

    result, cache = single
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    assert len(result.completions) == 13 and all(len(c) == N for c in result.completions)
    flat = [ids for c in result.completions for ids in c]
    assert all(0 < len(ids) <= SAMPLING.max_new_tokens and eos not in ids[:-1] for ids in flat)
    ended = [ids for ids in flat if ids[-1] == eos]
    assert 10 <= len(ended) <= 30 and len({len(ids) for ids in ended}) > 3, "EOS ends some completions, early and late"
    assert all(len(ids) == SAMPLING.max_new_tokens for ids in flat if ids[-1] != eos)  # the rest cut by length
    assert len({tuple(ids) for ids in flat if len(ids) > 3}) == len([ids for ids in flat if len(ids) > 3])  # sampled
    assert (result.sampled, result.tokens, result.batches, result.cached_batches) == (39, sum(map(len, flat)), 5, 0)
    assert sorted(os.listdir(cache)) == ["batch-0.json", "batch-1.json", "batch-2.json", "batch-3.json",
                                         "batch-4.json", "settings.json"]
    assert "completions/s" in result.summary(1) and "\n" not in result.summary(1)


def test_a_stopped_round_resumes_with_the_missing_batches_only(single, model_dir, tmp_path):
    """Stopped after its second wave (2 batches cached), the rerun samples the 3 others and returns what an
    uninterrupted round returns; a cache with 2 batch files deleted has just those sampled again."""
    result, cache = single

    class Stop(Exception):
        pass

    def stop_after_two(where):
        if where.startswith("while sampling (wave 2 "):
            raise Stop(where)

    with pytest.raises(Stop, match=r"while sampling \(wave 2 of 5; 2 of 5 batches cached in "):
        one_process(model_dir, tmp_path / "stopped", stop_check=stop_after_two)
    assert sorted(p for p in os.listdir(tmp_path / "stopped") if p.startswith("batch")) == ["batch-0.json",
                                                                                            "batch-1.json"]
    resumed, calls = one_process(model_dir, tmp_path / "stopped")
    assert calls == 3 and resumed.completions == result.completions
    assert (resumed.cached_batches, resumed.sampled) == (2, N * sum(len(b) for b in batches_of(model_dir)[2:]))

    shutil.copytree(cache, tmp_path / "partial")
    for b in (1, 3):
        os.remove(tmp_path / "partial" / f"batch-{b}.json")
    again, calls = one_process(model_dir, tmp_path / "partial")
    assert calls == 2 and again.completions == result.completions and again.cached_batches == 3
    whole, calls = one_process(model_dir, tmp_path / "partial")
    assert calls == 0 and whole.completions == result.completions and whole.sampled == 0


def batches_of(model_dir):
    from transformers import AutoTokenizer

    return prompt_batches(prompts(len(AutoTokenizer.from_pretrained(model_dir))), BATCH_SIZE)


@pytest.mark.parametrize("change, named", [
    ({"sampling": Sampling(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=7)}, "sampling.temperature 0.9 there, 1.0 here"),
    ({"n": 2}, "n 3 there, 2 here"),
    ({"batch_size": 4}, "batch_size 3 there, 4 here"),
])
def test_a_cache_sampled_otherwise_is_refused_in_one_line(single, model_dir, tmp_path, change, named):
    from dpo_dist.rounds.sampling import SamplingCacheMismatch

    _, cache = single
    shutil.copytree(cache, tmp_path / "cache")
    with pytest.raises(SamplingCacheMismatch) as refused:
        one_process(model_dir, tmp_path / "cache", **change)
    message = str(refused.value)
    assert "\n" not in message and named in message and str(tmp_path / "cache") in message, message


def test_other_prompts_are_refused_too(tmp_path):
    from dpo_dist.rounds.sampling import sampling_settings, settings_problem

    here = sampling_settings([[1, 2], [3]], n=2, sampling=SAMPLING, batch_size=2)
    there = sampling_settings([[1, 2], [4]], n=2, sampling=SAMPLING, batch_size=2)
    assert "prompts_sha256" in settings_problem(there, here, "cache")
    assert settings_problem(here, dict(here), "cache") is None


def test_prompt_batches_are_sorted_by_length_stable_and_the_same_every_time():
    lengths = [3, 1, 2, 1, 5, 2, 2]
    given = [[9] * length for length in lengths]
    assert prompt_batches(given, 3) == [[1, 3, 2], [5, 6, 0], [4]]  # ties keep their order: 1 before 3, 2, 5, 6
    assert prompt_batches(given, 3) == prompt_batches([list(p) for p in given], 3)
    assert prompt_batches(given, 10) == [[1, 3, 2, 5, 6, 0, 4]] and prompt_batches([], 2) == []
    many = prompts(400, count=50, seed=1)
    batches = prompt_batches(many, 8)
    order = [i for b in batches for i in b]
    assert sorted(order) == list(range(50)) and [len(b) for b in batches] == [8] * 6 + [2]
    assert [len(many[i]) for i in order] == sorted(len(p) for p in many)
    with pytest.raises(ValueError, match="batch_size"):
        prompt_batches(many, 0)


@pytest.fixture(scope="module")
def two_processes(model_dir, tmp_path_factory):
    """The round on 2 processes, launched once per engine: ``two_processes(engine)`` is (the launch's JSON, its cache
    folder)."""
    @functools.cache
    def get(engine):
        if engine == "zero3" and importlib.util.find_spec("deepspeed") is None:
            pytest.skip("needs DeepSpeed: python3 -m pip install -e '.[deepspeed]' (the dev extra has it)")
        folder = tmp_path_factory.mktemp(f"two-{engine}")
        command = accelerate_launch("--config_file", os.path.join(ROOT, "accelerate_configs", ENGINES[engine]),
                                    "--num_processes", "2", os.path.join(ROOT, "tests", "scripts", "sample_round.py"),
                                    model_dir, str(folder / "cache"), str(folder / "out.json"))
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=ROOT))
        assert result.returncode == 0, result.stderr[-4000:]
        assert "sampling: 39 completions" in result.stdout and "over 2 processes" in result.stdout, result.stdout
        with open(folder / "out.json") as handle:
            return json.load(handle), folder / "cache"

    return get


@pytest.mark.multiprocess
@pytest.mark.parametrize("engine", LAUNCHED)
def test_two_processes_sample_what_one_does(engine, single, two_processes, model_dir):
    """Token for token: batch b is drawn with seed + b wherever it runs. 5 batches over 2 processes are 3 waves: under
    DDP the second process sits out the last; under ZeRO-3 and FSDP2 it samples a stand-in batch (every forward is a
    collective) and drops it. The 2-process cache is the 1-process one: rerun on 1 process, nothing is sampled."""
    launched, cache = two_processes(engine)
    result, _ = single
    assert launched["processes"] == 2 and launched["sampled"] == 39
    assert (launched["zero_stage"], launched["fsdp_version"]) == {"ddp": (0, 0), "zero3": (3, 0),
                                                                  "fsdp2": (0, 2)}[engine]
    assert launched["calls"] == ([3, 2] if engine == "ddp" else [3, 3])
    assert launched["completions"] == result.completions
    reread, calls = one_process(model_dir, cache)
    assert calls == 0 and reread.completions == result.completions
