"""Progress of a long stage, shown by the main process only: a tqdm bar on a terminal, a line every 10 s in a log file.

    bar = progress(len(pairs), "reference log-probs", unit="pair", shown=accelerator.is_main_process)
    for batch in batches:
        ...
        bar.update(len(batch))
    bar.close()

Where stderr is not a terminal (``> train.log 2>&1``, a SLURM job's ``slurm-<job>.out``, a pipe), tqdm would write one
ever-growing line of carriage-return updates, which ``srun --label`` cuts into fragments; :class:`LineProgress`
writes whole lines instead, at most one every :data:`INTERVAL_S`, with the count, the rate and the time left:

    reference log-probs 48/97 pairs (49%); 1.21 s/pair, about 59s left

The silence is counted across stages that follow one another (evaluation samples, then scores, then judges): a stage
speaks once the log has heard no progress line for the interval, so a chain of short stages is not a long silence.
While a stage is under way, a thread repeats its count when one unit of its work outlasts the interval (a training
step, a batch on a loaded machine), so the log is never silent for longer than that. A stage that said nothing (over
within the interval) ends saying nothing, unless asked for its last line (training's last step); one that spoke ends
with its last line, the time it took.

Used by every stage (the built-in set's sampling, the reference precompute, training, evaluation, merging), so it
sits at the top, beside ``distributed``; which process shows progress is the caller's to say (``shown``).
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, Callable

INTERVAL_S = 10.0  # a line at most this often in a log file (read when a bar is made)


class Silence:
    """When the log last heard a progress line (``since``), when a stage last made progress (``active``): a stage that
    begins within the interval of the last one's activity continues its silence. And the stages under way (the
    innermost last), whose latest line a watcher thread writes again when the interval passes without one; the thread
    runs only while a stage is under way."""

    def __init__(self, least_wait_s: float = 1.0) -> None:
        self.least_wait_s = least_wait_s  # the watcher's turns at least this far apart, whatever the interval
        self.since: float | None = None
        self.active: float | None = None
        self.open: list[LineProgress] = []
        self.lock = threading.Lock()  # one line at a time, from the stage's thread or the watcher
        self.wake = threading.Event()
        self.watcher: threading.Thread | None = None

    def begin(self, bar: "LineProgress") -> None:
        with self.lock:
            now = bar.started
            if self.since is None or not self.open and (self.active is None or now - self.active >= bar.interval_s):
                self.since = now  # after a gap without stages (loading, writing), the count starts again
            self.active = now
            self.open.append(bar)
            if bar.watched and self.watcher is None:
                self.watcher = threading.Thread(target=self.watch, name="dpo_dist.progress", daemon=True)
                self.watcher.start()

    def end(self, bar: "LineProgress") -> None:
        with self.lock:
            self.active = bar.clock()
            if bar in self.open:
                self.open.remove(bar)
        self.wake.set()

    def watch(self) -> None:
        """The watcher: the innermost watched stage's line each time the interval passes without one."""
        while True:
            with self.lock:
                watched = [bar for bar in self.open if bar.watched]
                if not watched:
                    self.watcher = None
                    return
                wait = watched[-1].remind()
            self.wake.wait(max(self.least_wait_s, wait))
            self.wake.clear()


SILENCE = Silence()  # this process's log


class LineProgress:
    """The progress of a log file: whole lines, at most one every ``interval_s`` of silence (:class:`Silence`), and the
    last one (count reached) when the stage spoke before or ``end_line`` asks for it; ``watched``: repeated by the
    watcher thread while a unit of work outlasts the interval. Has the tqdm methods the stages use (``update``,
    ``set_postfix``, ``set_postfix_str``, ``write``, ``close``, a context manager)."""

    def __init__(self, total: int, what: str, *, unit: str, initial: int = 0, end_line: bool = False,
                 interval_s: float | None = None, clock: Callable[[], float] = time.monotonic, file: Any = None,
                 silence: Silence | None = None, watched: bool = True):
        self.total, self.n, self.what, self.unit, self.end_line = total, initial, what, unit, end_line
        self.interval_s = INTERVAL_S if interval_s is None else interval_s
        self.clock, self.file, self.watched = clock, file, watched
        self.silence = SILENCE if silence is None else silence
        self.postfix: dict[str, str] = {}
        self.started, self.started_at = clock(), initial
        self.spoke = False
        self.silence.begin(self)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = {key: str(value) for key, value in values.items()}

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.postfix = {text: ""} if text else {}

    def update(self, n: float = 1) -> None:
        with self.silence.lock:
            now = self.clock()
            self.silence.active = now
            if n <= 0:  # nothing done: nothing new to say
                return
            self.n += n
            due = now - self.silence.since >= self.interval_s
            if due or (self.n >= self.total and (self.spoke or self.end_line)):
                self.say(now)

    def remind(self) -> float:
        """The watcher's turn (its lock held): the line again if the interval passed without one; the seconds until the
        next turn."""
        now = self.clock()
        started = self.n > self.started_at or now - self.started >= 1  # else nothing to say yet
        if started and now - self.silence.since >= self.interval_s:
            self.say(now)
        return self.interval_s - (now - self.silence.since)

    def say(self, now: float) -> None:
        self.silence.since, self.spoke = now, True
        self.write(self.line(now))

    def line(self, now: float) -> str:
        """``what n/total units (p%), key value; rate, time left`` (at the end: the time it took; before the first unit
        is done: the time so far), the rate measured since this bar began (a resumed run's pace from where it
        resumed)."""
        units = f"{self.unit}s"
        done, elapsed = self.n - self.started_at, now - self.started
        values = "".join(f", {key} {value}".rstrip() for key, value in self.postfix.items())
        head = f"{self.what} {self.n:g}/{self.total} {units} ({100 * self.n // max(1, self.total):.0f}%){values}"
        if done <= 0 or elapsed <= 0:
            return f"{head}; {duration(elapsed)} so far" if elapsed >= 1 else head
        rate = f"{elapsed / done:.2f} s/{self.unit}" if elapsed >= done else f"{done / elapsed:.1f} {units}/s"
        if self.n < self.total:
            return f"{head}; {rate}, about {duration(elapsed / done * (self.total - self.n))} left"
        return f"{head}; {rate}, {duration(elapsed)} in all"

    def write(self, text: str) -> None:
        stream = self.file or sys.stdout
        stream.write(text + "\n")  # one write: a line from the watcher thread never splits another
        stream.flush()

    def close(self) -> None:
        self.silence.end(self)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def step_done(bar: Any, done: str) -> None:
    """One step of a stage counted in steps (a merge: load, merge, save) done, and what it did, shown with the count;
    ``bar`` None: nothing to tell."""
    if bar is not None:
        bar.set_postfix_str(done, refresh=False)
        bar.update(1)


def duration(seconds: float) -> str:
    """``2h05m``, ``4m07s``, ``9s``."""
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def progress(total: int, what: str, *, unit: str, initial: int = 0, shown: bool = True, end_line: bool = False,
             leave: bool = True) -> Any:
    """The progress of one stage of ``total`` ``unit``\\ s: a tqdm bar where stderr is a terminal (``leave``: it stays
    on the screen when done; false for a stage inside another's bar, as training's evals), a :class:`LineProgress`
    elsewhere, and a silent tqdm when not ``shown`` (every process but the main one: each repeated the same bar)."""
    if shown and not sys.stderr.isatty():
        return LineProgress(total, what, unit=unit, initial=initial, end_line=end_line)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=what, unit=unit, disable=not shown, leave=leave, dynamic_ncols=True)
