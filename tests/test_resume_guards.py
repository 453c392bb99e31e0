"""Around a resume (issue 29 items 3, 5, 6): a changed config is refused or taken and recorded, one run per output
folder, and a divergence that stays finite stops the run. In-process runs on the tiny model; the lock and the
divergence rule also alone."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import yaml

from dpo_dist.config import (RESUME_RULES, Config, ConfigError, flatten, load_config, read_config_history, resume_rule,
                             to_dict)
from dpo_dist.train.checkpoint import TrainState, latest_checkpoint
from dpo_dist.train.metrics import read_metrics
from training import run

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest.py

# 3 steps at a constant lr 1e-3, checkpoint-3 kept: the run the resume tests continue, each from a copy.
FIRST = {"train.max_steps": 3, "train.save_every": 3, "train.lr_scheduler": "constant", "lora.enabled": True}


@pytest.fixture(scope="module")
def three_steps(tiny_model_dir, data_file, tmp_path_factory):
    from training import reset_accelerate_state

    out = tmp_path_factory.mktemp("three") / "out"
    run(tiny_model_dir, data_file, out, **FIRST)
    reset_accelerate_state()
    return out


def copy_of(run_dir, tmp_path):
    """A copy of the run at ``run_dir``, and the settings that resume it as it was (its reference cache)."""
    target = tmp_path / "out"
    shutil.copytree(run_dir, target)
    return target, {**FIRST, "reference.cache_dir": str(run_dir) + "-refcache"}


def test_every_resume_rule_names_a_key_and_every_key_has_one():
    keys = [key for key, _ in flatten(to_dict(Config()))]
    sections = {key.rsplit(".", 1)[0] for key in keys} | {key.split(".")[0] for key in keys}
    assert sorted(set(RESUME_RULES) - set(keys) - sections) == []
    assert {resume_rule(key).kind for key in keys} == {"fixed", "changes", "ignored"}
    assert resume_rule("data.sentiment.seed").kind == "fixed" and resume_rule("train.learning_rate").kind == "changes"


def test_a_changed_fixed_key_is_refused_in_one_line(three_steps, tiny_model_dir, data_file, tmp_path):
    """loss.beta and the seed cannot change mid-run: one line names each, with the old and new value and why, and what
    to do; nothing is written (config.yaml still the run's). (A batch that changes the global batch is refused by the
    shape check: tests/test_shape.py.)"""
    out, same = copy_of(three_steps, tmp_path)
    before = (out / "config.yaml").read_text()
    with pytest.raises(ConfigError) as error:
        run(tiny_model_dir, data_file, out, **{**same, "loss.beta": 0.2, "train.seed": 7, "train.max_steps": 5})
    assert str(error.value) == (
        f"cannot resume the run in {out} with these changes: loss.beta 0.1 -> 0.2 (the objective the run has optimized "
        "so far); train.seed 42 -> 7 (the data order, the splits and the initialization); they cannot change in the "
        "middle of a run: put the old values back to resume, or start a new run in another train.output_dir "
        "(train.resume=never starts this folder over)")
    assert (out / "config.yaml").read_text() == before and not (out / "config_history.yaml").exists()
    assert not (out / "run.lock").exists()  # the refused run let its lock go


def test_a_new_learning_rate_takes_effect_at_the_resumed_step(three_steps, tiny_model_dir, data_file, tmp_path,
                                                              monkeypatch, capsys):
    """Resumed at step 3 with lr 1e-4 (was 1e-3), 5 steps (was 3) and 4 x 2 pairs per step (was 8 x 1: the same
    global batch, allowed): the optimizer steps at 1e-4 from step 4 (its parameter groups, restored from the
    checkpoint at 1e-3, are set from the config), the log says so at step 3, config.yaml holds the new values and
    config_history.yaml what changed when."""
    from dpo_dist.train import trainer

    built = []
    real = trainer.build_optimizer
    monkeypatch.setattr(trainer, "build_optimizer", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    out, same = copy_of(three_steps, tmp_path)
    run(tiny_model_dir, data_file, out, **{**same, "train.learning_rate": 1e-4, "train.max_steps": 5,
                                           "train.per_device_batch_size": 4, "train.gradient_accumulation_steps": 2})
    records = read_metrics(str(out / "metrics.jsonl"))
    assert [(r["step"], r["lr"]) for r in records] == [(1, 1e-3), (2, 1e-3), (3, 1e-3), (4, 1e-4), (5, 1e-4)]
    assert [r["examples_seen"] for r in records] == [8, 16, 24, 32, 40]
    [optimizer] = built
    assert [(g["lr"], g["initial_lr"]) for g in optimizer.param_groups] == [(1e-4, 1e-4)]
    assert (f"config changed at step 3: train.max_steps 3 -> 5, train.per_device_batch_size 8 -> 4, "
            f"train.gradient_accumulation_steps 1 -> 2, train.learning_rate 0.001 -> 0.0001; the new values hold from step 4 (recorded "
            f"in {out}/config_history.yaml)") in (log := capsys.readouterr().out), log[-1500:]
    assert read_config_history(str(out)) == [{"step": 3, "changed": {
        "train.per_device_batch_size": {"from": 8, "to": 4}, "train.gradient_accumulation_steps": {"from": 1, "to": 2},
        "train.max_steps": {"from": 3, "to": 5}, "train.learning_rate": {"from": 1e-3, "to": 1e-4}}}]
    assert load_config(str(out / "config.yaml")).train.learning_rate == 1e-4  # every reader loads it as a recipe


# -- the lock ------------------------------------------------------------------------------------------------------


class OneProcess:
    is_main_process, num_processes = True, 1


def lock_file(folder, **holder):
    from dpo_dist.train.lock import this_process

    (folder / "run.lock").write_text(json.dumps({**this_process(), **holder}))


def test_the_lock_refuses_a_second_run_naming_the_holder(tmp_path):
    from dpo_dist.train.lock import OutputLock, _process_start

    first = OutputLock(str(tmp_path))
    assert first.acquire(OneProcess()) is None and (tmp_path / "run.lock").exists()
    first.release()
    assert not (tmp_path / "run.lock").exists()
    parent = os.getppid()  # alive, on this host, not this process
    lock_file(tmp_path, pid=parent, process_start=_process_start(parent), started="2026-12-07T09:00:00+0000",
              slurm_job_id=None)
    with pytest.raises(ConfigError) as error:
        OutputLock(str(tmp_path)).acquire(OneProcess())
    assert str(error.value) == (
        f"train.output_dir {tmp_path} is in use by another run (host {socket.gethostname()}, PID {parent}, started "
        f"2026-12-07T09:00:00+0000; {tmp_path}/run.lock): wait for it to end or use another train.output_dir; if "
        f"that run is gone (ended on another machine), delete {tmp_path}/run.lock")
    lock_file(tmp_path, host="node7", pid=parent, slurm_job_id="41")  # another host, another job: cannot tell
    with pytest.raises(ConfigError, match=r"in use by another run \(host node7, PID \d+, started .*, SLURM job 41;"):
        OutputLock(str(tmp_path)).acquire(OneProcess())


def test_a_stale_lock_is_taken_over_with_a_line(tmp_path, monkeypatch):
    """Its process gone (same host), or the same SLURM job come back (requeued, any host): taken over, and said."""
    from dpo_dist.train.lock import OutputLock, read_holder

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock_file(tmp_path, pid=gone.pid, started="2026-12-07T09:00:00+0000", slurm_job_id=None)
    lock = OutputLock(str(tmp_path))
    said = lock.acquire(OneProcess())
    assert said == (f"took over {tmp_path}/run.lock from a run that is gone (host {socket.gethostname()}, PID "
                    f"{gone.pid}, started 2026-12-07T09:00:00+0000: process {gone.pid} is not running)")
    assert read_holder(str(tmp_path / "run.lock"))["pid"] == os.getpid()
    lock.release()
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    lock_file(tmp_path, host="node7", pid=1, started="2026-12-07T09:00:00+0000", slurm_job_id="41")
    said = OutputLock(str(tmp_path)).acquire(OneProcess())
    assert said == (f"took over {tmp_path}/run.lock from a run that is gone (host node7, PID 1, started "
                    "2026-12-07T09:00:00+0000, SLURM job 41: SLURM job 41 has started again (requeued), so its earlier "
                    "run has ended)")


def test_a_run_into_a_locked_folder_is_refused(tiny_model_dir, data_file, tmp_path):
    from dpo_dist.train.lock import _process_start

    out = tmp_path / "out"
    out.mkdir()
    lock_file(out, pid=os.getppid(), process_start=_process_start(os.getppid()), slurm_job_id=None)
    with pytest.raises(ConfigError, match=rf"^train.output_dir {out} is in use by another run \(host "):
        run(tiny_model_dir, data_file, out)
    assert sorted(os.listdir(out)) == ["run.lock"]  # nothing written, the holder's lock left


# -- the divergence guard ------------------------------------------------------------------------------------------


NOWHERE = "train.output_dir=/nonexistent/dpo-dist-guard"  # the guard sets aside checkpoints there: none


def steps(cfg, losses, grad_norms=None, lr=1e-3):
    """The guard itself (watch_divergence, one process, no checkpoints) over a run's losses (and gradient norms): the
    step it stops at, or None."""
    import types

    import torch

    from dpo_dist.train.checks import watch_divergence

    one = types.SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    model, state = torch.nn.Linear(1, 1), TrainState()
    for step, loss in enumerate(losses, 1):
        grad_norm = 1.0 if grad_norms is None else grad_norms[step - 1]
        if watch_divergence(one, model, state, step, {"loss": loss, "grad_norm": grad_norm}, lr, cfg):
            return step
    return None


def test_the_divergence_rule_on_healthy_noisy_and_diverging_losses():
    """Defaults: 5 steps in a row of a loss above 3 x max(first loss, ln 2), or of grad_norm exactly 0 at lr > 0."""
    cfg = load_config(None, [NOWHERE])
    noisy = [0.693, 0.9, 1.5, 2.3, 0.7, 2.5, 2.2, 2.1, 0.6, 0.4]  # spikes above 2.08, never 5 in a row
    assert steps(cfg, noisy) is None
    assert steps(cfg, [25.0, 30.0, 60.0, 20.0, 10.0, 5.0, 1.0]) is None  # ipo starts at (1 / 2beta)^2 = 25
    assert steps(cfg, [0.05, 0.5, 1.2, 1.9, 0.8, 1.5, 2.0]) is None  # a reference-free loss whose first batch was easy
    assert steps(cfg, [1.0, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 0.5, 0, 0, 0, 0, 0]) is None  # hinge met by every pair
    assert steps(cfg, [0.693] * 8, [1.0, 1.0] + [0.0] * 6, lr=0.0) is None  # lr 0: nothing moves, by design
    assert steps(cfg, [0.693, 3.5, 3.5, 3.5, 3.5, 3.5, 3.5]) == 6  # the run: 3.5 from step 2
    assert steps(cfg, [0.693, 0.6, 0.6, 0.6, 0.6, 0.6], [1.0, 0, 0, 0, 0, 0]) == 6  # gradients vanish from step 2
    assert steps(load_config(None, [NOWHERE, "train.divergence_patience=2"]), [0.693, 2.2, 2.3]) == 3
    assert steps(load_config(None, [NOWHERE, "train.divergence_loss_factor=null"]), [0.693, 3.5, 3.5, 3.5, 3.5, 3.5]) is None
    with pytest.raises(ConfigError, match=r"train.divergence_loss_factor must be above 1 \(or null\), got 0.5"):
        load_config(None, ["train.divergence_loss_factor=0.5"])


def test_a_finite_divergence_stops_with_the_figures_and_keeps_the_last_good_checkpoint(
        tiny_model_dir, data_file, tmp_path, monkeypatch):
    """The issue's dead model, made on purpose: from step 4 the loss is 3.5 with gradients exactly 0 (a loss cut off
    from the weights). With patience 3 the run stops at step 6 with the figures; checkpoint-3 and later (the weights
    from step 3 on gave the bad steps) go to diverged/, checkpoint-2 stays the latest, nothing is exported."""
    from dpo_dist.train import objective
    from dpo_dist.train.checks import TrainingError

    real = objective.preference_loss
    calls = {"n": 0}

    def dead(*args, **kwargs):
        calls["n"] += 1
        losses, chosen, rejected = real(*args, **kwargs)
        return (losses * 0 + 3.5 if calls["n"] >= 4 else losses), chosen, rejected

    monkeypatch.setattr(objective, "preference_loss", dead)
    out = tmp_path / "out"
    with pytest.raises(TrainingError) as error:
        run(tiny_model_dir, data_file, out, **{"lora.enabled": True, "train.max_steps": 10, "train.save_every": 1,
                                               "train.keep_last": 10, "train.divergence_patience": 3,
                                               "train.lr_scheduler": "constant"})
    message = str(error.value)
    assert message.startswith(
        "diverged at step 6: loss 3.5 above 3 x 0.6931 (train.divergence_loss_factor x max(the first step's loss "
        "0.6931, ln 2)) and grad_norm exactly 0 at lr 0.001, for 3 steps in a row (since step 4; "
        "train.divergence_patience=3); largest trainable |weight| "), message
    assert message.endswith(
        f"; stopped without saving this state or exporting a model; checkpoint-3, checkpoint-4, checkpoint-5 (from "
        f"step 3, whose weights gave the first of them) moved to {out}/diverged/; the last checkpoint from before it "
        f"is {out}/checkpoint-2: run again with a lower train.learning_rate (now 0.001) to resume from it at that "
        "rate"), message
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    assert sorted(os.listdir(out / "diverged")) == ["checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert not (out / "model").exists() and not (out / "run.lock").exists()
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(r["loss"]) for r in read_metrics(str(out / "metrics.jsonl")))
