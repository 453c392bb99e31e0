"""FSDP2 (accelerate, ``fsdp_version: 2``) on 2 CPU processes computes what one process without sharding computes."""

import functools
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from dpo_dist.config import load_config
from dpo_dist.train.checks import TrainingError, check_combination
from training import (ROOT, STEPS, accelerate_launch, assert_same_reference_caches, assert_same_trajectory, copy_run,
                      free_port, overrides, read_jsonl)

SHARDED = "FSDP2: parameters, gradients and optimizer state sharded over 2 processes"


def launch_fsdp(tiny_model_dir, data_file, out, *, config="fsdp", launch_args=(), check=True, **extra):
    command = accelerate_launch("--config_file", os.path.join(ROOT, "accelerate_configs", f"{config}.yaml"),
                                *launch_args, "--num_processes", "2", os.path.join(ROOT, "launch", "train.py"))
    command += overrides(tiny_model_dir, data_file, out, **{"train.per_device_batch_size": 4, **extra})
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    if check:
        assert result.returncode == 0, result.stderr[-4000:]
        assert "4 per device x 1 accumulation x 2 processes" in result.stdout
        assert SHARDED in result.stdout, result.stdout[-2000:]
    return result


def held_state(folder):
    with open(os.path.join(folder, "peak_memory.json")) as handle:
        return json.load(handle)["per_rank_state_gb"]


def exported_logits(folder, tiny_model_dir, lora):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir if lora else str(folder))
    if lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder))
    with torch.no_grad():
        return model(torch.tensor([[5, 6, 7, 8, 9, 10, 11]])).logits


def sharded_settings(lora):
    """``STEPS`` with checkpoints at steps 2 and 4 and the final one at 5, all kept (the resume test goes back to
    checkpoint-2); LoRA lays attention out segment by segment, as the one process's auto picks."""
    layout = {"train.attention_layout": "segmented"} if lora else {}
    return {**STEPS, "train.save_every": 2, "train.keep_last": 3, "lora.enabled": lora, **layout}


@pytest.fixture(scope="module")
def sharded_run(tiny_model_dir, data_file, tmp_path_factory):
    """The 2-process FSDP2 run of ``STEPS`` (full fine-tuning or LoRA), launched once for the tests that check it:
    ``sharded_run(lora)`` is its launch result and output folder."""
    @functools.cache
    def get(lora):
        out = tmp_path_factory.mktemp(f"fsdp-lora{lora}") / "out"
        return launch_fsdp(tiny_model_dir, data_file, out, **sharded_settings(lora)), out

    return get


@pytest.mark.multiprocess
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_trajectory_equals_one_process(lora, one_process, sharded_run, tiny_model_dir):
    records, single_out = one_process[lora]
    result, out = sharded_run(lora)
    assert "packing: on" in result.stdout, result.stdout[-2000:]  # the LM head runs inside the forward
    assert ("attention: segmented (" in result.stdout) == lora, result.stdout[-2000:]
    assert_same_trajectory(records, read_jsonl(out / "metrics.jsonl"), atol=1e-4)
    # Sharded: each rank holds half the parameters, gradients and AdamW moments one process holds.
    (one,) = held_state(single_out)
    assert held_state(out) == [pytest.approx(one / 2, rel=0.02)] * 2
    # The reference log-probs computed on the sharded model equal the single-process cache, file for file.
    # (Segmented, they are keyed apart from the one process's.)
    assert_same_reference_caches(f"{single_out}-refcache", f"{out}-refcache", same_keys=not lora)
    # The final export (gathered from the shards) gives the single-process model's logits.
    torch.testing.assert_close(exported_logits(out / "model", tiny_model_dir, lora),
                               exported_logits(single_out / "model", tiny_model_dir, lora), atol=1e-5, rtol=1e-5)


