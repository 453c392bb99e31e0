"""The single-device fallback: a launch asking for ZeRO or several processes on one device trains QLoRA there."""

import importlib.util
import os
import subprocess

import pytest
import yaml

from dpo_dist.config import ConfigError, load_config
from dpo_dist.launch_policy import Launch, apply_fallback, needs_fallback
from training import ROOT, accelerate_launch, assert_same_trajectory, overrides, read_jsonl, reset_accelerate_state, run

needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="needs bitsandbytes: python3 -m pip install -e '.[qlora]' (the dev extra has it)")


@pytest.mark.parametrize("launch, falls_back", [
    (Launch(world_size=2, local_world_size=2, local_rank=0, deepspeed=False, devices=1), True),  # 2 procs, 1 GPU
    (Launch(world_size=1, local_world_size=1, local_rank=0, deepspeed=True, devices=1), True),  # ZeRO, 1 GPU
    (Launch(world_size=1, local_world_size=1, local_rank=0, deepspeed=True, devices=0), True),  # ZeRO, 1 CPU process
    (Launch(world_size=1, local_world_size=1, local_rank=0, deepspeed=False, devices=1), False),  # plain 1 GPU
    (Launch(world_size=2, local_world_size=2, local_rank=0, deepspeed=True, devices=0), False),  # CPU procs over gloo
    (Launch(world_size=8, local_world_size=8, local_rank=0, deepspeed=True, devices=8), False),  # a GPU each
    (Launch(world_size=2, local_world_size=1, local_rank=0, deepspeed=True, devices=1), False),  # 2 nodes, 1 GPU each
])
def test_when_it_falls_back(launch, falls_back):
    assert (needs_fallback(launch) is not None) == falls_back


@needs_bnb
def test_what_it_falls_back_to(monkeypatch):
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.setenv(name, "true" if name == "ACCELERATE_USE_DEEPSPEED" else "0")
    cfg = load_config(None, ["lora.enabled=false", "train.gradient_accumulation_steps=3", "data.source=x.jsonl"])
    launch = Launch(world_size=4, local_world_size=4, local_rank=0, deepspeed=True, devices=1)
    fallen, message = apply_fallback(cfg, launch)
    assert fallen.model.quantization == "4bit" and fallen.lora.enabled and fallen.model.gradient_checkpointing
    assert fallen.train.gradient_accumulation_steps == 12, "the same global batch: 3 x 4 processes"
    assert message.startswith("single-device fallback: 4 processes were launched but this machine has one GPU")
    assert "RANK" not in os.environ and os.environ["ACCELERATE_USE_DEEPSPEED"] == "false", "a plain process now"
    # a recipe that quantizes in 8-bit keeps it; the other local ranks exit; switched off, nothing changes
    assert apply_fallback(load_config(None, ["model.quantization=8bit"]), launch)[0].model.quantization == "8bit"
    assert apply_fallback(cfg, Launch(4, 4, 2, True, 1)) == (None, None)
    off = load_config(None, ["train.single_device_fallback=false"])
    assert apply_fallback(off, launch) == (off, None)


def test_without_bitsandbytes_it_names_the_fix(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs bitsandbytes.*train.single_device_fallback=false"):
        apply_fallback(load_config(), Launch(1, 1, 0, True, 0))


@needs_bnb
@pytest.mark.multiprocess
def test_two_processes_on_one_gpu_train_one_qlora_process(tiny_model_dir, data_file, tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` where the machine has one GPU (``one_gpu_launch.py`` makes
    the fallback see one; the rest is real): rank 1 exits, rank 0 trains alone what the explicit single-process
    QLoRA run with twice the accumulation trains, step for step."""
    extra = {"lora.enabled": False, "train.max_steps": 4, "train.per_device_batch_size": 4}
    command = accelerate_launch("--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                                "--dynamo_backend", "no", os.path.join(ROOT, "tests", "one_gpu_launch.py"))
    result = subprocess.run(command + overrides(tiny_model_dir, data_file, tmp_path / "fallen", **extra),
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("single-device fallback: 2 processes were launched but this machine has one GPU") == 1
    assert "4 per device x 2 accumulation x 1 processes" in result.stdout
    saved = yaml.safe_load(open(tmp_path / "fallen" / "config.yaml"))
    assert saved["model"]["quantization"] == "4bit" and saved["lora"]["enabled"] is True
    explicit = run(tiny_model_dir, data_file, tmp_path / "explicit", **{
        **extra, "model.quantization": "4bit", "lora.enabled": True, "model.gradient_checkpointing": True,
        "train.gradient_accumulation_steps": 2})["records"]
    reset_accelerate_state()
    assert_same_trajectory(explicit, read_jsonl(tmp_path / "fallen" / "metrics.jsonl"), atol=1e-5)


def launch_one_process(config, tiny_model_dir, data_file, out):
    """``accelerate launch --config_file accelerate_configs/CONFIG --num_processes 1``, 2 steps; it must succeed."""
    command = accelerate_launch("--config_file", os.path.join(ROOT, "accelerate_configs", config),
                                "--num_processes", "1", os.path.join(ROOT, "launch", "train.py"))
    command += overrides(tiny_model_dir, data_file, out, **{"train.max_steps": 2})
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@needs_bnb
@pytest.mark.multiprocess
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs DeepSpeed (the dev extra has it)")
def test_zero3_config_with_one_process_trains_qlora(tiny_model_dir, data_file, tmp_path):
    result = launch_one_process("zero3.yaml", tiny_model_dir, data_file, tmp_path / "out")
    assert "single-device fallback: a DeepSpeed ZeRO config was given, but ZeRO shards nothing" in result.stdout
    assert len(read_jsonl(tmp_path / "out" / "metrics.jsonl")) == 2
    assert yaml.safe_load(open(tmp_path / "out" / "config.yaml"))["model"]["quantization"] == "4bit"


@pytest.mark.multiprocess
def test_an_fsdp_config_on_one_cpu_process_says_it_shards_nothing(tiny_model_dir, data_file, tmp_path):
    """One process has nothing to shard. On a GPU Accelerate still runs FSDP2 over that one rank (its CPU offload can
    still save memory), so there is no fallback for FSDP; on CPU, where FSDP runs over gloo, the run says it is
    unsharded (it said nothing before)."""
    result = launch_one_process("fsdp.yaml", tiny_model_dir, data_file, tmp_path / "out")
    assert "FSDP: not applied: an FSDP config was given, but one CPU process has nothing to shard" in result.stdout
    assert "fallback" not in result.stdout
    assert len(read_jsonl(tmp_path / "out" / "metrics.jsonl")) == 2
