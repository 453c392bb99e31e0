"""benchmarks/gpu_check.sh rehearsed on CPU: every run it makes on a GPU starts, trains and is read into the table.

A GPU is lent to few sessions, for minutes; a script that breaks there wastes them. The rehearsal
(``GPU_CHECK_ON_CPU=1``) runs the same launches with the same overrides on CPU processes, a tiny model and 3 steps:
every run with 1 process, as the device tool's one GPU runs them (the ZeRO-3 run must run DeepSpeed as named, not
the single-device fallback; FSDP2 over one rank runs only on a GPU, one CPU process trains unsharded), and the
sharded runs again with 2, as on a machine with 2 GPUs.
"""

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

from training import ROOT

RUNS = ("sdpa-packed", "flex-packed", "zero3-full", "fsdp2-full", "qlora")


def ran_as(processes):
    """What each run's log says it ran as (the trainer's own lines)."""
    sharded = f"x {processes} processes"
    fsdp = (f"FSDP2: parameters, gradients and optimizer state sharded over {processes} processes" if processes > 1 else
            "FSDP: not applied: an FSDP config was given, but one CPU process has nothing to shard")  # GPU: FSDP2 over 1
    return {
        "sdpa-packed": ["packing: on", "LoRA adapters in fp32, bf16 compute"],
        "zero3-full": ["packing: on", sharded, "fp32 master weights in DeepSpeed's optimizer"],
        "fsdp2-full": ["packing: on", sharded, fsdp],
        "qlora": ["packing: on", "frozen base of 4-bit NF4"],
    }


@pytest.mark.multiprocess
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("bitsandbytes") is None,
                    reason="the check runs ZeRO-3 and QLoRA: python3 -m pip install -e '.[dev]'")
# 2 processes: the script's sharded path once (its FSDP2 run differs from the ZeRO-3 one by the config it names)
@pytest.mark.parametrize("processes, runs", [(1, RUNS), (2, ("zero3-full",))], ids=["1", "2"])
def test_every_run_of_the_gpu_check_starts_and_reports_on_cpu(processes, runs, tiny_model_dir, tmp_path):
    work = tmp_path / "work"
    small = "train.max_steps=3 data.num_samples=48 data.max_length=64 data.max_prompt_length=32 train.per_device_batch_size=4"
    if processes == 1:
        small = f"model.name_or_path={tiny_model_dir} {small}"
        model_config = {}
    else:  # as on the device tool's machine: the model's config and tokenizer travel, its weights are made there
        config_only = tmp_path / "config-only"
        config_only.mkdir()
        for name in os.listdir(tiny_model_dir):
            if not name.endswith(".safetensors"):
                shutil.copy(os.path.join(tiny_model_dir, name), config_only)
        model_config = {"GPU_CHECK_MODEL_CONFIG": str(config_only)}
    env = {**os.environ, "GPU_CHECK_ON_CPU": "1", "GPU_CHECK_PROCESSES": str(processes), "GPU_CHECK_ARGS": small,
           "GPU_CHECK_RUNS": " ".join(runs), "WORK": str(work), **model_config,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}  # its python3 and accelerate
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True, text=True,
                            env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    if model_config:
        assert "config with random weights" in result.stderr
        model = f"policy {work / 'model'}: "
    else:
        model = f"policy {tiny_model_dir}: "
    table = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines() if line.split()[:1] in
             [[run] for run in RUNS]}
    assert set(table) == set(runs), result.stdout
    if "flex-packed" in runs:  # FlexAttention has no backward on CPU: refused at start, with the reason; the table says so
        assert table["flex-packed"][:2] == ["-", "failed"], result.stdout
        assert "cannot train on CPU" in (work / "flex-packed.log").read_text()
    for run, lines in ran_as(processes).items():
        if run not in runs:
            assert not (work / f"{run}.log").exists(), run
            continue
        ran_on, tokens_per_s, peak_gib, mfu = table[run]
        assert int(ran_on) == (processes if run.endswith("-full") else 1), (run, table[run])
        assert float(tokens_per_s) > 0 and float(peak_gib) > 0 and mfu == "-", (run, table[run])  # no GPU, no MFU
        log = (work / f"{run}.log").read_text()
        for line in lines + [model]:
            assert line in log, (run, line, log[-2000:])
        assert "single-device fallback" not in log, (run, log[-2000:])  # each run ran as named
        assert (work / run / "model").is_dir(), run  # its final export was written


@pytest.mark.parametrize("setting, said", [
    ({"GPU_CHECK_RUNS": "zero3-full zero2-full"}, "GPU_CHECK_RUNS: no run named 'zero2-full'"),
    ({"GPU_CHECK_PROCESSES": "two"}, "GPU_CHECK_PROCESSES: 'two' is not a positive whole number"),
    ({"GPU_CHECK_PROCESSES": "0"}, "GPU_CHECK_PROCESSES: '0' is not a positive whole number"),
    ({"GPU_PEAK_TFLOPS": "989 TFLOPS"}, "GPU_PEAK_TFLOPS: '989 TFLOPS' is not a positive number of TFLOP/s"),
    ({"GPU_PEAK_TFLOPS": "0"}, "GPU_PEAK_TFLOPS: '0' is not a positive number of TFLOP/s"),
    ({"GPU_CHECK_MODEL_CONFIG": "/no/such/model"}, "GPU_CHECK_MODEL_CONFIG: no config.json in '/no/such/model'"),
], ids=["run", "processes", "zero-processes", "peak", "zero-peak", "model-config"])
def test_a_wrong_setting_is_refused_before_anything_runs(setting, said, tmp_path):
    env = {**os.environ, "GPU_CHECK_ON_CPU": "1", "WORK": str(tmp_path / "work"), **setting}
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 2
    assert said in result.stderr
    assert not (tmp_path / "work").exists()  # nothing was made, nothing launched


def test_without_a_gpu_the_check_says_what_it_needs(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_ON_CPU"}
    env.update(CUDA_VISIBLE_DEVICES="", WORK=str(tmp_path),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    result = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode != 0
    assert "gpu_check.sh needs a CUDA GPU (GPU_CHECK_ON_CPU=1 rehearses it on CPU)" in result.stderr
    assert not (tmp_path / "sdpa-packed.log").exists()  # nothing was launched
