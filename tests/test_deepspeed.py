"""DeepSpeed ZeRO-2/3 on 2 CPU processes computes what one process without DeepSpeed computes."""

import importlib.util
import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from training import (ROOT, STEPS, accelerate_launch, assert_same_reference_caches, assert_same_trajectory, copy_run,
                      logged_parameter_count, overrides, parameter_count_in, read_jsonl)

pytestmark = [
    pytest.mark.multiprocess,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="needs DeepSpeed: python3 -m pip install -e '.[deepspeed]' (the dev extra has it)"),
]


def launch_zero(stage, tiny_model_dir, data_file, out, config=None, env=None, processes=2, **extra):
    config = config or f"zero{stage}.yaml"
    command = accelerate_launch("--config_file", os.path.join(ROOT, "accelerate_configs", config),
                                "--num_processes", str(processes), os.path.join(ROOT, "launch", "train.py"))
    extra = {"train.per_device_batch_size": 4, **extra}
    command += overrides(tiny_model_dir, data_file, out, **extra)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-4000:]
    accumulation = extra.get("train.gradient_accumulation_steps", 1)
    assert processes != 2 or (f"{extra['train.per_device_batch_size']} per device x {accumulation} accumulation x 2 "
                              "processes" in result.stdout), result.stdout[-3000:]
    return result


def zero_settings(stage, lora):
    """``STEPS`` under ZeRO-2/3. Full fine-tuning runs as 2 per device x 2 accumulation x 2 processes, the global batch
    of 8 one process takes at once (DeepSpeed accumulates and steps inside backward; the trainer's micro-batch order
    must match); LoRA as 4 per device, without accumulation. ZeRO-3 lays attention out segment by segment, the one
    process as auto picks. Checkpoints at steps 2 and 4 and the final one at 5 are all kept, and 2 held-out prompts
    are sampled at each eval, for the resume test."""
    batch = ({"train.per_device_batch_size": 4} if lora else
             {"train.per_device_batch_size": 2, "train.gradient_accumulation_steps": 2})
    layout = {"train.attention_layout": "segmented"} if stage == 3 else {}
    return {**STEPS, **batch, **layout, "lora.enabled": lora, "train.save_every": 2, "train.keep_last": 3,
            "train.sample_prompts": 2}


@pytest.fixture(scope="module")
def zero_run(tiny_model_dir, data_file, tmp_path_factory):
    """The 2-process run of ``zero_settings``, launched once for the tests that check it: ``zero_run(stage, lora)``
    is its launch result and output folder."""
    @functools.cache
    def get(stage, lora):
        out = tmp_path_factory.mktemp(f"zero{stage}-lora{lora}") / "out"
        return launch_zero(stage, tiny_model_dir, data_file, out, **zero_settings(stage, lora)), out

    return get


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trajectory_equals_one_process(stage, lora, one_process, zero_run, tiny_model_dir, caplog):
    """ZeRO-2/3, full fine-tuning (with accumulation) and LoRA, computes what one process computes."""
    records, single_out = one_process[lora]
    result, out = zero_run(stage, lora)
    assert "packing: on" in result.stdout, result.stdout[-2000:]  # under ZeRO-3 too: the head runs in the forward
    assert ("attention: segmented (" in result.stdout) == (stage == 3), result.stdout[-2000:]
    # The count of parameters is the whole model's, though ZeRO-3 has partitioned them (numel() 0) at loading
    count = parameter_count_in(result.stdout + result.stderr)
    assert count == logged_parameter_count(caplog, tiny_model_dir, **{"lora.enabled": lora}), count
    assert_same_trajectory(records, read_jsonl(out / "metrics.jsonl"), atol=1e-4)
    # The reference log-probs computed on the sharded model equal the single-process cache, file for file.
    # (Segmented, they are keyed apart from the one process's.)
    assert_same_reference_caches(f"{single_out}-refcache", f"{out}-refcache", same_keys=stage != 3)
    # The final export (consolidated from shards under ZeRO-3) gives the single-process model's logits.
    assert_same_logits(out / "model", single_out / "model", tiny_model_dir, lora, atol=1e-5)


def assert_same_logits(folder, other, tiny_model_dir, lora, atol):
    """The two exports (full models, or adapters on the tiny base) give the same logits on a few tokens."""
    from transformers import AutoModelForCausalLM

    if lora:
        from peft import PeftModel

        load = lambda folder: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder)
    else:
        load = AutoModelForCausalLM.from_pretrained
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(load(str(folder))(ids).logits, load(str(other))(ids).logits, atol=atol, rtol=atol)


