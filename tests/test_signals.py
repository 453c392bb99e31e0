"""Preemption through every documented way to start training: a stop signal sent to the process we started (the
trainer itself, or its launcher) checkpoints at the next step boundary, or stops cleanly before training starts, and
every trainer process exits with the requeue status (75).

The launch forms and signals are listed once, in tests/faults.py (``LAUNCH_FORMS``, ``STOP_SIGNALS``); the run is
tests/signal_launch.py, which is the real entry point plus a marker file at a known point and the exit status of
each process written down.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from dpo_dist.train.metrics import read_metrics
from dpo_dist.train.preemption import PREEMPTED_EXIT_CODE
from faults import LAUNCH_FORMS, STOP_SIGNALS
from training import ROOT, accelerate_launch, overrides

SCRIPT = os.path.join(ROOT, "tests", "signal_launch.py")
SIGNALS = tuple(getattr(signal, name) for name in STOP_SIGNALS)


def command_for(launch: str, *args: str) -> list[str]:
    launcher, _ = LAUNCH_FORMS[launch]
    if launcher is None:
        return [sys.executable, *args]
    return accelerate_launch(*[os.path.join(ROOT, a) if a.startswith("accelerate_configs/") else a for a in launcher],
                             *args)


def start(launch: str, run_dir, when: str, model_dir: str, data_file: str, **extra) -> subprocess.Popen:
    args = [SCRIPT, str(run_dir), when, *overrides(model_dir, data_file, run_dir / "out", **extra)]
    log = open(run_dir / "log.txt", "w")
    # its own session: the signal goes to the launcher alone, as `kill PID` from a shell or a scheduler would send it
    return subprocess.Popen(command_for(launch, *args), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def signal_when_reached(process: subprocess.Popen, run_dir, sig: signal.Signals, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (run_dir / "reached").exists():
        assert process.poll() is None, (run_dir / "log.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "the run never reached the point to signal at"
        time.sleep(0.2)
    process.send_signal(sig)


def wait_for_trainers(run_dir, processes: int, timeout: float = 180) -> list[int]:
    """The exit status of every trainer process (they may outlive a launcher that died of the signal)."""
    deadline = time.monotonic() + timeout
    paths = [run_dir / f"status-{rank}" for rank in range(processes)]
    while not all(p.exists() and p.read_text() for p in paths):
        assert time.monotonic() < deadline, "trainers still running: " + (run_dir / "log.txt").read_text()[-3000:]
        time.sleep(0.2)
    return [int(p.read_text()) for p in paths]


@pytest.mark.slow
def test_a_signal_while_the_builtin_set_is_sampled_stops_within_a_token(tiny_model_dir, data_file, tmp_path,
                                                                        monkeypatch):
    """SIGTERM while the built-in sentiment set is sampled (minutes on a CPU; it used to run on for the rest of the
    build, past a scheduler's kill wait): the next sampled token stops it with the requeue status and a message,
    and nothing of the set is written."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    extra = {"data.source": "builtin:sentiment", "data.sentiment.num_prompts": 16, "data.sentiment.eval_prompts": 4,
             "data.sentiment.completions_per_prompt": 2, "data.sentiment.max_new_tokens": 200,
             "train.max_steps": 2}
    process = start("python", tmp_path, "sentiment:3", tiny_model_dir, data_file, **extra)
    signal_when_reached(process, tmp_path, signal.SIGTERM)
    signalled = time.monotonic()
    assert wait_for_trainers(tmp_path, 1, timeout=60) == [PREEMPTED_EXIT_CODE]
    assert time.monotonic() - signalled < 20  # sampling the rest (200 tokens, a second each here) takes minutes
    process.wait(timeout=60)
    log = (tmp_path / "log.txt").read_text()
    assert "preempted: stopped by SIGTERM while sampling the built-in sentiment set" in log, log[-3000:]
    built = [f for _, _, files in os.walk(tmp_path / "cache") for f in files if "sentiment" in f]
    assert built == [], built
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


