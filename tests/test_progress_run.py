"""What a new user sees in a log file: a default-style run (LoRA, the built-in sentiment set sampled at its first run,
reference log-probs precomputed, an eval), its evaluation and its merge, each with stdout and stderr sent to a file.
Every long stage shows lines with its count, rate and time left (``tests/logged_launch.py`` sets the interval to 0 s:
a line at each update, where a long stage gives one every 10 s), and no warning that does not apply shows:
bitsandbytes and DeepSpeed, unused, are not even imported."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from training import ROOT, overrides

pytestmark = [pytest.mark.slow, pytest.mark.skipif(importlib.util.find_spec("vaderSentiment") is None,
                                                   reason="the built-in sentiment set needs vadersentiment")]

LOGGED = os.path.join(ROOT, "tests", "logged_launch.py")
# What every run printed before (issue 28), none of which applies to a run without quantization or DeepSpeed.
NOT_APPLICABLE = ("gemm_4bit_forward", "kernels-community", "Setting accelerator to CPU", "FutureWarning",
                  "is_gradient_checkpointing", "Warning", "WARNING", "Traceback")
LINE = (r"{what} (\d+)/(\d+) {unit}s \(\d+%\)(, [^;]*)?; "
        r"([\d.]+ (s/{unit}|{unit}s/s), (about \S+ left|\S+ in all)|\S+ so far)$")


def launch(script, args, log, env):
    """``script`` run with stdout and stderr to the file ``log``; its exit status and what it wrote."""
    with open(log, "w") as handle:
        done = subprocess.run([sys.executable, LOGGED, script, *map(str, args)], stdout=handle,
                              stderr=subprocess.STDOUT, cwd=ROOT, env=env, timeout=600)
    return done.returncode, log.read_text()


def progress_of(log, what, unit):
    """The progress lines of one stage: (count, total, line), checked against the one form they all take."""
    pattern = re.compile(LINE.format(what=re.escape(what), unit=unit))
    lines = [line for line in log.splitlines() if re.match(rf"{re.escape(what)} \d+/\d+ ", line)]
    assert lines and all(pattern.match(line) for line in lines), (what, lines, log[-3000:])
    return [(int(pattern.match(line)[1]), int(pattern.match(line)[2]), line) for line in lines]


def assert_whole_stage(log, what, unit):
    """Each time the stage runs (the reference: for the train set, then the eval set): lines that count up to its
    total, with the time left (or so far) while under way and the time it took at the end; one has several lines at
    least. A line that repeats the count before it is the watcher's (a unit of work outlasting the interval)."""
    runs, lines, last = [[]], progress_of(log, what, unit), None
    for count, total, line in lines:
        if count != last:
            runs[-1].append((count, line))
            if count == total:
                runs.append([])
        last = count
    assert runs[-1] == [] and max(len(run) for run in runs) >= 2, lines  # every run ends at its total
    for run in runs[:-1]:
        counts = [count for count, _ in run]
        assert counts == sorted(counts), lines
        assert all(line.endswith((" left", " so far")) for _, line in run[:-1]), lines
        assert run[-1][1].endswith(" in all"), lines
    return len(runs) - 1


def assert_no_warning_that_does_not_apply(log):
    assert not [line for line in log.splitlines() if any(word in line for word in NOT_APPLICABLE)], log[-3000:]
    assert "imported: []" in log.splitlines(), log[-3000:]  # neither bitsandbytes nor DeepSpeed


@pytest.fixture(scope="module")
def default_run(tiny_model_dir, tmp_path_factory):
    """The default run's shape on the tiny model: LoRA, the built-in set (sampled here: a fresh cache), 3 steps with an
    eval at step 2 and at the end; batches of 2 pairs for the reference and the evals, so each stage has several."""
    root = tmp_path_factory.mktemp("progress-run")
    env = {**os.environ, "XDG_CACHE_HOME": str(root / "cache")}
    settings = {"lora.enabled": True, "train.progress_bar": True, "data.sentiment.num_prompts": 8,
                "data.sentiment.eval_prompts": 2, "data.sentiment.completions_per_prompt": 4,
                "data.sentiment.max_new_tokens": 6, "data.sentiment.min_score_gap": 0.0, "train.max_steps": 3,
                "train.per_device_batch_size": 2, "train.eval_batch_size": 2, "train.eval_every": 2}
    status, log = launch("launch/train.py", overrides(tiny_model_dir, "builtin:sentiment", root / "out", **settings),
                         root / "train.log", env)
    assert status == 0, log[-4000:]
    return root, env, log


def test_a_run_in_a_log_file_shows_the_progress_of_each_stage(default_run):
    _, _, log = default_run
    assert_whole_stage(log, "sampling the sentiment set", "token")
    assert progress_of(log, "sampling the sentiment set", "token")[-1][1] == 8 * 4 * 6  # prompts x completions x tokens
    assert assert_whole_stage(log, "reference log-probs", "pair") == 2  # the train set's, then the eval set's
    assert assert_whole_stage(log, "eval", "pair") == 2  # at step 2 and at the end
    training = progress_of(log, "DPO", "step")
    assert sorted({count for count, _, _ in training}) == [1, 2, 3], training
    assert training[-1][2].startswith("DPO 3/3 steps (100%), loss ") and training[-1][2].endswith(" in all"), training
    assert ", about " in training[0][2] and ", acc " in training[0][2]


def test_a_run_shows_no_warning_that_does_not_apply(default_run):
    _, _, log = default_run
    assert_no_warning_that_does_not_apply(log)


def test_evaluation_and_merge_in_a_log_file_show_their_progress(default_run):
    root, env, _ = default_run
    status, log = launch("launch/evaluate.py", [root / "out", "--samples_per_prompt", 2, "--max_new_tokens", 4,
                                                "--batch_size", 2], root / "evaluate.log", env)
    assert status == 0, log[-4000:]
    assert_whole_stage(log, "held-out pairs", "pair")
    assert_whole_stage(log, "sampling 2 responses from the trained model", "prompt")
    assert_whole_stage(log, "sampling 2 responses from the base", "prompt")
    assert_whole_stage(log, "KL: scoring the samples under both models", "response")
    assert_no_warning_that_does_not_apply(log)

    status, log = launch("launch/merge.py", [root / "out"], root / "merge.log", env)
    assert status == 0, log[-4000:]
    assert_whole_stage(log, "merge", "step")
    assert_no_warning_that_does_not_apply(log)
