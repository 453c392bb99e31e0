"""What a resume on another shape does (dpo_dist/train/shape.py): the same global batch with the accumulation
recomputed and said, or one line naming what would work. The resumed trajectories themselves: test_train.py (DDP
2 -> 1 and 1 -> 2 processes against the uninterrupted runs)."""

import json
import os

import pytest

from dpo_dist.config import load_config
from dpo_dist.train.checkpoint import CheckpointError
from dpo_dist.train.shape import Shape, resume_shape, run_shape


def checkpoint(tmp_path, shape=None, processes=1):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    state = {"global_step": 3, **({"shape": shape.__dict__} if shape else {})}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    for rank in range(processes):
        (folder / f"random_states_{rank}.pkl").write_bytes(b"")
    return str(folder)


def config(batch, accumulation=1, lora=True):
    return load_config(None, [f"train.per_device_batch_size={batch}", f"train.gradient_accumulation_steps={accumulation}",
                              f"lora.enabled={str(lora).lower()}"])


def resumed(tmp_path, saved, cfg, processes, engine=None, accumulation_given=False):
    engine = engine or ("DDP" if processes > 1 else "one process")
    return resume_shape(cfg, run_shape(cfg, processes, engine), checkpoint(tmp_path, saved),
                        accumulation_given=accumulation_given)


def test_fewer_processes_keep_the_global_batch_by_accumulating_and_say_so(tmp_path):
    cfg, said = resumed(tmp_path, Shape(2, 4, 1, "DDP"), config(4), processes=1)
    assert cfg.train.gradient_accumulation_steps == 2 and cfg.train.per_device_batch_size == 4
    assert said == ("train.gradient_accumulation_steps 1 -> 2, to keep checkpoint-3's global batch: 8 pairs = 4 per "
                    "device x 2 accumulation x 1 processes (it was written with 8 pairs = 4 per device x 1 "
                    "accumulation x 2 processes)")


def test_the_same_global_batch_split_otherwise_is_said_and_kept(tmp_path):
    cfg, said = resumed(tmp_path, Shape(1, 8, 1, "one process"), config(4), processes=2)
    assert cfg.train.gradient_accumulation_steps == 1
    assert said.startswith("resumed checkpoint-3 with its global batch of 8 pairs = 4 per device x 1 accumulation x 2")
    (tmp_path / "same").mkdir()
    assert resumed(tmp_path / "same", Shape(1, 8, 1, "one process"), config(8), processes=1) == (config(8), None)


def test_another_global_batch_is_refused_in_one_line_naming_the_options(tmp_path):
    with pytest.raises(CheckpointError) as error:  # batch 4 after batch 2: pairs 8-15 skipped, once
        resumed(tmp_path, Shape(1, 2, 1, "one process"), config(4), processes=1)
    assert str(error.value) == (
        "checkpoint-3 was trained with a global batch of 2 pairs = 2 per device x 1 accumulation x 1 processes; 4 "
        "pairs = 4 per device x 1 accumulation x 1 processes is another, and continuing would change the run's batch "
        "mid-way: set train.per_device_batch_size in [1, 2] with the matching accumulation, or start over with "
        "train.resume=never")


def test_an_accumulation_changed_by_hand_is_not_overridden(tmp_path):
    """The resume changed train.gradient_accumulation_steps against the run's config.yaml: the user's, kept."""
    with pytest.raises(CheckpointError, match=r"set train.gradient_accumulation_steps=1; or train.per_device_batch"):
        resumed(tmp_path, Shape(1, 8, 1, "one process"), config(8, accumulation=2), processes=1,
                accumulation_given=True)


def test_a_second_resume_on_fewer_processes_recomputes_again(tmp_path):
    """A job requeued on 1 node after a 2-node run: its first resume recomputed accumulation 1 -> 2 (config.yaml keeps
    the 1 it was given), and the second, preempted again, meets a checkpoint written with 2 and the same config."""
    cfg, said = resumed(tmp_path, Shape(1, 4, 2, "one process"), config(4), processes=1)
    assert cfg.train.gradient_accumulation_steps == 2 and said.startswith("train.gradient_accumulation_steps 1 -> 2")


def test_three_processes_cannot_split_eight_pairs(tmp_path):
    with pytest.raises(CheckpointError, match=r"8 pairs = 4 per device x 1 accumulation x 2 processes; 12 pairs .*"
                                              r"launch on 1, 2 processes \(train.per_device_batch_size=4\)"):
        resumed(tmp_path, Shape(2, 4, 1, "DDP"), config(4), processes=3)