# Each launcher with each signal (how it is passed on differs); the engines behind torchrun's agent (DDP, ZeRO-2, FSDP2)
# differ only in the checkpoint they write, so DDP takes both signals and the others one each.
LAUNCHES_AND_SIGNALS = [(launch, sig) for launch in LAUNCH_FORMS for sig in SIGNALS
                        if (launch, sig.name) not in (("accelerate-zero2", "SIGTERM"), ("accelerate-fsdp2", "SIGUSR1"))]


@pytest.mark.multiprocess
@pytest.mark.parametrize("launch, sig", LAUNCHES_AND_SIGNALS, ids=[f"{l}-{s.name}" for l, s in LAUNCHES_AND_SIGNALS])
def test_a_signal_to_what_we_started_checkpoints_and_stops(launch, sig, tiny_model_dir, data_file, tmp_path):
    """Signalled after step 2 of 8 (no checkpoint due): the current step ends, checkpoint-N is written for the step
    the processes agreed on, nothing trains past it, and every trainer exits with 75."""
    process = start(launch, tmp_path, "step:2", tiny_model_dir, data_file, **{
        "train.max_steps": 8, "train.per_device_batch_size": 4 if LAUNCH_FORMS[launch][1] == 2 else 8})
    signal_when_reached(process, tmp_path, sig)
    statuses = wait_for_trainers(tmp_path, LAUNCH_FORMS[launch][1])
    process.wait(timeout=60)
    log = (tmp_path / "log.txt").read_text()
    assert statuses == [PREEMPTED_EXIT_CODE] * LAUNCH_FORMS[launch][1], log[-3000:]
    records = read_metrics(str(tmp_path / "out" / "metrics.jsonl"))
    last = records[-1]["step"]
    assert 2 <= last < 8, log[-3000:]
    assert (tmp_path / "out" / f"checkpoint-{last}" / "trainer_state.json").exists()
    assert "preempted: stopped by" in log and f"after step {last}" in log
    if launch == "python":
        assert process.returncode == PREEMPTED_EXIT_CODE


@pytest.mark.slow
@pytest.mark.parametrize("launch", ["python", "accelerate"])
def test_a_signal_during_the_reference_precompute_stops_cleanly(launch, tiny_model_dir, data_file, tmp_path):
    """SIGUSR1 while the reference log-probs are computed (before any step): a clean stop at the next batch, with a
    message and the requeue status, nothing trained, nothing cached half-done; the same command then trains."""
    extra = {"train.max_steps": 2, "train.eval_batch_size": 4}
    process = start(launch, tmp_path, "reference:2", tiny_model_dir, data_file, **extra)
    signal_when_reached(process, tmp_path, signal.SIGUSR1)
    assert wait_for_trainers(tmp_path, 1) == [PREEMPTED_EXIT_CODE]
    process.wait(timeout=60)
    log = (tmp_path / "log.txt").read_text()
    assert "preempted: stopped by" in log and "while computing reference log-probs (batch" in log, log[-3000:]
    out = tmp_path / "out"
    assert not (out / "metrics.jsonl").exists() or not read_metrics(str(out / "metrics.jsonl"))
    assert not os.path.exists(str(out) + "-refcache") or not os.listdir(str(out) + "-refcache")
    again = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"),
                            *overrides(tiny_model_dir, data_file, out, **extra)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2]


@pytest.mark.multiprocess
def test_a_rank_stuck_in_a_collective_exits_within_the_grace_period(tiny_model_dir, data_file, tmp_path):
    """Rank 1 hangs before step 3, so rank 0 blocks in step 3's gradient all-reduce, inside gloo, where Python never
    runs its signal handler. SIGTERM to both: each exits within train.stop_grace_s (5 s) with status 124 and says
    why, long before the collective timeout (600 s here)."""
    process = start("accelerate-ddp", tmp_path, "stuck:2", tiny_model_dir, data_file, **{
        "train.max_steps": 8, "train.per_device_batch_size": 4, "train.stop_grace_s": 5,
        "train.collective_timeout_s": 600})
    deadline = time.monotonic() + 300
    while not (tmp_path / "reached").exists():
        assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
        time.sleep(0.2)
    time.sleep(3)  # rank 0 is in step 3's collective by now
    signalled = time.monotonic()
    for rank in (0, 1):
        os.kill(int((tmp_path / f"pid-{rank}").read_text()), signal.SIGTERM)
    statuses = wait_for_trainers(tmp_path, 2, timeout=90)
    assert time.monotonic() - signalled < 60
    log = (tmp_path / "log.txt").read_text()
    assert statuses == [124, 124], log[-3000:]
    assert log.count("has not reached a step boundary since") == 2, log[-3000:]
    process.kill()
    process.wait(timeout=60)



