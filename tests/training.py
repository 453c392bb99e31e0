"""Shared by the training tests: a tiny model and data on disk, run helpers, trajectory comparison."""

import json
import os
import random
import shutil
import socket

import pytest

from dpo_dist.config import load_config
from tiny import make_llama, make_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "the movie was film great music acting start finish bread flour water salt capital France Paris".split()
# The steps of the sharded runs (DeepSpeed, FSDP) and of the one-process runs they are compared with (conftest).
STEPS = {"train.max_steps": 5, "train.eval_every": 2}
# Compared between runs: everything a step logs except its wall-clock speed.
COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "grad_norm", "lr", "examples_seen", "epoch")


def reset_accelerate_state():
    """Each in-process run builds its own Accelerator; Accelerate keeps process-wide state."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def save_tiny_model(folder):
    tokenizer = make_tokenizer("nobos")  # no pad token: the trainer pads with EOS
    assert tokenizer.pad_token is None
    make_llama(len(tokenizer), seed=0, tie_word_embeddings=True).save_pretrained(folder)  # tied, like SmolLM2
    tokenizer.save_pretrained(folder)
    return folder


def synthetic_pairs(path, n, seed=0):
    """A learnable preference: the chosen response ends in 'yes', the rejected one in 'no', after the same words."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))
            middle = " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))
            handle.write(json.dumps({"prompt": prompt, "chosen": f" {middle} yes", "rejected": f" {middle} no"}) + "\n")
    return str(path)


LENGTH = "python:tests.judge_functions:length_score"  # a deterministic judge: the longer completion wins


def prompt_rows(path, n=20, seed=0):
    """``n`` distinct prompt-only rows, the prompts iterative rounds sample (16 train, 4 held out by
    data.eval_ratio=0.2)."""
    rng = random.Random(seed)
    seen = []
    while len(seen) < n:
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(3, 7)))
        if prompt not in seen:
            seen.append(prompt)
    with open(path, "w") as handle:
        for prompt in seen:
            handle.write(json.dumps({"prompt": prompt}) + "\n")
    return str(path)


def rounds_overrides(model_dir, prompts, out, **extra):
    """2 rounds of 3 steps (LoRA) over ``prompt_rows``' prompts, 3 completions each judged by ``LENGTH``, at a
    learning rate high enough that round 1 moves the policy."""
    base = {
        "model.name_or_path": model_dir, "data.source": prompts, "data.eval_ratio": 0.2, "data.max_length": 48,
        "data.max_prompt_length": 24, "train.output_dir": str(out), "train.progress_bar": False, "train.plot": False,
        "train.learning_rate": 1e-2, "train.per_device_batch_size": 4, "train.warmup_ratio": 0.0,
        "train.eval_every": None, "train.keep_last": 10, "train.attention_layout": "segmented",
        "rounds.count": 2, "rounds.steps_per_round": 3, "rounds.samples_per_prompt": 3, "rounds.max_new_tokens": 6,
        "rounds.generation_batch_size": 4, "rounds.eval_samples_per_prompt": 2, "rounds.judge": LENGTH,
    }
    base.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


def overrides(model_dir, data_file, out, **extra):
    base = {
        "model.name_or_path": model_dir, "data.source": data_file, "data.eval_ratio": 0.2, "data.max_length": 48,
        "data.max_prompt_length": 24, "train.output_dir": str(out), "train.progress_bar": False, "train.plot": False,
        "reference.cache_dir": str(out) + "-refcache", "lora.enabled": False, "train.learning_rate": 1e-3,
        "train.max_steps": 4, "train.per_device_batch_size": 8, "train.eval_every": None, "train.warmup_ratio": 0.0,
    }
    base.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in base.items()]


def run(model_dir, data_file, out, **extra):
    """Train in this process as launch/train.py does: the run, then model/'s card."""
    from dpo_dist.publish.card import write_run_card
    from dpo_dist.train.trainer import train

    result = train(load_config(None, overrides(model_dir, data_file, out, **extra)))
    write_run_card(result["output_dir"])
    return result


def logged_parameter_count(caplog, model_dir, **extra):
    """What the policy loader logs of its parameters for one process (``"0.02M of 0.05M parameters trainable"``)."""
    import logging

    import torch

    from dpo_dist.model.load import load_policy

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dpo_dist.model.load"):
        load_policy(load_config(None, [f"model.name_or_path={model_dir}"] + [f"{k}={v}" for k, v in extra.items()]),
                    torch.device("cpu"))
    return parameter_count_in("\n".join(r.getMessage() for r in caplog.records))


def parameter_count_in(log):
    """The one parameter count the policy loader logged in ``log``: ``"0.02M of 0.05M parameters trainable"``."""
    import re

    [count] = re.findall(r"policy .*; (\S+ of \S+ parameters trainable)", log)
    return count


def assert_same_trajectory(a, b, atol):
    """Equal step by step. At step 1 policy = reference, so every reward is float noise (~1e-7) and which side of 0
    it falls on, the accuracy, is a coin toss: accuracies are compared from step 2 on."""
    assert len(a) == len(b) and len(a) >= 4
    for ra, rb in zip(a, b):
        assert ra["step"] == rb["step"]
        for key in COMPARED + tuple(k for k in ra if k.startswith("eval/")):
            if ra["step"] == 1 and key.endswith("accuracies"):
                continue
            assert rb[key] == pytest.approx(ra[key], abs=atol), (ra["step"], key)




def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def accelerate_launch(*args):
    """``accelerate launch`` as a command list, on a free port."""
    import sys

    return [sys.executable, "-m", "accelerate.commands.launch", "--main_process_port", str(free_port()), *args]


def read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def assert_same_reference_caches(single_folder, other_folder, *, same_keys):
    """Two runs' reference caches hold the same log-probs, train set and eval set: under the same keys (the same way of
    scoring), or (``same_keys=False``: another attention layout, keyed apart) paired by their number of pairs."""
    import torch
    from safetensors.torch import load_file

    def cached(folder):
        return {name: load_file(os.path.join(folder, name))["logps"] for name in sorted(os.listdir(folder))}

    single, other = cached(single_folder), cached(other_folder)
    assert len(single) == len(other) == 2  # train and eval
    assert (list(single) == list(other)) == same_keys
    pair = (lambda c: [c[name] for name in c]) if same_keys else (lambda c: sorted(c.values(), key=len))
    for want, got in zip(pair(single), pair(other)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-7)


def copy_run(folder, to):
    """A run's output folder and its reference cache, copied to ``to``: a test that changes a run shared by its
    neighbours (a module-scoped fixture) works on a copy."""
    shutil.copytree(folder, to)
    shutil.copytree(f"{folder}-refcache", f"{to}-refcache")


def command_lines():
    """(pid, arguments as bytes) of every process on this machine that is still there to read."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                yield int(pid), handle.read().split(b"\0")
        except OSError:  # gone already
            continue
