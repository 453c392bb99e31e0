"""A full disk and folders that cannot be written.

A full disk is simulated without root: the write that runs out of space is replaced by one that writes part of its
file and raises what the real one raises on a full disk (measured on a 700 KiB tmpfs: torch.save's C++ stream error,
which carries no errno; safetensors' "No space left on device (os error 28)"; an OSError with errno ENOSPC), and
``shutil.disk_usage`` reports a disk that became full at that moment (:class:`FullDisk`). A folder that cannot be
written is one under a regular file (the tests run as root, which chmod does not stop)."""

import collections
import errno
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from training import ROOT, assert_same_trajectory, overrides, read_jsonl, reset_accelerate_state, run

SETTINGS = {"train.max_steps": 6, "train.save_every": 2}
Usage = collections.namedtuple("Usage", "total used free")


def tree_size(path):
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


class FullDisk:
    """``shutil.disk_usage`` of a disk holding ``root``, full from :meth:`fill` on: its free space is then what has
    been deleted under ``root`` since."""

    def __init__(self, monkeypatch, root):
        self.root, self.capacity, real = str(root), None, shutil.disk_usage

        def usage(path):
            if self.capacity is None:
                return real(path)
            free = max(0, self.capacity - tree_size(self.root))
            return Usage(self.capacity, self.capacity - free, free)

        monkeypatch.setattr(shutil, "disk_usage", usage)

    def fill(self):
        self.capacity = tree_size(self.root)


def torch_stream_error():
    """What torch.save raises on a full disk (torch 2.x, measured): two C++ errors, no errno."""
    try:
        raise RuntimeError("basic_ios::clear: iostream error")
    except RuntimeError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 142144 vs 142032") from None


def safetensors_error():
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def enospc_error():
    raise OSError(errno.ENOSPC, "No space left on device")


def failing_write(disk, under, raise_error, written):
    """A save function ``(obj, path, ...)`` that, for a path under ``under``, writes 1000 bytes of it, fills the disk,
    and raises; ``written`` gets the bytes under ``under`` at that moment."""

    def write(real):
        def save(obj, f, *args, **kwargs):
            if not str(f).startswith(str(under)):
                return real(obj, f, *args, **kwargs)
            with open(f, "wb") as handle:
                handle.write(b"\0" * 1000)
            written.append(tree_size(under))
            disk.fill()
            raise_error()
        return save

    return write


@pytest.fixture(scope="module")
def whole(tiny_model_dir, data_file, tmp_path_factory):
    """The uninterrupted run of SETTINGS."""
    out = tmp_path_factory.mktemp("whole") / "out"
    records = run(tiny_model_dir, data_file, out, **SETTINGS)["records"]
    reset_accelerate_state()
    return records


def one_line(error):
    text = str(error)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("shape", ["torch", "safetensors", "enospc"])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_previous_checkpoint_resumes(
        shape, whole, tiny_model_dir, data_file, tmp_path, monkeypatch):
    """checkpoint-4 runs out of space in its optimizer file (torch.save) or model file (safetensors): one line naming
    it, the bytes free (those of the partial write, now removed) and needed (the size of checkpoint-2); no .tmp
    left; checkpoint-2 resumes to the uninterrupted trajectory."""
    import accelerate.utils.other

    out = tmp_path / "out"
    disk, written = FullDisk(monkeypatch, tmp_path), []
    error = {"torch": torch_stream_error, "safetensors": safetensors_error, "enospc": enospc_error}[shape]
    write = failing_write(disk, out / "checkpoint-4.tmp", error, written)
    if shape == "safetensors":
        monkeypatch.setattr(accelerate.utils.other, "safe_save_file", write(accelerate.utils.other.safe_save_file))
    else:
        monkeypatch.setattr(torch, "save", write(torch.save))
    with pytest.raises(Exception) as caught:
        run(tiny_model_dir, data_file, out, **SETTINGS)
    reset_accelerate_state()
    message = one_line(caught.value)
    needed = tree_size(out / "checkpoint-2")
    assert message.startswith(f"no space left on {out / 'checkpoint-4'}: {written[0]} bytes "), message
    assert f"about {needed} bytes " in message and "(the size of checkpoint-2)" in message, message
    assert message.endswith(f"the last complete checkpoint is {out / 'checkpoint-2'}; free space and run the same "
                            "command again to resume from it"), message
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-2"]
    monkeypatch.undo()
    resumed = run(tiny_model_dir, data_file, out, **SETTINGS)["records"]
    reset_accelerate_state()
    assert_same_trajectory(whole, resumed, atol=1e-6)


