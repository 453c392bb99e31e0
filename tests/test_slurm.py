"""slurm/dpo.sbatch on a real SLURM cluster run here (slurm/local_cluster.sh: slurmctld and two slurmd nodes on this
machine): 2-node training, the single-GPU QLoRA script, preemption by signal and by requeue, and a killed rank."""

import os
import re
import signal
import subprocess
import time

import pytest

from training import (ROOT, assert_same_trajectory, command_lines, overrides, prompt_rows, read_jsonl,
                      reset_accelerate_state, rounds_overrides, run)

pytestmark = pytest.mark.slurm
TRAINING = {"lora.enabled": False, "train.per_device_batch_size": 4, "train.eval_every": 5}
LONG = {**TRAINING, "train.max_steps": 80, "train.eval_every": 40}  # long enough to be preempted mid-run
LONG_LORA = {**LONG, "lora.enabled": True}  # the default setup


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slurm")
    script = os.path.join(ROOT, "slurm", "local_cluster.sh")
    result = subprocess.run(["bash", script, "up", str(folder)], capture_output=True, text=True, timeout=600)
    if result.returncode == 3:
        pytest.skip(f"no SLURM cluster here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr[-3000:]
    env = dict(os.environ, SLURM_CONF=str(folder / "slurm.conf"))
    yield env
    subprocess.run(["bash", script, "down", str(folder)], capture_output=True, timeout=120)


# The states of a job that has ended (squeue(1), JOB STATE CODES)
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def submit(env, log, *args, wait=False, script="dpo.sbatch", options=()):
    """sbatch the script; with ``wait``, return once the job has ended, its exit status as the result's returncode.
    (Not ``sbatch --wait``: that polls after 2, 10, 42 s and then every 32 s, so a 10 s job took 42.)"""
    command = ["sbatch", "--parsable", f"--output={log}", f"--chdir={ROOT}", *options,
               os.path.join(ROOT, "slurm", script), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    job = result.stdout.strip().split(";")[0]
    if wait and result.returncode == 0:
        fields = wait_for(lambda: ended(env, job), 900, f"job {job} to end")
        status, by_signal = (int(part) for part in fields["ExitCode"].split(":"))
        result.returncode = 128 + by_signal if by_signal else status
    return result, job


def ended(env, job):
    """``scontrol show job``'s fields once the job has ended, else None."""
    fields = job_fields(env, job)
    return fields if fields.get("JobState") in ENDED else None


def job_fields(env, job):
    """``scontrol show job``'s fields as a dict."""
    out = subprocess.run(["scontrol", "show", "job", job, "-o"], capture_output=True, text=True, env=env).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def job_state(env, job):
    """(state, restarts). SLURM holds a requeued job back for 2 minutes (Reason=BeginTime); that wait is lifted here,
    as an admin would with ``scontrol update``, to keep the test short."""
    fields = job_fields(env, job)
    if fields.get("JobState") == "PENDING" and fields.get("Reason") == "BeginTime":
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True, env=env)
    return fields.get("JobState"), int(fields.get("Restarts", 0))


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def steps_written(out):
    path = out / "metrics.jsonl"
    return len(read_jsonl(path)) if path.exists() else 0


def trainer_pids(out, rank):
    """PIDs of the trainer processes writing to ``out`` with the given global rank."""
    pids = []
    for pid, cmdline in command_lines():
        if any(arg.endswith(b"launch/train.py") for arg in cmdline[:3]) and f"train.output_dir={out}".encode() in cmdline:
            try:
                environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            except OSError:  # gone already
                continue
            if f"RANK={rank}".encode() in environ:
                pids.append(pid)
    return pids


@pytest.fixture(scope="module")
def single(tiny_model_dir, data_file, tmp_path_factory):
    """What one process computes: the 2-node run must write the same trajectory."""
    folder = tmp_path_factory.mktemp("single") / "out"
    records = run(tiny_model_dir, data_file, folder, **{**TRAINING, "train.max_steps": 5, "train.per_device_batch_size": 8})
    reset_accelerate_state()
    return records["records"]


def assert_quiet_log(log):
    """What a job's .out must not hold: a traceback (torchrun's SignalException at every preemption), the tied-weights
    notice of every checkpoint, a carriage-return progress bar, a notice or warning repeated by every process; and
    node 1 says nothing beyond its node line and its launcher's stop line (rank 0 speaks for the job)."""
    assert "Traceback" not in log and "SignalException" not in log, log[-4000:]
    assert "Removed shared tensor" not in log and "\r" not in log
    for restart in re.split(r"^dpo\.sbatch: job \d+ \(restart \d+\)", log, flags=re.M):  # each start says it once
        assert restart.count("FutureWarning") <= 1 and restart.count("Setting accelerator to CPU") <= 1, restart
    node1 = [line for line in log.splitlines() if line.startswith("1: ")]  # its node line, its launcher's stop line
    assert node1 and all(line.startswith(("1: node n2: machine rank 1 of 2", "1: accelerate_launch: n2: "))
                         for line in node1), node1


def run_uninterrupted(cluster, tiny_model_dir, data_file, folder, settings):
    result, _ = submit(cluster, folder / "job.log", *overrides(tiny_model_dir, data_file, folder / "out", **settings),
                       wait=True)
    assert result.returncode == 0, (folder / "job.log").read_text()[-4000:]
    return read_jsonl(folder / "out" / "metrics.jsonl")


@pytest.fixture(scope="module")
def uninterrupted(cluster, tiny_model_dir, data_file, tmp_path_factory):
    """The long 2-node run, not interrupted: a preempted and resumed job must repeat it exactly."""
    return run_uninterrupted(cluster, tiny_model_dir, data_file, tmp_path_factory.mktemp("uninterrupted"), LONG)


@pytest.fixture(scope="module")
def uninterrupted_lora(cluster, tiny_model_dir, data_file, tmp_path_factory):
    """The same with LoRA, the default."""
    return run_uninterrupted(cluster, tiny_model_dir, data_file, tmp_path_factory.mktemp("uninterrupted-lora"), LONG_LORA)


def preempt_and_finish(how, cluster, tiny_model_dir, data_file, tmp_path, settings, nodes=2):
    """Submit the long job, preempt it after its first steps, wait until the requeued job has finished (on ``nodes``
    nodes: fewer is set on the pending job, as an admin would); its records."""
    out = tmp_path / "out"
    result, job = submit(cluster, tmp_path / "job.log", *overrides(tiny_model_dir, data_file, out, **settings))
    assert result.returncode == 0, result.stderr
    wait_for(lambda: steps_written(out) >= 3, 300, "the first training steps")
    if how == "scontrol-requeue" and nodes != 2:  # held, given fewer nodes (and tasks and CPUs to match), released
        subprocess.run(["scontrol", "requeuehold", job], check=True, env=cluster)
        wait_for(lambda: job_fields(cluster, job).get("JobState") == "PENDING", 120, "the job to be requeued")
        subprocess.run(["scontrol", "update", f"JobId={job}", f"NumNodes={nodes}-{nodes}", f"NumTasks={nodes}",
                        f"NumCPUs={nodes}"], check=True, env=cluster)
        subprocess.run(["scontrol", "release", job], check=True, env=cluster)
    elif how == "scontrol-requeue":
        subprocess.run(["scontrol", "requeue", job], check=True, env=cluster)
    else:
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, env=cluster)
    wait_for(lambda: job_state(cluster, job) == ("COMPLETED", 1), 600, "the requeued job to finish")
    log = (tmp_path / "job.log").read_text()
    assert "preempted: stopped by" in log and "resumed from" in log, log[-4000:]
    assert log.count("preempted: stopped by") == 1, log[-4000:]  # rank 0's line; the other rank stops silently
    assert_quiet_log(log)
    if how != "scontrol-requeue":  # each node's launcher says it in a line (SIGTERM may end the step before it)
        assert "accelerate_launch: n1: SIGUSR1" in log and "accelerate_launch: n2: SIGUSR1" in log, log[-4000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, settings["train.max_steps"] + 1))
    return records