@pytest.mark.slow
def test_zero3_resume_equals_uninterrupted(zero_run, tiny_model_dir, data_file, tmp_path):
    """The 5-step ZeRO-3 run (full fine-tuning, with accumulation) taken back to checkpoint-2 and resumed: steps 3-5
    repeat exactly (DeepSpeed's sharded optimizer and parameters, scheduler, RNG, data position all restored), and so
    do the samples generated at the evals, on the ZeRO-3-partitioned model."""
    _, whole_out = zero_run(3, False)
    out = tmp_path / "out"
    copy_run(whole_out, out)
    whole = read_jsonl(out / "metrics.jsonl")
    samples = read_jsonl(out / "samples.jsonl")  # both ranks generate (each forward gathers the shards)
    assert [r["step"] for r in samples] == [2, 2, 4, 4, 5, 5]
    assert os.path.isdir(out / "checkpoint-2" / "pytorch_model")  # DeepSpeed's format: a shard per rank
    for later in ("checkpoint-4", "checkpoint-5", "model"):
        shutil.rmtree(out / later)
    result = launch_zero(3, tiny_model_dir, data_file, out, **zero_settings(3, False))
    assert "resumed from" in result.stdout and "checkpoint-2 at step 2" in result.stdout
    assert_same_trajectory(whole, read_jsonl(out / "metrics.jsonl"), atol=1e-6)
    assert read_jsonl(out / "samples.jsonl") == samples, "steps 4 and 5's samples once, step 2's kept"
    assert_exports_the_model(out / "checkpoint-5", out / "model", tiny_model_dir, lora=False)


