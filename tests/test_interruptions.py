"""Interrupted runs: a stop signal (preemption) checkpoints and stops; a kill in the middle of a checkpoint write
leaves the previous checkpoint whole; either way the same command resumes to the uninterrupted trajectory."""

import os
import signal
import subprocess
import sys
import time

import pytest

from faults import STOP_SIGNALS
from training import ROOT, assert_same_trajectory, overrides, reset_accelerate_state, run

SETTINGS = {"lora.enabled": False, "train.per_device_batch_size": 8, "train.max_steps": 6, "train.save_every": 2}


def test_killed_during_a_checkpoint_write_the_previous_one_stays(tiny_model_dir, data_file, tmp_path):
    """SIGKILL while checkpoint-4 is being written (``slow_checkpoint_launch.py`` stops inside its write): checkpoint-2
    is still the latest complete one, and the run resumes from it to the uninterrupted trajectory."""
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
    resumed = run(tiny_model_dir, data_file, out, **settings)["records"]
    reset_accelerate_state()
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


def test_a_checkpoint_that_does_not_fit_is_an_error_not_a_silent_restart(tiny_model_dir, data_file, tmp_path):
    """Full fine-tuning: weights whose keys do not match the model (here renamed as a 2-process DDP run names them,
    ``module.``-prefixed) stop the resume with the checkpoint named, instead of loading nothing."""
    from safetensors.torch import load_file, save_file

    from dpo_dist.train.checkpoint import CheckpointError

    out = tmp_path / "out"
    run(tiny_model_dir, data_file, out, **{**SETTINGS, "train.max_steps": 2})
    reset_accelerate_state()
    weights = out / "checkpoint-2" / "model.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in load_file(weights).items()}, weights)
    with pytest.raises(CheckpointError, match=r"checkpoint-2 does not fit this model: .*another number of processes"):
        run(tiny_model_dir, data_file, out, **{**SETTINGS, "train.max_steps": 4})
    reset_accelerate_state()