@pytest.mark.parametrize("accel_config", ["ddp", "fsdp"])
def test_two_nodes_train_like_one_process(accel_config, cluster, single, tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    result, job = submit(cluster, tmp_path / "job.log", *overrides(tiny_model_dir, data_file, out, **TRAINING,
                                                                   **{"train.max_steps": 5, "train.progress_bar": True}),
                         wait=True, options=(f"--export=ALL,ACCEL_CONFIG=accelerate_configs/{accel_config}.yaml",))
    log = (tmp_path / "job.log").read_text()
    assert result.returncode == 0, log[-4000:]
    assert_quiet_log(log)  # the final state is a checkpoint of the tied model: no tied-weights notice
    # each node has 1 CPU (local_cluster.sh), not the machine's: 1 thread, not one per machine CPU
    assert "1 CPU threads each (1 CPUs from SLURM_CPUS_ON_NODE=1 / 1 processes on this machine)" in log
    progress = [line for line in log.splitlines() if re.match(r"\d+: DPO\b", line)]  # lines, no bar; node 0's only
    assert progress and all(line.startswith("0: DPO ") for line in progress), progress  # "DPO:" would be a bar
    assert progress[-1].startswith("0: DPO 5/5 steps (100%), loss "), progress
    assert f"; accelerate_configs/{accel_config}.yaml" in log
    if accel_config == "fsdp":  # sharded over the two nodes' processes
        assert "FSDP2: parameters, gradients and optimizer state sharded over 2 processes" in log
    assert "machine rank 0 of 2, 1 processes" in log and "machine rank 1 of 2, 1 processes" in log
    assert "4 per device x 1 accumulation x 2 processes" in log
    assert_same_trajectory(single, read_jsonl(out / "metrics.jsonl"), atol=1e-5)
    assert os.path.isdir(out / "model")


def test_single_gpu_qlora_job(cluster, tiny_model_dir, data_file, tmp_path):
    """slurm/qlora.sbatch (one node, one GPU, accelerate_configs/single_gpu_qlora.yaml); the test cluster has no
    GPUs, so it is submitted with --gpus-per-node=0 and trains the 4-bit base on the CPU."""
    out = tmp_path / "out"
    args = overrides(tiny_model_dir, data_file, out, **{"model.quantization": "4bit", "lora.enabled": True,
                                                        "train.max_steps": 2})
    result, _ = submit(cluster, tmp_path / "job.log", *args, wait=True, script="qlora.sbatch",
                       options=("--gpus-per-node=0", "--export=ALL,RECIPE="))
    log = (tmp_path / "job.log").read_text()
    assert result.returncode == 0, log[-4000:]
    assert "accelerate_configs/single_gpu_qlora.yaml" in log and "machine rank 0 of 1, 1 processes" in log
    assert "Traceback" not in log and log.count("FutureWarning") <= 1, log[-4000:]
    assert len(read_jsonl(out / "metrics.jsonl")) == 2


def test_preempted_lora_job_resumes_and_finishes_the_same(cluster, uninterrupted_lora, tiny_model_dir, data_file,
                                                          tmp_path):
    """The default setup, LoRA over DDP on 2 nodes, warned by SIGUSR1 to the batch shell (what --signal=B:USR1@300
    sends before the time limit): the trainers checkpoint the step they are in (the adapter only) and stop, the job
    requeues itself and resumes, and the final metrics are those of an uninterrupted run."""
    from safetensors import safe_open

    records = preempt_and_finish("usr1-before-time-limit", cluster, tiny_model_dir, data_file, tmp_path, LONG_LORA)
    assert_same_trajectory(uninterrupted_lora, records, atol=1e-6)
    (checkpoint,) = [n for n in os.listdir(tmp_path / "out") if n.startswith("checkpoint-")]
    with safe_open(str(tmp_path / "out" / checkpoint / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names), names[:5]


def test_a_job_requeued_on_fewer_nodes_continues_the_run(cluster, uninterrupted, tiny_model_dir, data_file, tmp_path):
    """Full fine-tuning on 2 nodes, requeued (``scontrol requeue``: SIGTERM to every process, then back in the queue)
    and given back one node, as a cluster short of nodes after a preemption does: the resumed job keeps the global
    batch with twice the accumulation and continues the uninterrupted 2-node run's losses."""
    records = preempt_and_finish("scontrol-requeue", cluster, tiny_model_dir, data_file, tmp_path, LONG, nodes=1)
    assert_same_trajectory(uninterrupted, records, atol=1e-5)
    log = (tmp_path / "job.log").read_text()
    assert "node n1: machine rank 0 of 1" in log, log[-4000:]
    assert "train.gradient_accumulation_steps 1 -> 2, to keep" in log, log[-4000:]


def test_a_killed_rank_fails_the_whole_job_quickly(cluster, tiny_model_dir, data_file, tmp_path):
    out = tmp_path / "out"
    result, job = submit(cluster, tmp_path / "job.log", *overrides(tiny_model_dir, data_file, out, **{
        **LONG, "train.max_steps": 10_000, "train.collective_timeout_s": 60}))
    assert result.returncode == 0, result.stderr
    wait_for(lambda: steps_written(out) >= 2, 300, "the first training steps")
    (pid,) = wait_for(lambda: trainer_pids(out, 1), 30, "the rank-1 trainer")
    os.kill(pid, signal.SIGKILL)  # the job must fail within 60 s (measured: about 2 s), not hang in a collective
    wait_for(lambda: job_state(cluster, job)[0] in ("FAILED", "CANCELLED", "NODE_FAIL"), 60, "the job to fail")
    assert job_state(cluster, job)[1] == 0, "a failure is not a preemption: no requeue"
    assert not trainer_pids(out, 0), "rank 0 does not hang on"


def test_a_job_requeued_in_the_middle_of_a_round_completes_all_rounds(cluster, tiny_model_dir, tmp_path):
    """Iterative rounds on 2 nodes (LoRA over DDP), requeued (SIGTERM to every process) once round 2 has begun: the
    requeued job takes what round 2 had written, finishes it, and writes both rounds and the model."""
    out = tmp_path / "out"
    prompts = prompt_rows(tmp_path / "prompts.jsonl")
    settings = {"rounds.steps_per_round": 30, "train.per_device_batch_size": 2}  # long enough to be caught in round 2
    result, job = submit(cluster, tmp_path / "job.log", *rounds_overrides(tiny_model_dir, prompts, out, **settings))
    assert result.returncode == 0, result.stderr
    wait_for(lambda: (out / "round-2" / "plan.json").exists(), 300, "round 2 to begin")
    subprocess.run(["scontrol", "requeue", job], check=True, env=cluster)
    wait_for(lambda: job_state(cluster, job) == ("COMPLETED", 1), 600, "the requeued job to finish")
    log = (tmp_path / "job.log").read_text()
    assert log.count("preempted: stopped by") == 1, log[-4000:]  # rank 0's line, in a stage of round 2 or a step
    assert re.search(r"preempted: stopped by \S+ (in round 2,|after step (3[1-9]|[45]\d))", log), log[-4000:]
    assert [line["round"] for line in read_jsonl(out / "rounds.jsonl")] == [1, 2], log[-4000:]
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 61)) and records[-1]["round"] == 2
    assert os.path.isdir(out / "model") and "Traceback" not in log
