"""Interrupted runs: a stop signal (preemption) checkpoints and stops; a kill in the middle of a checkpoint write
leaves the previous checkpoint whole; either way the same command resumes to the uninterrupted trajectory."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from faults import STOP_SIGNALS
from training import (ROOT, accelerate_launch, assert_same_trajectory, command_lines, overrides, read_jsonl,
                      reset_accelerate_state, run)

SETTINGS = {"lora.enabled": False, "train.per_device_batch_size": 8, "train.max_steps": 6, "train.save_every": 2}


@pytest.mark.slow
def test_killed_during_a_checkpoint_write_the_previous_one_stays(tiny_model_dir, data_file, tmp_path, capsys):
    """SIGKILL while checkpoint-4 is being written (``slow_checkpoint_launch.py`` stops inside its write): checkpoint-2
    is still the latest complete one, and the run resumes from it to the uninterrupted trajectory. The half-written
    checkpoint-4.tmp is removed when the run starts again (it saves every 3 steps now, so it never writes
    checkpoint-4 over it)."""
    out, settings = tmp_path / "out", SETTINGS
    marker = tmp_path / "writing"
    log = open(tmp_path / "log.txt", "w")
    process = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "slow_checkpoint_launch.py"), str(marker),
         *overrides(tiny_model_dir, data_file, out, **settings)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        process.kill()
        process.wait()
        log.close()
    from dpo_dist.train.checkpoint import latest_checkpoint

    assert os.path.isdir(out / "checkpoint-4.tmp") and not os.path.exists(out / "checkpoint-4")
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    capsys.readouterr()
    resumed = run(tiny_model_dir, data_file, out, **{**settings, "train.save_every": 3})["records"]
    reset_accelerate_state()
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-6"]
    assert f"removed {out / 'checkpoint-4.tmp'}: left by a run killed while writing it" in capsys.readouterr().out
    whole = run(tiny_model_dir, data_file, tmp_path / "whole", **settings)["records"]
    reset_accelerate_state()
    assert_same_trajectory(whole, resumed, atol=1e-6)


@pytest.mark.parametrize("sig", [getattr(signal, name) for name in STOP_SIGNALS], ids=STOP_SIGNALS)
def test_a_stop_signal_checkpoints_the_step_and_stops(sig, tiny_model_dir, data_file, tmp_path, monkeypatch):
    """The signal arrives during step 3 (no checkpoint is due: save_every is 4): the trainer finishes the step, writes
    checkpoint-3, raises Preempted naming it; the same command resumes there to the uninterrupted trajectory."""
    import dpo_dist.train.trainer as trainer
    from dpo_dist.train.preemption import Preempted

    out, settings = tmp_path / "out", {**SETTINGS, "train.save_every": 4}
    real_step, steps = trainer.train_step, []

    def step_with_signal(*args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), sig)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", step_with_signal)
    handler_before = signal.getsignal(sig)
    with pytest.raises(Preempted, match=rf"stopped by {sig.name} after step 3: checkpoint written to .*checkpoint-3"):
        run(tiny_model_dir, data_file, out, **settings)
    reset_accelerate_state()
    assert signal.getsignal(sig) == handler_before, "the trainer's handler is gone with the run"
    assert sorted(os.listdir(out)) == ["checkpoint-3", "config.yaml", "metrics.jsonl"]
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = run(tiny_model_dir, data_file, out, **settings)["records"]
    reset_accelerate_state()
    whole = run(tiny_model_dir, data_file, tmp_path / "whole", **settings)["records"]
    reset_accelerate_state()
    assert_same_trajectory(whole, resumed, atol=1e-6)
    # The resumed run's summary spans the whole run, step 1 to 6, as the uninterrupted run's does.
    summary = (out / "summary.txt").read_text()
    assert f"loss: {whole[0]['loss']: .4f} (step 1) -> {whole[-1]['loss']: .4f} (step 6)" in summary
    assert summary.startswith(f"steps: 6, pairs seen: {whole[-1]['examples_seen']}")
    assert summary.count("(step 1) ->") == 5


def test_a_checkpoint_that_does_not_fit_is_an_error_not_a_silent_restart(tiny_model_dir, data_file, tmp_path):
    """Full fine-tuning: weights whose keys do not match the model (here ``module.``-prefixed, as a wrapper would name
    them) stop the resume with the checkpoint named, instead of loading nothing."""
    from safetensors.torch import load_file, save_file

    from dpo_dist.train.checkpoint import CheckpointError

    out = tmp_path / "out"
    run(tiny_model_dir, data_file, out, **{**SETTINGS, "train.max_steps": 2})
    reset_accelerate_state()
    weights = out / "checkpoint-2" / "model.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in load_file(weights).items()}, weights)
    rewrite_manifest(out / "checkpoint-2", "model.safetensors")  # whole, as such a run would have written it
    with pytest.raises(CheckpointError, match=r"checkpoint-2 does not fit this model: .*written by another model\? resume with the model"):
        run(tiny_model_dir, data_file, out, **{**SETTINGS, "train.max_steps": 4})
    reset_accelerate_state()


def rewrite_manifest(checkpoint, name):
    """The manifest of ``checkpoint`` made to describe ``name`` as it is now (a test that rewrites a file on purpose)."""
    import hashlib
    import json

    from dpo_dist.train.checkpoint import MANIFEST

    manifest = json.loads((checkpoint / MANIFEST).read_text())
    data = (checkpoint / name).read_bytes()
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


def test_resuming_an_older_checkpoint_sets_the_later_ones_aside(tiny_model_dir, data_file, tmp_path, capsys):
    """A run to step 6 leaves checkpoint-2, -4 and -6; resumed from checkpoint-2 (train.resume=<its path>) it goes
    another way (here: stops at step 3). checkpoint-4 and -6 belong to the abandoned run: they are moved to
    abandoned/, so checkpoint-3 is the latest (what train.resume=auto picks next) and keep_last counts this run's."""
    from dpo_dist.train.checkpoint import latest_checkpoint

    out = tmp_path / "out"
    run(tiny_model_dir, data_file, out, **{**SETTINGS, "train.keep_last": 3})
    reset_accelerate_state()
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    capsys.readouterr()
    result = run(tiny_model_dir, data_file, out, **{**SETTINGS, "train.resume": str(out / "checkpoint-2"),
                                                     "train.max_steps": 3, "train.save_every": 1})
    reset_accelerate_state()
    assert [r["step"] for r in result["records"]] == [1, 2, 3]
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-3")
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]
    assert sorted(os.listdir(out / "abandoned")) == ["checkpoint-4", "checkpoint-6"]
    log = capsys.readouterr().out
    assert "resumed from" in log and "checkpoint-2 at step 2" in log
    assert f"checkpoint-4, checkpoint-6 (from a run that went past step 2, not continued) moved to {out / 'abandoned'}/" in log