@pytest.mark.multiprocess
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fsdp_resume_equals_uninterrupted(lora, sharded_run, tiny_model_dir, data_file, tmp_path):
    """The 5-step run taken back to checkpoint-2 and resumed: steps 3-5 repeat exactly (sharded parameters and
    optimizer state, scheduler, RNG, data position all restored). It is taken back by damaging rank 1's shards of
    checkpoint-5 and -4: each checkpoint's manifest lists every rank's files, and the 2 processes, checking them
    between them, set both aside with a line each and resume from checkpoint-2."""
    from test_checkpoint_manifest import garble, truncate

    from dpo_dist.train.checkpoint import MANIFEST

    _, whole_out = sharded_run(lora)
    out = tmp_path / "out"
    copy_run(whole_out, out)
    whole = read_jsonl(out / "metrics.jsonl")
    checkpoint = out / "checkpoint-2"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # torch.distributed.checkpoint: a file per rank
        assert sorted(os.listdir(checkpoint / part)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    files = {os.path.relpath(os.path.join(folder, name), checkpoint)
             for folder, _, names in os.walk(checkpoint) for name in names} - {MANIFEST}
    manifest = json.loads((checkpoint / MANIFEST).read_text())["files"]
    assert set(manifest) == files and "optimizer_0/__1_0.distcp" in files and "random_states_1.pkl" in files
    truncate(out / "checkpoint-5" / "optimizer_0" / "__1_0.distcp")
    garble(out / "checkpoint-4" / "pytorch_model_fsdp_0" / "__1_0.distcp")
    shutil.rmtree(out / "model")
    result = launch_fsdp(tiny_model_dir, data_file, out, **sharded_settings(lora))
    assert "resumed from" in result.stdout and "checkpoint-2 at step 2" in result.stdout
    assert "checkpoint-5 is damaged: optimizer_0/__1_0.distcp is " in result.stdout, result.stdout[-3000:]
    assert "checkpoint-4 is damaged: pytorch_model_fsdp_0/__1_0.distcp has sha256 " in result.stdout
    assert sorted(os.listdir(out / "damaged")) == ["checkpoint-4", "checkpoint-5"]
    assert_same_trajectory(whole, read_jsonl(out / "metrics.jsonl"), atol=1e-6)


@pytest.mark.multiprocess
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_an_fsdp2_checkpoint_resumed_on_one_process_continues_the_run(lora, sharded_run, tiny_model_dir, data_file,
                                                                     tmp_path, capsys):
    """checkpoint-2 of the 2-process FSDP2 run (each rank's half of the weights, the frozen base included for LoRA,
    and of the AdamW moments: torch.distributed.checkpoint) resumed by one process without FSDP, in this process: the
    shards are read whole, the accumulation recomputed to 2 to keep the global batch of 8, and steps 3-5 are the
    uninterrupted 2-process run's to 1e-5 (without the moments, step 3's update would be AdamW's first, and the losses
    of steps 4-5 off by 5e-3 full, 1.5e-3 LoRA). The checkpoints it writes from there are one process's (the weights,
    or the adapter, in model.safetensors)."""
    from training import reset_accelerate_state, run

    _, whole_out = sharded_run(lora)
    out = tmp_path / "out"
    copy_run(whole_out, out)
    whole = read_jsonl(out / "metrics.jsonl")
    reset_accelerate_state()
    try:
        run(tiny_model_dir, data_file, out, **sharded_settings(lora),
            **{"train.per_device_batch_size": 4, "train.resume": str(out / "checkpoint-2")})
    finally:
        reset_accelerate_state()
    said = capsys.readouterr().out
    assert ("train.gradient_accumulation_steps 1 -> 2, to keep checkpoint-2's global batch: 8 pairs = 4 per device x 2 "
            "accumulation x 1 processes (it was written with 8 pairs = 4 per device x 1 accumulation x 2 processes)"
            in said), said[-3000:]
    assert f"resumed from {out / 'checkpoint-2'} at step 2 (16 pairs seen)" in said
    assert_same_trajectory(whole, read_jsonl(out / "metrics.jsonl"), atol=1e-5)
    assert os.path.isfile(out / "checkpoint-4" / "model.safetensors")
    assert not os.path.exists(out / "checkpoint-4" / "pytorch_model_fsdp_0")


@pytest.mark.multiprocess
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_an_fsdp2_checkpoint_resumed_on_4_fsdp2_processes_continues_the_run(lora, sharded_run, tiny_model_dir,
                                                                             data_file, tmp_path):
    """checkpoint-2 of the 2-process FSDP2 run (full fine-tune, or LoRA: the adapter and its moments sharded with the
    frozen base) resumed by 4 FSDP2 processes with 2 pairs each (the same global batch of 8):
    torch.distributed.checkpoint reshards the weights and AdamW moments from halves into quarters on load, and steps
    3-5 are the uninterrupted 2-process run's to 1e-5."""
    _, whole_out = sharded_run(lora)
    out = tmp_path / "out"
    copy_run(whole_out, out)
    whole = read_jsonl(out / "metrics.jsonl")
    command = accelerate_launch("--config_file", os.path.join(ROOT, "accelerate_configs", "fsdp.yaml"),
                                "--num_processes", "4", os.path.join(ROOT, "launch", "train.py"))
    command += overrides(tiny_model_dir, data_file, out, **{**sharded_settings(lora), "train.per_device_batch_size": 2,
                                                            "train.resume": str(out / "checkpoint-2")})
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert ("resumed checkpoint-2 with its global batch of 8 pairs = 2 per device x 1 accumulation x 4 processes (it "
            "was written with 8 pairs = 4 per device x 1 accumulation x 2 processes)" in result.stdout)
    assert "FSDP2: parameters, gradients and optimizer state sharded over 4 processes" in result.stdout
    assert_same_trajectory(whole, read_jsonl(out / "metrics.jsonl"), atol=1e-5)
    assert len(os.listdir(out / "checkpoint-4" / "optimizer_0")) == 5  # .metadata and a file per rank


@pytest.mark.multiprocess
def test_a_one_process_checkpoint_resumed_under_fsdp2_continues_the_run(tiny_model_dir, data_file, tmp_path):
    """checkpoint-2 of a one-process full fine-tune (8 pairs a step, in this process) resumed by 2 FSDP2 processes
    with 4 pairs each: every rank reads the whole weights and AdamW moments and keeps its shard, and steps 3-5 are
    the uninterrupted one-process run's to 1e-5."""
    from training import reset_accelerate_state, run

    out = tmp_path / "out"
    reset_accelerate_state()
    try:
        run(tiny_model_dir, data_file, out, **sharded_settings(False), **{"train.per_device_batch_size": 8})
    finally:
        reset_accelerate_state()
    whole = read_jsonl(out / "metrics.jsonl")
    result = launch_fsdp(tiny_model_dir, data_file, out, **sharded_settings(False),
                         **{"train.resume": str(out / "checkpoint-2")})
    assert ("resumed checkpoint-2 with its global batch of 8 pairs = 4 per device x 1 accumulation x 2 processes (it "
            "was written with 8 pairs = 8 per device x 1 accumulation x 1 processes)" in result.stdout), \
        result.stdout[-3000:]
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in result.stdout
    assert_same_trajectory(whole, read_jsonl(out / "metrics.jsonl"), atol=1e-5)
    assert sorted(os.listdir(out / "checkpoint-4" / "pytorch_model_fsdp_0")) == [".metadata", "__0_0.distcp",
                                                                                 "__1_0.distcp"]


@pytest.mark.multiprocess
@pytest.mark.parametrize("lora", [False, True], ids=["full-second-sharded-model", "lora-adapters-off"])
def test_fsdp_online_reference_equals_one_process(lora, one_process, tiny_model_dir, data_file, tmp_path):
    """The online reference under FSDP2 (no precompute): the trajectory of the precomputed single-process run."""
    out = tmp_path / "out"
    launch_fsdp(tiny_model_dir, data_file, out, **STEPS, **{"lora.enabled": lora, "reference.mode": "online"})
    assert not os.path.exists(f"{out}-refcache"), "no reference cache in online mode"
    assert_same_trajectory(one_process[lora][0], read_jsonl(out / "metrics.jsonl"), atol=1e-4)


@pytest.mark.multiprocess
def test_fsdp_offload_equals_one_process(one_process, tiny_model_dir, data_file, tmp_path):
    """accelerate_configs/fsdp_offload.yaml (CPUOffloadPolicy: the optimizer step on CPU shards); on a machine
    without an accelerator its memory is not pinned (pinning needs one)."""
    records, single_out = one_process[False]
    out = tmp_path / "out"
    result = launch_fsdp(tiny_model_dir, data_file, out, config="fsdp_offload", **STEPS)
    assert f"{SHARDED} (" in result.stdout and ", offloaded to CPU memory" in result.stdout
    assert_same_trajectory(records, read_jsonl(out / "metrics.jsonl"), atol=1e-4)
    torch.testing.assert_close(exported_logits(out / "model", tiny_model_dir, False),
                               exported_logits(single_out / "model", tiny_model_dir, False), atol=1e-5, rtol=1e-5)


@pytest.mark.multiprocess
def test_fsdp_every_rank_loading_the_checkpoint_equals_one_process(one_process, tiny_model_dir, data_file, tmp_path):
    """fsdp.yaml has only the first process read the checkpoint (the others start on the meta device and get their
    shards from it); with fsdp_cpu_ram_efficient_loading off every process reads it: the same trajectory."""
    out = tmp_path / "out"
    launch_fsdp(tiny_model_dir, data_file, out, launch_args=("--fsdp_cpu_ram_efficient_loading", "false"), **STEPS)
    assert_same_trajectory(one_process[False][0], read_jsonl(out / "metrics.jsonl"), atol=1e-4)


@pytest.mark.multiprocess
def test_fsdp_version_1_is_refused(tiny_model_dir, data_file, tmp_path):
    result = launch_fsdp(tiny_model_dir, data_file, tmp_path / "out", launch_args=("--fsdp_version", "1"),
                         check=False)
    assert result.returncode != 0
    assert "error: the accelerate config asks for FSDP version 1; dpo_dist runs FSDP2 (fully_shard): set fsdp_version: 2" \
           in result.stderr, result.stderr[-3000:]


def test_an_fsdp_config_accelerate_did_not_apply_is_said():
    """``ACCELERATE_USE_FSDP`` set, but the Accelerator has no FSDP: the run says it trains unsharded, on CPU with the
    reason (one process; tested launched in test_fallback.py) and anywhere else without one."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from dpo_dist.distributed import fsdp_summary

    def accelerator(device, processes):
        return SimpleNamespace(device=torch.device(device), num_processes=processes,
                               distributed_type=DistributedType.NO, state=SimpleNamespace(fsdp_plugin=None))

    assert "one CPU process has nothing to shard" in fsdp_summary(None, accelerator("cpu", 1))
    said = fsdp_summary(None, accelerator("meta", 1))
    assert said == "FSDP: not applied: an FSDP config was given, but Accelerate set up no FSDP here; training unsharded"


def test_quantized_base_under_fsdp_is_refused():
    cfg = load_config(None, ["model.quantization=4bit", "lora.enabled=true"])
    with pytest.raises(TrainingError, match="model.quantization=4bit cannot be sharded by FSDP2: launch without an FSDP"):
        check_combination(cfg, 0, 2)
    check_combination(cfg, 0, 0)  # fine unsharded


@pytest.mark.slow
def test_lm_head_of_a_fully_sharded_model_counts_as_sharded_after_a_no_grad_forward(tmp_path):
    """A unit that is not resharded after its forward holds the plain gathered weight from a forward without grad
    until the next backward: the head's weight alone no longer shows the sharding, the model does. (One process
    over gloo, in a subprocess, so this test process never joins a process group.)"""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]
        import torch
        import torch.distributed as dist
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor
        from dpo_dist.train.logprobs import head_is_sharded, output_head
        from tiny import make_llama

        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{free_port()}")
        dist.init_process_group("gloo", rank=0, world_size=1)
        model = make_llama(64)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model, reshard_after_forward=False)  # the root, as Accelerate's: its weights stay gathered
        head = output_head(model)
        print("before", isinstance(head.weight, DTensor), head_is_sharded(head), head_is_sharded(head, model))
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
        print("after", isinstance(head.weight, DTensor), head_is_sharded(head), head_is_sharded(head, model))
        dist.destroy_process_group()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(("before", "after"))]
    assert lines == ["before True True True", "after False False True"]


SAMPLED = {**STEPS, "train.sample_prompts": 2, "train.sample_max_new_tokens": 6, "train.save_every": 5}


@pytest.fixture(scope="module")
def sampled_runs(tiny_model_dir, data_file, tmp_path_factory):
    """A full fine-tune with samples at the evals (steps 2, 4) and the last step (5), on one process and under FSDP2
    on two; each keeps checkpoint-5."""
    from training import reset_accelerate_state, run

    root = tmp_path_factory.mktemp("fsdp-samples")
    reset_accelerate_state()
    records = run(tiny_model_dir, data_file, root / "one", **SAMPLED)["records"]
    reset_accelerate_state()
    launch_fsdp(tiny_model_dir, data_file, root / "fsdp", **SAMPLED)
    return records, root / "one", root / "fsdp"


@pytest.mark.multiprocess
def test_fsdp_samples_equal_one_process(sampled_runs):
    """Under FSDP2 every forward of ``generate`` gathers the sharded weights (a collective): both ranks generate the
    same prompts, ``synced_gpus`` keeps them in step, the main one writes. The greedy completions are the
    one-process run's, token for token (the weights agree to ~1e-6, far from any tie between the top two logits)."""
    records, one, fsdp = sampled_runs
    assert_same_trajectory(records, read_jsonl(fsdp / "metrics.jsonl"), atol=1e-4)
    single, sharded = read_jsonl(one / "samples.jsonl"), read_jsonl(fsdp / "samples.jsonl")
    assert [r["step"] for r in sharded] == [2, 2, 4, 4, 5, 5]
    assert len({r["prompt"] for r in sharded}) == 2 and all(0 < len(r["completion_ids"]) <= 6 for r in sharded)
    assert sharded == single


