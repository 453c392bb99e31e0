"""dpo_dist/progress.py: a tqdm bar on a terminal, a line every 10 s in a log file, on the main process only; and the
warnings a run shows (dpo_dist.distributed.filter_warnings, load_only_what_is_used)."""

import importlib.util
import io
import time
import sys
import uuid
import warnings

import pytest

from dpo_dist import progress as progress_module
from dpo_dist.progress import LineProgress, Silence, progress


class Clock:
    def __init__(self, now=100.0):
        self.now = now

    def __call__(self):
        return self.now


def stage(total, what="reference log-probs", unit="pair", *, clock, silence, **kwargs):
    out = io.StringIO()
    bar = LineProgress(total, what, unit=unit, clock=clock, file=out, silence=silence, interval_s=10, watched=False,
                       **kwargs)
    return bar, out


def test_a_log_file_gets_a_line_every_10_s_with_count_rate_and_time_left():
    """97 pairs in batches of 16 at 4 s a batch: 10 s after the start (batch 3, 12 s), 10 s after that (batch 6, 24 s),
    and the last batch, since the stage spoke; the rate and the time left at the measured pace."""
    clock, silence = Clock(), Silence()
    bar, out = stage(97, clock=clock, silence=silence)
    for done in range(16, 97 + 16, 16):
        clock.now += 4.0
        bar.update(min(16, 97 - bar.n))
    bar.close()
    assert out.getvalue().splitlines() == [
        "reference log-probs 48/97 pairs (49%); 4.0 pairs/s, about 12s left",
        "reference log-probs 96/97 pairs (98%); 4.0 pairs/s, about 0s left",
        "reference log-probs 97/97 pairs (100%); 3.5 pairs/s, 28s in all",
    ]


def test_a_slow_stage_gives_seconds_per_unit_and_a_resumed_one_its_pace_since_it_resumed():
    """Training resumed at step 4 of 10, 25 s a step: a line at each step (over 10 s of silence), the pace from step 4
    on, the values of the step just done; and the last step whatever happened (training's summary line)."""
    clock, silence = Clock(), Silence()
    bar, out = stage(10, "DPO", "step", clock=clock, silence=silence, initial=4, end_line=True)
    for step in range(5, 11):
        clock.now += 25.0
        bar.set_postfix(loss=f"{step / 10:.4f}", refresh=False)
        bar.update(1)
    lines = out.getvalue().splitlines()
    assert lines[0] == "DPO 5/10 steps (50%), loss 0.5000; 25.00 s/step, about 2m05s left"
    assert lines[-1] == "DPO 10/10 steps (100%), loss 1.0000; 25.00 s/step, 2m30s in all" and len(lines) == 6


def test_a_short_stage_says_nothing_unless_asked_for_its_last_line():
    clock, silence = Clock(), Silence()
    bar, out = stage(3, clock=clock, silence=silence)
    for _ in range(3):
        clock.now += 1.0
        bar.update(1)
    bar.close()
    assert out.getvalue() == ""
    clock.now += 60.0  # a long gap without stages (a model loading): the next stage's silence starts at its start
    bar, out = stage(2, "DPO", "step", clock=clock, silence=silence, end_line=True)
    clock.now += 1.0
    bar.update(1)
    clock.now += 1.0
    bar.update(1)
    assert out.getvalue().splitlines() == ["DPO 2/2 steps (100%); 1.00 s/step, 2s in all"]


def test_a_stage_done_in_one_long_update_says_so():
    clock, silence = Clock(), Silence()
    bar, out = stage(16, clock=clock, silence=silence)
    clock.now += 30.0
    bar.update(16)
    bar.update(0)  # a top-up of nothing (a batch that sampled every token it could): no second line
    assert out.getvalue().splitlines() == ["reference log-probs 16/16 pairs (100%); 1.88 s/pair, 30s in all"]


