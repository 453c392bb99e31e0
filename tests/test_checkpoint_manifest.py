"""Checkpoints that prove they are whole: ``manifest.json`` lists every file with its size and SHA-256; a resume checks
the newest checkpoint against it and, when it is damaged, says what is wrong in one line, moves it to ``damaged/`` and
resumes from the newest good one. (Every rank's shards are covered: tests/test_fsdp.py's resume test.)"""

import hashlib
import json
import os
import shutil

import pytest

from dpo_dist.train.checkpoint import (DAMAGED, MANIFEST, CheckpointError, list_checkpoints, resume_point,
                                       write_manifest)
from training import assert_same_trajectory, read_jsonl, reset_accelerate_state, run

SETTINGS = {"lora.enabled": False, "train.per_device_batch_size": 8, "train.max_steps": 6, "train.save_every": 1,
            "train.keep_last": 6}


def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def garble(path):
    """The same size, 64 bytes in the middle changed (a bad sector, a copy over a flaky link)."""
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    open(path, "wb").write(bytes(data))


# what goes wrong with a checkpoint -> (how, the line's fragment); checkpoint-6 gets the first, -5 the second, ...
DAMAGE = [
    ("truncated model.safetensors", lambda c: truncate(c / "model.safetensors"),
     r"model\.safetensors is \d+ bytes, the manifest says \d+"),
    ("garbage bytes in model.safetensors", lambda c: garble(c / "model.safetensors"),
     r"model\.safetensors has sha256 [0-9a-f]{12}\.\.\., the manifest says [0-9a-f]{12}\.\.\. \(the same size: its "
     r"bytes changed\)"),
    ("truncated optimizer.bin", lambda c: truncate(c / "optimizer.bin"),
     r"optimizer\.bin is \d+ bytes, the manifest says \d+"),
    ("empty trainer_state.json", lambda c: truncate(c / "trainer_state.json", 0),
     r"trainer_state\.json is 0 bytes, the manifest says \d+"),
    ("no manifest (a save or copy that did not finish)", lambda c: os.remove(c / MANIFEST),
     r"manifest\.json is missing, though trainer_state\.json says one was written \(a save or a copy that did not "
     r"finish\)"),
]


@pytest.mark.slow
def test_each_damaged_checkpoint_is_named_set_aside_and_the_run_resumes_from_the_newest_good_one(
        tiny_model_dir, data_file, tmp_path, capsys):
    """A 6-step run checkpointing every step; checkpoints 6 to 2 then damaged each another way (``DAMAGE``). The same
    command names each in one line (the file, expected and found), moves them to damaged/, resumes from
    checkpoint-1 and repeats the uninterrupted run's steps 2-6 exactly. Before manifests: a truncated
    model.safetensors was a SafetensorError traceback, garbage bytes loaded silently (the run later stopped on
    "non-finite loss", blaming divergence), a truncated optimizer.bin said "written by another model", an empty
    trainer_state.json was a JSONDecodeError traceback."""
    out = tmp_path / "out"
    whole = run(tiny_model_dir, data_file, out, **SETTINGS)["records"]
    reset_accelerate_state()
    assert [step for step, _ in list_checkpoints(str(out))] == [1, 2, 3, 4, 5, 6]
    for step, (_, damage, _) in zip((6, 5, 4, 3, 2), DAMAGE):
        damage(out / f"checkpoint-{step}")
    shutil.rmtree(out / "model")
    capsys.readouterr()
    resumed = run(tiny_model_dir, data_file, out, **SETTINGS)["records"]
    reset_accelerate_state()
    log = capsys.readouterr().out
    lines = [line for line in log.splitlines() if " is damaged: " in line]
    assert len(lines) == 5, log[-3000:]
    import re

    for step, line, (what, _, said) in zip((6, 5, 4, 3, 2), lines, DAMAGE):
        assert re.fullmatch(rf"checkpoint-{step} is damaged: {said}; moved to {re.escape(str(out / DAMAGED))}/, "
                            r"resuming from checkpoint-1 instead", line), (what, line)
    assert "checkpoint-1 at step 1" in log
    assert sorted(os.listdir(out / DAMAGED)) == [f"checkpoint-{s}" for s in (2, 3, 4, 5, 6)]
    assert_same_trajectory(whole, resumed, atol=1e-6)
    assert (out / "model").is_dir()


@pytest.fixture
def accelerator():
    from accelerate import Accelerator

    yield Accelerator(cpu=True)
    reset_accelerate_state()


