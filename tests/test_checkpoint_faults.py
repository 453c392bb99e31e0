"""A trainer killed in the middle of writing a checkpoint leaves the previous one whole, and resumes from it."""

import os
import subprocess
import sys
import time

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
    from dpo_dist.checkpoint import latest_checkpoint

    assert os.path.isdir(out / "checkpoint-4.tmp") and not os.path.exists(out / "checkpoint-4")
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    resumed = run(tiny_model_dir, data_file, out, **settings)["records"]
    reset_accelerate_state()
    whole = run(tiny_model_dir, data_file, tmp_path / "whole", **settings)["records"]
    reset_accelerate_state()
    assert_same_trajectory(whole, resumed, atol=1e-6)