def test_a_stage_of_steps_says_which_step_it_did():
    """A merge: three steps of 12 s; each line names the step just done (step_done), None a bar to tell nothing."""
    from dpo_dist.progress import step_done

    clock, silence = Clock(), Silence()
    bar, out = stage(3, "merge", "step", clock=clock, silence=silence)
    for done in ("base and adapter loaded", "merged in fp32, cast to float32", "saved to out/merged"):
        clock.now += 12.0
        step_done(bar, done)
    step_done(None, "nothing")
    assert out.getvalue().splitlines() == [
        "merge 1/3 steps (33%), base and adapter loaded; 12.00 s/step, about 24s left",
        "merge 2/3 steps (66%), merged in fp32, cast to float32; 12.00 s/step, about 12s left",
        "merge 3/3 steps (100%), saved to out/merged; 12.00 s/step, 36s in all"]


def test_stages_that_follow_one_another_share_their_silence():
    """Evaluation's stages each take 6 s: none is long, but the log is never silent for more than 10 s. A stage that
    begins within 10 s of the last one's progress continues its silence; the line goes to the stage at work."""
    clock, silence = Clock(), Silence()
    outs = []
    for what in ("held-out pairs", "sampling from the trained model", "sampling from the base", "KL"):
        bar, out = stage(3, what, "prompt", clock=clock, silence=silence)
        for _ in range(3):
            clock.now += 2.0
            bar.update(1)
        bar.close()
        outs.append(out.getvalue().splitlines())
    assert outs == [[], ["sampling from the trained model 2/3 prompts (66%); 2.00 s/prompt, about 2s left",
                         "sampling from the trained model 3/3 prompts (100%); 2.00 s/prompt, 6s in all"],
                    [], ["KL 2/3 prompts (66%); 2.00 s/prompt, about 2s left",
                         "KL 3/3 prompts (100%); 2.00 s/prompt, 6s in all"]]


def test_a_stage_inside_another_resets_the_outer_ones_silence():
    """Training's eval speaks while the training bar waits: the next training line comes 10 s after the eval's; an
    eval that begins after a long step (the training bar open all along) speaks at once."""
    clock, silence = Clock(), Silence()
    train, train_out = stage(100, "DPO", "step", clock=clock, silence=silence)
    clock.now += 9.0
    train.update(1)
    evaluation, eval_out = stage(4, "eval", "pair", clock=clock, silence=silence)
    clock.now += 2.0
    evaluation.update(1)  # 11 s of silence: the eval speaks
    clock.now += 2.0
    evaluation.update(3)
    evaluation.close()
    clock.now += 5.0
    train.update(1)  # 7 s after the eval's last line: quiet
    assert len(eval_out.getvalue().splitlines()) == 2 and train_out.getvalue() == ""
    clock.now += 5.0
    train.update(1)
    assert train_out.getvalue().startswith("DPO 3/100 steps (3%)")
    clock.now += 15.0  # a long step, then an eval: the eval's start continues the training's silence
    evaluation, eval_out = stage(4, "eval", "pair", clock=clock, silence=silence)
    clock.now += 1.0
    evaluation.update(2)
    evaluation.close()
    assert eval_out.getvalue().startswith("eval 2/4 pairs (50%)")


def test_a_unit_of_work_that_outlasts_the_interval_is_not_a_silence():
    """A thread repeats the line of the stage under way (the innermost) when the interval passes without one (here
    0.5 s): before the first unit is done it says how long so far (from 1 s on); it stops once no stage is under
    way."""
    silence, out = Silence(least_wait_s=0.01), io.StringIO()
    outer = LineProgress(10, "DPO", unit="step", interval_s=0.5, file=out, silence=silence)
    outer.update(1)
    inner = LineProgress(4, "eval", unit="pair", interval_s=0.5, file=out, silence=silence)
    time.sleep(1.8)  # one long unit of the eval: lines at about 1 s and 1.5 s
    inner.close()
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and all(line.startswith("eval 0/4 pairs (0%); ") and line.endswith("s so far")
                                   for line in lines), lines
    outer.close()
    silence.watcher is None or silence.watcher.join(timeout=5)
    assert silence.watcher is None and silence.open == []
    time.sleep(0.2)
    assert out.getvalue().splitlines() == lines, "no line once no stage is under way"
    clock = Clock()
    bar, _ = stage(4, clock=clock, silence=Silence())
    clock.now += 12.0
    assert bar.line(clock.now) == "reference log-probs 0/4 pairs (0%); 12s so far"