def test_a_full_disk_at_the_first_checkpoint_estimates_the_state(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """No checkpoint to measure yet: the bytes needed are the weights and the optimizer state (fp32 weights and two
    Adam moments, three times the weights for full fine-tuning), within 10% of what checkpoint-2 takes when written."""
    out = tmp_path / "out"
    disk, written = FullDisk(monkeypatch, tmp_path), []
    write = failing_write(disk, out / "checkpoint-2.tmp", torch_stream_error, written)
    monkeypatch.setattr(torch, "save", write(torch.save))
    with pytest.raises(Exception) as caught:
        run(tiny_model_dir, data_file, out, **SETTINGS)
    reset_accelerate_state()
    message = one_line(caught.value)
    assert "(the weights and optimizer state to store)" in message and message.endswith(
        "no checkpoint is complete yet; free space and run the same command again (it starts over)"), message
    assert not os.path.exists(out / "checkpoint-2.tmp")
    monkeypatch.undo()
    run(tiny_model_dir, data_file, out, **{**SETTINGS, "train.max_steps": 2})
    reset_accelerate_state()
    needed = int(re.search(r"about (\d+) bytes", message).group(1))
    assert needed == pytest.approx(tree_size(out / "checkpoint-2"), rel=0.1)


EARLY_STOP = {"train.max_steps": 20, "train.eval_every": 2, "train.early_stopping_patience": 2,
              "train.greater_is_better": True}  # the first eval (step 2) stays the best: it stops at step 6


@pytest.mark.parametrize("settings,last", [({"train.max_steps": 4}, 4), (EARLY_STOP, 6)],
                         ids=["last-step", "early-stopped"])
def test_a_full_disk_at_the_export_leaves_the_final_checkpoint_and_a_rerun_only_exports(
        settings, last, tiny_model_dir, data_file, tmp_path, monkeypatch):
    """The export (model/) runs out of space: the final state is checkpoint-<last> already, model/ and model.tmp are
    absent, the message names model/ and the checkpoint. The same command then trains no step, leaves metrics.jsonl
    as it was, and exports the same weights as an uninterrupted run (for early stopping: the best, step 2's); without
    train.save_every the final checkpoint goes once model/ is written."""
    import transformers.modeling_utils
    from safetensors.torch import load_file

    import dpo_dist.train.trainer as trainer

    out, whole_out = tmp_path / "out", tmp_path / "whole"
    run(tiny_model_dir, data_file, whole_out, **settings)
    reset_accelerate_state()
    disk, written = FullDisk(monkeypatch, tmp_path / "out"), []
    real_save = transformers.modeling_utils.safe_save_file
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file",
                        failing_write(disk, out / "model.tmp", safetensors_error, written)(real_save))
    with pytest.raises(Exception) as caught:
        run(tiny_model_dir, data_file, out, **settings)
    reset_accelerate_state()
    message = one_line(caught.value)
    assert message.startswith(f"no space left on {out / 'model'}: {written[0]} bytes "), message
    assert message.endswith(f"the final state is in {out / f'checkpoint-{last}'}: free space and run the same command "
                            "again to export it (it resumes there and trains no further step)"), message
    needed = int(re.search(r"about (\d+) bytes", message).group(1))
    assert needed == pytest.approx(tree_size(whole_out / "model"), rel=0.25)  # weights, tokenizer, configs
    assert not os.path.exists(out / "model") and not os.path.exists(out / "model.tmp")
    assert os.path.isfile(out / f"checkpoint-{last}" / "trainer_state.json")
    metrics = (out / "metrics.jsonl").read_bytes()
    monkeypatch.undo()

    steps = []
    real_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    result = run(tiny_model_dir, data_file, out, **settings)
    reset_accelerate_state()
    assert steps == [] and result["state"].global_step == last
    assert (out / "metrics.jsonl").read_bytes() == metrics
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == list(range(1, last + 1))
    exported = load_file(out / "model" / "model.safetensors")
    expected = load_file(whole_out / "model" / "model.safetensors")
    assert set(exported) == set(expected)
    for name in expected:
        assert torch.equal(exported[name], expected[name]), name
    checkpoints = sorted(n for n in os.listdir(out) if n.startswith("checkpoint"))
    assert checkpoints == sorted(n for n in os.listdir(whole_out) if n.startswith("checkpoint"))
    assert f"checkpoint-{last}" not in checkpoints


