"""train.keep_freed_memory: glibc's malloc keeps what PyTorch frees, so a step's tensors do not fault in fresh pages."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from dpo_dist.train import host_memory
from training import ROOT, reset_accelerate_state, run

STEP_FAULTS = textwrap.dedent("""
    import ctypes, resource, sys
    ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, whatever the machine's THP setting
    import torch
    from dpo_dist.train.host_memory import keep_freed_memory

    kept = keep_freed_memory() if sys.argv[1] == "keep" else None
    torch.manual_seed(0)
    layers = [[(torch.randn(*shape) * 0.02).requires_grad_() for shape in ((576, 1536), (576, 1536), (1536, 576))]
              for _ in range(4)]
    head = torch.randn(576, 32768) * 0.02

    def step():  # a SmolLM2-sized MLP stack's forward and backward over 500 positions, 64 MiB of logits
        hidden = torch.randn(500, 576, requires_grad=True)
        for gate, up, down in layers:
            hidden = hidden + (torch.nn.functional.silu(hidden @ gate) * (hidden @ up)) @ down
        (hidden @ head).logsumexp(-1).sum().backward()

    for _ in range(10):  # the heap settles: its free blocks fit every later request
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
""")


def step_faults(mode: str) -> tuple[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", STEP_FAULTS, mode], capture_output=True, text=True, timeout=300,
                            cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    kept, faults = result.stdout.split()
    return kept, float(faults)


@pytest.mark.slow
@pytest.mark.skipif(host_memory.glibc() is None,
                    reason="keep_freed_memory tunes glibc's malloc; this process's malloc is not glibc's")
def test_a_step_faults_in_no_fresh_pages_once_freed_memory_is_kept():
    """With glibc's defaults each step's blocks over its mmap threshold are mapped afresh and its heap is trimmed:
    tens of thousands of page faults a step (about 81,000 here). Kept, the settled heap serves every block: none
    here, and far fewer however the heap settles."""
    kept, default_faults = step_faults("glibc")
    assert kept == "None" and default_faults > 20_000, default_faults
    kept, faults = step_faults("keep")
    if int(kept) != 1 << 30:
        pytest.skip(f"this glibc takes an mmap threshold of {host_memory.describe_threshold(int(kept))} at most (glibc "
                    "before 2.35), so the step's 64 MiB of logits are still mapped afresh")
    assert faults < default_faults / 20, (faults, default_faults)


class FakeLibc:
    def __init__(self, accepts):
        self.accepts, self.calls = accepts, []

    def mallopt(self, parameter, value):
        self.calls.append((parameter, value))
        return int(parameter != host_memory.M_MMAP_THRESHOLD or value in self.accepts)


@pytest.mark.parametrize("accepts, threshold", [({1 << 30}, 1 << 30), ({32 << 20}, 32 << 20), (set(), None)])
def test_a_glibc_that_refuses_the_larger_threshold_gets_the_smaller_or_nothing(monkeypatch, accepts, threshold):
    libc = FakeLibc(accepts)
    monkeypatch.setattr(host_memory, "glibc", lambda: libc)
    assert host_memory.keep_freed_memory() == threshold
    trimmed = (host_memory.M_TRIM_THRESHOLD, host_memory.NO_TRIM) in libc.calls
    assert trimmed == (threshold is not None)  # trimming is left alone where no threshold was taken


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.glibc() is None and host_memory.keep_freed_memory() is None


@pytest.mark.skipif(host_memory.platform.libc_ver()[0] != "glibc", reason="the C library here is not glibc")
def test_a_preloaded_allocator_is_left_alone(monkeypatch):
    """With jemalloc or tcmalloc preloaded, glibc's mallopt still answers 1 but tunes a malloc nobody calls."""
    assert host_memory.glibc() is not None  # this process: glibc's own malloc
    monkeypatch.setattr(host_memory, "malloc_in_use", lambda: 0)  # calls resolve to another library's malloc
    assert host_memory.glibc() is None and host_memory.keep_freed_memory() is None


INTERPOSER = """
#include <stddef.h>
extern void *__libc_malloc(size_t);
void *malloc(size_t n) { return __libc_malloc(n); }
"""


@pytest.mark.skipif(host_memory.platform.libc_ver()[0] != "glibc" or not shutil.which("cc"),
                    reason="needs glibc and a C compiler (cc) to build a malloc to preload")
def test_a_really_preloaded_malloc_is_detected(tmp_path):
    """A library preloaded with LD_PRELOAD that defines malloc (as jemalloc and tcmalloc do) takes the process's
    calls; keep_freed_memory then changes nothing and says so by returning None."""
    (tmp_path / "interposer.c").write_text(INTERPOSER)
    library = tmp_path / "interposer.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(tmp_path / "interposer.c")], check=True)
    probe = "from dpo_dist.train.host_memory import keep_freed_memory; print(keep_freed_memory())"
    thresholds = {str(threshold) for threshold in host_memory.MMAP_THRESHOLDS}
    for preload, expected in (("", thresholds), (str(library), {"None"})):
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT,
                                env={**os.environ, "LD_PRELOAD": preload})
        assert result.returncode == 0 and result.stdout.split()[-1] in expected, (preload, result.stdout,
                                                                                  result.stderr[-2000:])


def test_thresholds_are_said_in_their_unit():
    assert host_memory.describe_threshold(1 << 30) == "1 GiB" and host_memory.describe_threshold(32 << 20) == "32 MiB"


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_runs_keep_freed_memory_unless_told_not_to(keep, tiny_model_dir, data_file, tmp_path, monkeypatch, capsys):
    import dpo_dist.train.trainer as trainer

    calls = []
    monkeypatch.setattr(trainer, "keep_freed_memory", lambda: calls.append(1) or 1 << 30)
    try:
        run(tiny_model_dir, data_file, tmp_path / "out", **{"train.max_steps": 1, "train.keep_freed_memory": keep})
    finally:
        reset_accelerate_state()
    said = "host memory: what PyTorch frees is kept for reuse" in capsys.readouterr().out
    applies = keep and not torch.cuda.is_available()  # CPU runs only
    assert said == applies and len(calls) == int(applies)