def test_every_file_and_folder_of_a_checkpoint_is_fsynced_before_the_rename(tiny_model_dir, data_file, tmp_path,
                                                                           monkeypatch):
    """Each file of checkpoint-2 (model, optimizer, scheduler, RNG, trainer_state.json) and each of its folders is
    fsynced before checkpoint-2.tmp is renamed to checkpoint-2; the output folder (the rename) after it."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, target, **kwargs):
        events.append(("replace", os.fspath(source), os.fspath(target)))
        real_replace(source, target, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "out"
    run(tiny_model_dir, data_file, out, **{**SETTINGS, "train.max_steps": 2})
    reset_accelerate_state()
    final = os.path.realpath(out / "checkpoint-2")
    rename = events.index(("replace", str(out / "checkpoint-2.tmp"), str(out / "checkpoint-2")))
    synced = {path for kind, path, *_ in events[:rename] if kind == "fsync"}
    expected = set()
    for folder, _, files in os.walk(final):
        expected |= {folder} | {os.path.join(folder, name) for name in files}
    expected = {path.replace(final, final + ".tmp", 1) for path in expected}
    assert len(expected) >= 5 and os.path.join(final + ".tmp", "trainer_state.json") in expected
    assert expected <= synced, sorted(expected - synced)
    assert ("fsync", os.path.realpath(out)) in events[rename:]


def kill_during_second_checkpoint(command, marker, log_path):
    """Start ``command`` (its trainers run ``slow_checkpoint_launch.py``), wait until a trainer is inside its second
    checkpoint write, then SIGKILL the launcher's process group and every trainer (torchrun starts each trainer in a
    session of its own: left alone, they would wake from the stall after the test and finish the write)."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while not marker.exists():
                assert process.poll() is None and time.monotonic() < deadline, open(log_path).read()[-3000:]
                time.sleep(0.2)
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            for pid, args in command_lines():
                if str(marker).encode() in args:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