STAND_IN_LAUNCHER = """
import subprocess, sys
print("launcher: started", file=sys.stderr, flush=True)
# accelerate launch (one process) as far as output goes: from 1.16 the trainer's stderr read through a pipe and
# copied out, before that passed on; SIGUSR1 kills it either way
child = subprocess.Popen([sys.executable, *sys.argv[1:]], stderr=subprocess.PIPE if PIPES else None)
if PIPES:
    while chunk := child.stderr.read1(8192):
        sys.stderr.buffer.write(chunk)
        sys.stderr.flush()
child.wait()
"""

TRAINER = """
import os, sys, time
from dpo_dist.train.preemption import StopSignals, stop_with_launcher

assert stop_with_launcher()  # the stand-in counts as a launcher: "accelerate" is in its command line
stops = StopSignals()
print("trainer: before", file=sys.stderr, flush=True)
open(os.path.join(sys.argv[1], "ready"), "w").close()
while stops.received is None:  # the launcher's death arrives as SIGTERM
    time.sleep(0.05)
print(f"trainer: after the launcher died ({stops.received.name})", file=sys.stderr, flush=True)
open(os.path.join(sys.argv[1], "done"), "w").close()
"""


@pytest.mark.parametrize("pipes", [True, False], ids=["launcher-pipes-stderr", "launcher-passes-stderr-on"])
def test_the_trainer_writes_where_its_launcher_wrote_once_it_is_gone(pipes, tmp_path):
    """accelerate 1.16's one-process launcher pipes the trainer's stderr, and dies of SIGUSR1 at once: the trainer's
    lines after that went into a pipe nobody read (lost, and EPIPE failed the stop). Once the launcher is gone the
    trainer writes to the launcher's own stderr, after what was written there (the file is opened without append, as
    a shell's `>` does, so writing beside a living launcher would have overwritten lines); where the launcher passes
    its stderr on (1.15 and earlier) the trainer writes there all along."""
    launcher = tmp_path / "accelerate_stand_in.py"
    launcher.write_text(f"PIPES = {pipes}\n" + STAND_IN_LAUNCHER)
    trainer = tmp_path / "trainer.py"
    trainer.write_text(TRAINER)
    log = tmp_path / "launcher.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([sys.executable, str(launcher), str(trainer), str(tmp_path)], stderr=handle,
                                   cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "ready").exists():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    process.send_signal(signal.SIGUSR1)  # the launcher dies of it; the trainer is orphaned
    process.wait(timeout=30)
    while not (tmp_path / "done").exists():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    assert log.read_text().splitlines() == ["launcher: started", "trainer: before",
                                            "trainer: after the launcher died (SIGTERM)"], log.read_text()


@pytest.mark.slow
def test_a_stop_whose_output_reader_is_gone_still_exits_75(tiny_model_dir, data_file, tmp_path):
    """stderr is a pipe whose reader closes it during the run (a dead launcher or pager that this process was not
    moved away from): the trainer still checkpoints and exits with 75, not 1 from a failed write of its last line
    nor 120 from the interpreter's flush at exit."""
    args = [SCRIPT, str(tmp_path), "step:2", *overrides(tiny_model_dir, data_file, tmp_path / "out",
                                                             **{"train.max_steps": 8})]
    process = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while not (tmp_path / "reached").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    process.stderr.close()  # whatever the trainer writes from now on fails with EPIPE
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == PREEMPTED_EXIT_CODE
    assert (tmp_path / "status-0").read_text() == str(PREEMPTED_EXIT_CODE)
    last = read_metrics(str(tmp_path / "out" / "metrics.jsonl"))[-1]["step"]
    assert (tmp_path / "out" / f"checkpoint-{last}" / "trainer_state.json").exists()