def test_a_terminal_gets_a_tqdm_bar_a_log_file_lines_and_other_processes_nothing(monkeypatch):
    monkeypatch.setattr(progress_module.sys.stderr, "isatty", lambda: False, raising=False)
    with progress(5, "DPO", unit="step") as bar:
        assert isinstance(bar, LineProgress)
    silent = progress(5, "DPO", unit="step", shown=False)  # another process: tqdm, silent, in a log file too
    assert not isinstance(silent, LineProgress) and silent.disable
    monkeypatch.setattr(progress_module.sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress(5, "DPO", unit="step", initial=2)
    assert not isinstance(bar, LineProgress) and not bar.disable and bar.n == 2 and bar.unit == "step"
    bar.close()
    assert progress(5, "DPO", unit="step", shown=False).disable


def test_the_interval_is_read_when_a_bar_is_made(monkeypatch):
    monkeypatch.setattr(progress_module, "INTERVAL_S", 0.0)
    with LineProgress(3, "x", unit="pair", silence=Silence(), watched=False, file=io.StringIO()) as bar:
        assert bar.interval_s == 0.0


# --- warnings -----------------------------------------------------------------------------------------------------

def warn_from(message, category, module, lineno):
    warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", lineno, module=module)


def test_each_warning_once_wherever_it_comes_from_and_peft_s_deprecation_not_at_all(monkeypatch):
    """filter_warnings: one warning issued from 4 places, or from one after the filters changed (ZeRO-3's calls of
    torch's deprecated collectives), shows once; the FutureWarning transformers gives peft's read of a renamed property
    does not show, from transformers; the same text issued elsewhere (not that case) still does, and so does every
    other warning."""
    from dpo_dist.distributed import filter_warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    gather = f"`torch.distributed.all_gather_into_tensor` is deprecated ({uuid.uuid4()})"  # new to the once-registry
    peft = "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing`"
    elsewhere, other = f"{peft} ({uuid.uuid4()})", f"something else ({uuid.uuid4()})"
    with warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()
        filter_warnings()
        for lineno in (10, 20, 30, 40):
            warn_from(gather, FutureWarning, "torch.distributed.distributed_c10d", lineno)
        for _ in range(2):
            with warnings.catch_warnings():  # what libraries do between two steps: Python forgets what it showed
                pass
            warnings.warn(gather, FutureWarning)
        for _ in range(3):
            warn_from(peft, FutureWarning, "transformers.modeling_utils", 3314)
        warn_from(elsewhere, FutureWarning, "mine", 1)
        warn_from(other, UserWarning, "mine", 2)
    assert [str(w.message) for w in shown] == [gather, elsewhere, other]


def test_the_python_warning_filters_for_a_run_are_precise():
    """Each filter names a message and a module, never a whole category, and says why."""
    from dpo_dist.distributed import NOT_FOR_USERS

    for message, category, module, why in NOT_FOR_USERS:
        assert message and module and why and issubclass(category, Warning)


def test_a_library_that_is_not_used_is_not_imported():
    """load_only_what_is_used: an unused bitsandbytes or DeepSpeed reads as not installed, to importers and to the
    libraries' availability checks; a used one stays importable, and one imported already is left alone."""
    from dpo_dist.distributed import load_only_what_is_used

    names = ("bitsandbytes", "deepspeed")
    saved = {name: sys.modules.pop(name) for name in names if name in sys.modules}
    try:
        load_only_what_is_used(bitsandbytes=False, deepspeed=True)
        assert "bitsandbytes" in sys.modules and importlib.util.find_spec("bitsandbytes") is None
        with pytest.raises(ImportError):
            import bitsandbytes  # noqa: F401
        assert "deepspeed" not in sys.modules
        imported = sys.modules["deepspeed"] = type(sys)("deepspeed")
        load_only_what_is_used(bitsandbytes=False, deepspeed=False)
        assert sys.modules["deepspeed"] is imported
    finally:
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