def fake_checkpoint(out, step, *, manifest=True, accelerator=None):
    """A checkpoint folder as save_checkpoint leaves it, with made-up files (one in a subfolder, as a rank's shard)."""
    folder = out / f"checkpoint-{step}"
    (folder / "pytorch_model_fsdp_0").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(3000))
    (folder / "pytorch_model_fsdp_0" / "__1_0.distcp").write_bytes(os.urandom(500))
    state = {"global_step": step, "best_metric": None, "best_checkpoint": None, "evals_without_improvement": 0}
    (folder / "trainer_state.json").write_text(json.dumps({**state, "manifest": MANIFEST} if manifest else state))
    if manifest:
        write_manifest(accelerator, str(folder))
    return folder


def test_the_manifest_lists_every_file_with_its_size_and_sha256(accelerator, tmp_path):
    """Every file under the checkpoint, subfolders included (a rank's shards), the manifest itself left out, with
    what ``sha256sum`` prints for it; written atomically (no .tmp left)."""
    folder = fake_checkpoint(tmp_path, 3, accelerator=accelerator)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["checksum"] == "sha256"
    assert sorted(manifest["files"]) == ["model.safetensors", "pytorch_model_fsdp_0/__1_0.distcp", "trainer_state.json"]
    for name, described in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert described == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert sorted(os.listdir(folder)) == [MANIFEST, "model.safetensors", "pytorch_model_fsdp_0", "trainer_state.json"]


def test_a_checkpoint_from_before_manifests_is_resumed_with_a_line_saying_it_is_unchecked(accelerator, tmp_path,
                                                                                          capsys):
    """No manifest and a state file that does not mention one: written before this check existed. It is what the user
    has, so it is resumed, unchecked, and the log says so (a missing manifest where the state file says one was
    written is damage: the slow test above)."""
    fake_checkpoint(tmp_path, 2, manifest=True, accelerator=accelerator)
    old = fake_checkpoint(tmp_path, 4, manifest=False)
    assert resume_point(accelerator, str(tmp_path), "auto") == str(old)
    assert capsys.readouterr().out == (f"{old} has no manifest.json (written before checkpoints recorded their files): "
                                       "resuming from it without checking it\n")
    assert not (tmp_path / DAMAGED).exists()
    assert resume_point(accelerator, str(tmp_path), str(old)) == str(old)  # named in train.resume: the same
    assert "without checking it" in capsys.readouterr().out


def test_a_damaged_shard_in_a_subfolder_falls_back_and_one_named_in_train_resume_is_an_error(accelerator, tmp_path,
                                                                                            capsys):
    good = fake_checkpoint(tmp_path, 2, accelerator=accelerator)
    bad = fake_checkpoint(tmp_path, 4, accelerator=accelerator)
    os.remove(bad / "pytorch_model_fsdp_0" / "__1_0.distcp")
    garble(bad / "model.safetensors")
    with pytest.raises(CheckpointError) as raised:
        resume_point(accelerator, str(tmp_path), str(bad))
    assert str(raised.value) == (f"{bad} is damaged: model.safetensors has sha256 "
                                 f"{hashlib.sha256((bad / 'model.safetensors').read_bytes()).hexdigest()[:12]}..., the "
                                 f"manifest says {json.loads((bad / MANIFEST).read_text())['files']['model.safetensors']['sha256'][:12]}"
                                 "... (the same size: its bytes changed) (and 1 more file); give another checkpoint in "
                                 "train.resume, or train.resume=auto for the newest good one")
    assert bad.is_dir(), "a checkpoint named in train.resume is left where it is"
    assert resume_point(accelerator, str(tmp_path), "auto") == str(good)
    assert "checkpoint-4 is damaged: model.safetensors has sha256" in capsys.readouterr().out
    assert os.listdir(tmp_path / DAMAGED) == ["checkpoint-4"]


def test_when_every_checkpoint_is_damaged_the_run_starts_over_and_says_so(accelerator, tmp_path, capsys):
    """Nothing good is left: the run starts from step 0 (the damaged ones are kept in damaged/, not deleted); a
    second damaged checkpoint-2 does not overwrite the first in damaged/."""
    truncate(fake_checkpoint(tmp_path, 2, accelerator=accelerator) / "model.safetensors")
    assert resume_point(accelerator, str(tmp_path), "auto") is None
    assert capsys.readouterr().out == (f"checkpoint-2 is damaged: model.safetensors is 1500 bytes, the manifest says "
                                       f"3000; moved to {tmp_path / DAMAGED}/, no good checkpoint is left: starting "
                                       "from step 0\n")
    (fake_checkpoint(tmp_path, 2, accelerator=accelerator) / MANIFEST).write_text("{")
    assert resume_point(accelerator, str(tmp_path), "auto") is None
    assert "checkpoint-2 is damaged: manifest.json cannot be read (" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / DAMAGED)) == ["checkpoint-2", "checkpoint-2.2"]
    assert resume_point(accelerator, str(tmp_path), "never") is None