@pytest.mark.multiprocess
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_an_fsdp_checkpoint_is_pushed_as_one_model_equal_to_the_runs_export(lora, sharded_run, tiny_model_dir,
                                                                          tmp_path, monkeypatch, capsys):
    """launch/push.py on checkpoint-5 of the 2-process FSDP2 run: its torch.distributed.checkpoint shards are read
    whole into one model folder (for LoRA, the adapter), the weights of the run's own final export (model/, gathered
    by the trainer at the same step 5) bit for bit, and that folder is what is uploaded."""
    import huggingface_hub
    from safetensors.torch import load_file

    _, whole_out = sharded_run(lora)
    out = tmp_path / "out"
    copy_run(whole_out, out)
    uploaded = []

    class Hub:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **_):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, **_):
            uploaded.append(folder_path)

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(huggingface_hub, "HfApi", Hub)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "launch"))
    import push

    checkpoint = out / "checkpoint-5"
    assert sorted(os.listdir(checkpoint / "pytorch_model_fsdp_0")) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert push.main([str(checkpoint), "me/x"]) == 0, capsys.readouterr().err
    assert uploaded == [str(checkpoint / "model")]
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    exported, final = load_file(checkpoint / "model" / name), load_file(out / "model" / name)
    if not lora:  # the final export also stores the output layer tied to the embeddings; model.save_pretrained once
        assert set(final) - set(exported) == {"lm_head.weight"}
        assert torch.equal(final.pop("lm_head.weight"), exported["model.embed_tokens.weight"])
    assert sorted(exported) == sorted(final)
    for name, tensor in final.items():
        assert torch.equal(exported[name], tensor), name
    torch.testing.assert_close(exported_logits(checkpoint / "model", tiny_model_dir, lora),
                               exported_logits(out / "model", tiny_model_dir, lora), atol=0, rtol=0)