@pytest.mark.parametrize("saved, now, processes, expected", [
    (Shape(2, 4, 1, "ZeRO-3"), "DDP", 2, "checkpoint-3 was written under ZeRO-3 (2 processes), this launch runs DDP: "
                                        "resume it under ZeRO-3, any process count, or start over with "
                                        "train.resume=never"),
    (Shape(2, 4, 1, "ZeRO-2"), "ZeRO-3", 2, "checkpoint-3 was written under ZeRO-2 (2 processes), this launch runs "
                                            "ZeRO-3: resume it under ZeRO-2, any process count, or start over with "
                                            "train.resume=never"),
])
def test_sharded_checkpoints_resume_on_their_engine(saved, now, processes, expected, tmp_path):
    with pytest.raises(CheckpointError) as error:
        resumed(tmp_path, saved, config(4), processes=processes, engine=now)
    assert str(error.value) == expected


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("engine, saved_processes, processes", [("ZeRO-3", 2, 1), ("ZeRO-2", 1, 2), ("FSDP2", 2, 4)])
def test_sharded_checkpoints_resume_on_another_process_count_keeping_the_global_batch(engine, saved_processes,
                                                                                      processes, lora, tmp_path):
    """DeepSpeed's shards through its universal checkpoint, FSDP2's resharded by torch.distributed.checkpoint (the
    trajectories: test_deepspeed.py, test_fsdp.py)."""
    cfg, said = resumed(tmp_path, Shape(saved_processes, 2, 2 // saved_processes * 2, engine), config(2, lora=lora),
                        processes=processes, engine=engine)
    assert cfg.train.per_device_batch_size * cfg.train.gradient_accumulation_steps * processes == 8, said
    assert said.startswith(("train.gradient_accumulation_steps", "resumed checkpoint-3 with its global batch")), said


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_an_fsdp2_checkpoint_resumes_on_one_process_keeping_the_global_batch(lora, tmp_path):
    """Its shards are read whole (dpo_dist/train/checkpoint.py; the trajectory: test_fsdp.py)."""
    cfg, said = resumed(tmp_path, Shape(2, 4, 1, "FSDP2"), config(4, lora=lora), processes=1)
    assert cfg.train.gradient_accumulation_steps == 2
    assert said.startswith("train.gradient_accumulation_steps 1 -> 2, to keep checkpoint-3's global batch")


@pytest.mark.parametrize("now, processes, lora, expected", [
    ("DDP", 2, False, "checkpoint-3 was written under FSDP2 (2 processes), this launch runs DDP: resume it under "
                      "FSDP2 on any process count, or on one process (launched without FSDP), or start over with "
                      "train.resume=never"),
    ("DDP", 2, True, "checkpoint-3 was written under FSDP2 (2 processes), this launch runs DDP: resume it under "
                     "FSDP2 on any process count, or on one process (launched without FSDP), or start over with "
                     "train.resume=never"),
])
def test_what_an_fsdp2_checkpoint_does_not_resume_on_is_refused_naming_what_does(now, processes, lora, expected,
                                                                                   tmp_path):
    with pytest.raises(CheckpointError) as error:
        resumed(tmp_path, Shape(2, 4, 1, "FSDP2"), config(4, lora=lora), processes=processes, engine=now)
    assert str(error.value) == expected


def test_a_full_fine_tunes_fsdp2_checkpoint_resumes_on_another_fsdp2_process_count(tmp_path):
    """Resharded on load by torch.distributed.checkpoint (the trajectory: test_fsdp.py, 2 -> 4 processes)."""
    cfg, said = resumed(tmp_path, Shape(2, 4, 1, "FSDP2"), config(2, lora=False), processes=4, engine="FSDP2")
    assert cfg.train.gradient_accumulation_steps == 1 and said.startswith("resumed checkpoint-3 with its global batch")


def test_a_one_process_full_fine_tune_resumes_under_fsdp2_a_lora_or_ddp_one_does_not(tmp_path):
    """Sharded on load (dpo_dist/train/checkpoint.py; the trajectory: test_fsdp.py); an adapter-only checkpoint, or
    DDP's, is not shown to."""
    assert resumed(tmp_path, Shape(1, 8, 1, "one process"), config(4, lora=False), processes=2, engine="FSDP2")[1] \
        .startswith("resumed checkpoint-3 with its global batch of 8 pairs = 4 per device x 1 accumulation x 2")
    for name, saved, lora, said in (("lora", Shape(1, 8, 1, "one process"), True, "one process (1 processes)"),
                                    ("ddp", Shape(2, 4, 1, "DDP"), False, "DDP (2 processes)")):
        (tmp_path / name).mkdir()
        with pytest.raises(CheckpointError) as error:
            resumed(tmp_path / name, saved, config(4, lora=lora), processes=2, engine="FSDP2")
        assert str(error.value) == (f"checkpoint-3 was written under {said}, this launch runs FSDP2: resume it on one "
                                    "process or DDP, any process count, or start over with train.resume=never")


def test_a_checkpoint_from_before_shapes_were_recorded_resumes_on_its_process_count_only(tmp_path):
    path = checkpoint(tmp_path, processes=2)
    cfg = config(4)
    assert resume_shape(cfg, run_shape(cfg, 2, "DDP"), path) == (cfg, None)
    with pytest.raises(CheckpointError, match="^checkpoint-3 was written by 2 processes before checkpoints recorded "
                                              "their batch split: resume it on 2 processes, or start over"):
        resume_shape(cfg, run_shape(cfg, 1, "one process"), path)
    assert os.path.basename(path) == "checkpoint-3"