def assert_exports_the_model(checkpoint, model, tiny_model_dir, lora):
    """What launch/push.py does first: the checkpoint's DeepSpeed shards put together as a model folder; the final
    checkpoint's gives the logits of the run's model/ (gathered by the engine at the end)."""
    from dpo_dist.publish.export import export_checkpoint

    assert_same_logits(export_checkpoint(str(checkpoint)), model, tiny_model_dir, lora, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("stage, lora", [(3, False), (2, True)], ids=["zero3-full", "zero2-lora"])
def test_a_zero_checkpoint_continues_on_another_process_count(stage, lora, zero_run, tiny_model_dir, data_file,
                                                              tmp_path):
    """checkpoint-2 of the 2-process run resumed by one DeepSpeed process, the accumulation doubled to keep the global
    batch of 8: the main process puts the shards together as DeepSpeed's universal checkpoint (each parameter's fp32
    weights and Adam moments whole), the engine takes its partition of them, and steps 3-5 are the 2-process run's.
    The full fine-tune's checkpoint-4, written by that one process, goes back to 2 processes for step 5."""
    _, whole_out = zero_run(stage, lora)
    out = tmp_path / "out"
    copy_run(whole_out, out)
    whole = read_jsonl(out / "metrics.jsonl")
    for later in ("checkpoint-4", "checkpoint-5", "model"):
        shutil.rmtree(out / later)
    settings = {**zero_settings(stage, lora), "train.single_device_fallback": False}  # DeepSpeed, as named
    one = launch_zero(stage, tiny_model_dir, data_file, out, processes=1, **settings)
    written = "4 per device x 1 accumulation" if lora else "2 per device x 2 accumulation"
    now = "4 per device x 2 accumulation" if lora else "2 per device x 4 accumulation"
    assert (f"to keep checkpoint-2's global batch: 8 pairs = {now} x 1 processes (it was written with 8 pairs = "
            f"{written} x 2 processes)") in one.stdout, one.stdout[-3000:]
    assert "checkpoint-2: the DeepSpeed shards of 2 processes put together for 1 (DeepSpeed's universal" in one.stdout
    assert_same_trajectory(whole, read_jsonl(out / "metrics.jsonl"), atol=1e-5)
    assert os.listdir(out / "checkpoint-4" / "pytorch_model") and not os.path.exists(out / "checkpoint-4" / "universal")
    if lora:  # the one process's ZeRO-2 shards of the adapter
        assert_exports_the_model(out / "checkpoint-5", out / "model", tiny_model_dir, lora=True)
        return
    for later in ("checkpoint-5", "model"):
        shutil.rmtree(out / later)
    two = launch_zero(stage, tiny_model_dir, data_file, out, **zero_settings(stage, lora))
    assert "checkpoint-4: the DeepSpeed shards of 1 process put together for 2" in two.stdout, two.stdout[-3000:]
    assert_same_trajectory(whole, read_jsonl(out / "metrics.jsonl"), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full-second-sharded-model", "lora-adapters-off"])
def test_zero3_online_reference_equals_one_process(lora, one_process, tiny_model_dir, data_file, tmp_path):
    """The online reference under ZeRO-3 (no precompute): the trajectory of the precomputed single-process run."""
    out = tmp_path / "out"
    launch_zero(3, tiny_model_dir, data_file, out, **STEPS, **{"lora.enabled": lora, "reference.mode": "online"})
    assert not os.path.exists(f"{out}-refcache"), "no reference cache in online mode"
    assert_same_trajectory(one_process[lora][0], read_jsonl(out / "metrics.jsonl"), atol=1e-4)


@pytest.mark.slow
def test_a_non_finite_loss_stops_before_deepspeed_steps(tiny_model_dir, data_file, tmp_path):
    """Under DeepSpeed, accelerate's backward at the last micro-batch steps the engine, so the loss is checked before
    that backward: at the NaN step 2 the engine never steps (1 engine step for 2 train steps), the weights stay as
    step 1 left them, and the message says so. (Before, the engine stepped first; DeepSpeed 0.19 then skips non-finite
    gradients by its own check, which its config can switch off.)"""
    out, results = tmp_path / "out", tmp_path / "results"
    results.mkdir()
    command = accelerate_launch("--config_file", os.path.join(ROOT, "accelerate_configs", "zero2.yaml"),
                                "--num_processes", "2", os.path.join(ROOT, "tests", "scripts", "nonfinite_deepspeed.py"),
                                str(results))
    command += overrides(tiny_model_dir, data_file, out, **{"train.per_device_batch_size": 4, "train.save_every": 1})
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in (0, 1):
        found = json.loads((results / f"rank{rank}.json").read_text())
        assert found["train_steps"] == 2 and found["engine_steps"] == 1, found
        assert found["moved_by_failed_step"] == 0.0 and found["finite"], found
        assert "non-finite loss at step 2" in found["message"] and "stopped before applying it" in found["message"]
        assert f"Last checkpoint: {out / 'checkpoint-1'}" in found["message"]


@pytest.mark.slow
def test_zero3_offload_equals_one_process(one_process, tiny_model_dir, data_file, tmp_path):
    """accelerate_configs/zero3_offload.yaml (optimizer state and parameters in CPU memory) runs and computes what
    one process does."""
    out = tmp_path / "out"
    result = launch_zero(3, tiny_model_dir, data_file, out, config="zero3_offload.yaml", **STEPS)
    assert "packing: on" in result.stdout
    assert_same_trajectory(one_process[False][0], read_jsonl(out / "metrics.jsonl"), atol=1e-4)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vaderSentiment") is None, reason="the built-in set needs vadersentiment")
def test_builtin_sentiment_set_is_built_under_zero3(tiny_model_dir, tmp_path):
    """The default data under ZeRO-3 (the model loaded partitioned): the main process samples the set from an
    unsharded copy, the run trains, and the files equal those one process builds."""
    settings = {"data.source": "builtin:sentiment", "data.sentiment.num_prompts": 8, "data.sentiment.eval_prompts": 2,
                "data.sentiment.completions_per_prompt": 3, "data.sentiment.max_new_tokens": 8,
                "data.sentiment.min_score_gap": 0.0, "train.max_steps": 1, "train.per_device_batch_size": 2}
    from torch.utils.cpp_extension import get_default_build_root

    # DeepSpeed's compiled ops live under XDG_CACHE_HOME too: kept where the other tests built them (a rebuild is 30 s)
    launch_zero(3, tiny_model_dir, "unused", tmp_path / "zero3", env={"XDG_CACHE_HOME": str(tmp_path / "cache-zero3"),
                                                                      "TORCH_EXTENSIONS_DIR": get_default_build_root()},
                **settings)
    one = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"),
                          *overrides(tiny_model_dir, "unused", tmp_path / "one", **settings)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache-one")})
    assert one.returncode == 0, one.stderr[-3000:]
    built = {d: sorted((tmp_path / d / "dpo_dist" / "data").iterdir()) for d in ("cache-zero3", "cache-one")}
    assert [p.name for p in built["cache-zero3"]] == [p.name for p in built["cache-one"]] and built["cache-one"]
    for zero3, single in zip(built["cache-zero3"], built["cache-one"]):
        assert zero3.read_text() == single.read_text() and zero3.read_text()