@pytest.mark.multiprocess
@pytest.mark.parametrize("launcher", ["ddp", "zero3"])  # ZeRO-2 writes through the same DeepSpeed save as ZeRO-3
def test_two_process_lora_killed_mid_checkpoint_resumes_the_same(launcher, tiny_model_dir, data_file, tmp_path):
    """LoRA (the default) on 2 processes, DDP over gloo or DeepSpeed ZeRO-3: SIGKILL while checkpoint-4, the last,
    is being written; the same command resumes from checkpoint-2 (which holds only the adapter) and repeats the
    uninterrupted 2-process run step for step. That run is the killed one: every step of it was logged before the
    kill, so no third launch is needed to know its trajectory."""
    settings = {"lora.enabled": True, "train.per_device_batch_size": 4, "train.max_steps": 4, "train.save_every": 2,
                "train.eval_every": 4, "train.warmup_ratio": 0.34}
    config = os.path.join(ROOT, "accelerate_configs", f"{launcher}.yaml")

    def command(script, out, *before):
        return [*accelerate_launch("--config_file", config, "--num_processes", "2", "--num_machines", "1",
                                   os.path.join(ROOT, *script), *before), *overrides(tiny_model_dir, data_file, out, **settings)]

    out, marker = tmp_path / "out", tmp_path / "writing"
    kill_during_second_checkpoint(command(("tests", "slow_checkpoint_launch.py"), out, str(marker)), marker,
                                  tmp_path / "killed.log")
    assert os.path.isdir(out / "checkpoint-4.tmp") and not os.path.exists(out / "checkpoint-4")
    whole = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in whole] == [1, 2, 3, 4] and "eval/loss" in whole[-1]
    # checkpoint-2 holds the adapter only, not the frozen base: in a safetensors file, or in DeepSpeed's model states
    if launcher == "ddp":
        from safetensors import safe_open

        with safe_open(str(out / "checkpoint-2" / "model.safetensors"), framework="pt") as handle:
            names = list(handle.keys())
    else:
        import glob

        import torch

        files = glob.glob(str(out / "checkpoint-2" / "pytorch_model" / "*model_states.pt"))
        states = [torch.load(f, map_location="cpu", weights_only=False) for f in files]
        assert len(states) == (1 if launcher == "zero2" else 2) and not any(s.get("frozen_param_fragments") for s in states)
        names = [name for state in states for name in state["module"]]
        # DeepSpeed leaves frozen weights out by parameter: the output layer tied to the frozen embeddings stays in
        # under its second name (a full tensor under ZeRO-2, an empty placeholder under ZeRO-3)
        tied = "base_model.model.lm_head.weight"
        assert names.count(tied) == len(states)
        names = [name for name in names if name != tied]
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names), names[:5]
    resumed = subprocess.run(command(("launch", "train.py"), out), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert "checkpoint-2 at step 2" in resumed.stdout
    assert_same_trajectory(whole, read_jsonl(out / "metrics.jsonl"), atol=1e-6)


def test_the_tied_weights_notice_is_dropped_while_a_checkpoint_is_written(caplog):
    """Accelerate warns "Removed shared tensor {'lm_head.weight'}" at each checkpoint of a tied model (the tiny one
    and SmolLM2); the checkpoint is read back into the same tied model, so inside a checkpoint write it is dropped,
    and only there."""
    import logging

    import torch
    from accelerate import PartialState
    from accelerate.utils.other import clean_state_dict_for_safetensors

    from dpo_dist.train.checkpoint import without_tied_weights_notice

    PartialState()
    weight = torch.zeros(2, 2)
    with caplog.at_level(logging.WARNING):
        with without_tied_weights_notice():
            kept = clean_state_dict_for_safetensors({"embed.weight": weight, "lm_head.weight": weight})
        assert list(kept) == ["embed.weight"] and not caplog.records
        clean_state_dict_for_safetensors({"embed.weight": weight, "lm_head.weight": weight})
    assert len(caplog.records) == 1 and "Removed shared tensor {'lm_head.weight'}" in caplog.records[0].getMessage()