def test_a_full_disk_at_the_reference_cache_trains_on(tiny_model_dir, data_file, tmp_path, monkeypatch, caplog):
    """The reference log-probs are computed; writing their cache (the training set's, then the eval set's) runs out of
    space: a warning in one line each naming the cache file, no temporary file left, and the run trains on to the same
    trajectory as one that cached them."""
    import safetensors.torch

    out, cache = tmp_path / "out", tmp_path / "out-refcache"
    disk, written = FullDisk(monkeypatch, tmp_path), []
    monkeypatch.setattr(safetensors.torch, "save_file",
                        failing_write(disk, cache, safetensors_error, written)(safetensors.torch.save_file))
    records = run(tiny_model_dir, data_file, out, **{"train.max_steps": 4})["records"]
    reset_accelerate_state()
    warnings = [r.getMessage() for r in caplog.records if "not cached" in r.getMessage()]
    assert len(warnings) == 2 == len(written)
    for warning, size in zip(warnings, written):
        assert "\n" not in warning
        assert re.search(rf"^reference log-probs not cached, training goes on \(a later run computes them again\): no "
                         rf"space left on {re.escape(str(cache))}/reference-\w+\.safetensors: {size} bytes free, about "
                         r"\d+ bytes (\(\S+ KiB\) )?needed \(the log-probs and their key\); the partial \S+\.tmp was "
                         "removed; nothing is cached$", warning), warning
    assert os.listdir(cache) == []
    monkeypatch.undo()
    cached = run(tiny_model_dir, data_file, tmp_path / "again", **{"train.max_steps": 4})["records"]
    reset_accelerate_state()
    assert_same_trajectory(cached, records, atol=1e-6)


@pytest.mark.parametrize("where", ["reference.cache_dir", "train.output_dir", "XDG_CACHE_HOME"])
def test_an_unwritable_folder_stops_the_run_before_the_model_loads(where, tiny_model_dir, data_file, tmp_path,
                                                                  monkeypatch):
    """A folder the run would write lies under a regular file: one line naming the folder, the file and the setting,
    before the model is loaded (and so before any reference log-prob is computed)."""
    import dpo_dist.train.trainer as trainer

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out, extra = tmp_path / "out", {}
    if where == "reference.cache_dir":
        folder = extra["reference.cache_dir"] = str(blocker / "cache")
    elif where == "train.output_dir":
        folder = out = str(blocker / "out")
    else:  # the built-in sentiment set is cached under $XDG_CACHE_HOME/dpo_dist/data
        monkeypatch.setenv("XDG_CACHE_HOME", str(blocker / "cache"))
        folder, extra = str(blocker / "cache" / "dpo_dist" / "data"), {"data.source": "builtin:sentiment"}
    loaded = []
    real_load = trainer.load_policy
    monkeypatch.setattr(trainer, "load_policy", lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    with pytest.raises(Exception) as caught:
        run(tiny_model_dir, data_file, out, **extra)
    reset_accelerate_state()
    assert loaded == []
    what = "the built-in data set's cache" if where == "XDG_CACHE_HOME" else where
    assert one_line(caught.value) == (f"{what}: {folder} cannot be written ({blocker} is a file); set {where} to a "
                                      "writable folder")


def launch(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def error_lines(stderr):
    """stderr without the logging lines and warnings libraries print (they start with a timestamp or [timestamp])."""
    return [line for line in stderr.splitlines()
            if line.strip() and not re.match(r"^\[?\d{4}-\d\d-\d\d ", line) and "Warning" not in line]


@pytest.mark.slow
def test_launch_unwritable_cache_dir_is_one_line_and_status_2(tiny_model_dir, data_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    settings = {"reference.cache_dir": str(blocker / "c")}
    result = launch(os.path.join(ROOT, "launch", "train.py"),
                    *overrides(tiny_model_dir, data_file, tmp_path / "out", **settings))
    assert result.returncode == 2, result.stderr[-3000:]
    assert error_lines(result.stderr) == [f"config error: reference.cache_dir: {blocker / 'c'} cannot be written "
                                          f"({blocker} is a file); set reference.cache_dir to a writable folder"]


@pytest.mark.slow
def test_launch_full_disk_at_a_checkpoint_is_one_line_and_status_1(tiny_model_dir, data_file, tmp_path):
    """Through launch/train.py (tests/full_disk_launch.py makes checkpoint-4's torch.save fail as on a full disk):
    exit status 1 and one line on stderr instead of torch's C++ traceback."""
    out = tmp_path / "out"
    result = launch(os.path.join(ROOT, "tests", "full_disk_launch.py"), str(out / "checkpoint-4.tmp"),
                    *overrides(tiny_model_dir, data_file, out, **SETTINGS))
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"error: no space left on {out / 'checkpoint-4'}: ") and line.endswith(
        f"the last complete checkpoint is {out / 'checkpoint-2'}; free space and run the same command again to "
        "resume from it"), line
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-2"]
