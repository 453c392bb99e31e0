import importlib.util
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Under xdist (the README's -n auto) a worker's in-process training shares the cores with another worker's launches:
# OpenMP threads that spin while they wait for work then take turns with threads that need the core (a 0.7 s test took
# 17 s). Passive waiting, set before torch loads its OpenMP runtime, is inherited by every process a test starts.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HH_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf")


# A test that takes more than SLOW_S on the 2-core machine is marked slow, so that `pytest -m "not slow"` answers in
# minutes. An unmarked test that takes more than UNMARKED_LIMIT_S (its setup included: a fixture it pays for) fails
# and says so: the margin over SLOW_S is for a shared, noisy machine, not for tests that are slow everywhere.
SLOW_S = 5.0
UNMARKED_LIMIT_S = 15.0
# Every test that launches processes or a SLURM cluster is slow by what it does.
SLOW_BY_MARKER = ("multiprocess", "slurm")


def pytest_configure(config):
    config.addinivalue_line("markers", f"slow: takes more than {SLOW_S:g} s on a 2-core machine (-m 'not slow': the fast tier)")
    config.addinivalue_line("markers", "hh_rlhf: needs the real HH-RLHF test splits at ../shared/data/hh-rlhf")
    config.addinivalue_line("markers", "multiprocess: launches several processes")
    config.addinivalue_line("markers", "slurm: runs jobs on a local SLURM cluster (slurm/local_cluster.sh; needs root or the packages)")


def pytest_collection_modifyitems(items):
    for item in items:
        if any(item.get_closest_marker(name) for name in SLOW_BY_MARKER):
            item.add_marker(pytest.mark.slow)
    items.sort(key=module_rank(items))


def module_rank(items):
    """The modules longest first. Under xdist (the README's ``-n auto``) a worker takes a whole module at a time, in
    the order collected (pytest.ini: ``--dist loadfile --no-loadscope-reorder``), so the module fixtures are built
    once; a long module taken last would run alone at the end. Its markers say how long a module takes: a SLURM
    cluster, then launches of several processes (the more, the longer), then other slow tests. Sorting is stable:
    the tests of a module keep their order."""
    counts = {}
    for item in items:
        module = counts.setdefault(item.nodeid.split("::")[0], [0, 0, 0])
        for index, name in enumerate(("slurm", "multiprocess", "slow")):
            module[index] -= bool(item.get_closest_marker(name))
    return lambda item: counts[item.nodeid.split("::")[0]]


def pytest_collection_finish(session):
    """A session with launch tests builds DeepSpeed's ops in the background from the start (tests/build_deepspeed_ops.py
    says why), niced, so that it takes what the other tests leave. One process starts it: xdist's first worker."""
    if (os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0" and importlib.util.find_spec("deepspeed") is not None
            and any(item.get_closest_marker("multiprocess") for item in session.items)):
        # its own session: it finishes even if pytest is stopped (a build killed halfway leaves torch's lock behind)
        subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "build_deepspeed_ops.py")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                         preexec_fn=lambda: os.nice(10))


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a worker per two CPUs, at least two. Each launch test starts two trainer processes; on the 2-core
    machine two workers still finish the suite sooner than one (the in-process tests use about one core)."""
    return max(2, len(os.sched_getaffinity(0)) // 2)


SETUP_S = pytest.StashKey[float]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Fail an unmarked test that took more than UNMARKED_LIMIT_S, from pytest's own durations (setup and call)."""
    report = (yield).get_result()
    if report.when == "setup":
        item.stash[SETUP_S] = report.duration
    elif report.when == "call" and report.passed and not item.get_closest_marker("slow"):
        took, limit = item.stash.get(SETUP_S, 0.0) + report.duration, UNMARKED_LIMIT_S * sharing_cores()
        if took > limit:
            report.outcome = "failed"
            report.longrepr = (f"{item.nodeid} took {took:.1f} s (setup and call; the limit {limit:g} s) and is not "
                               f"marked slow: mark it @pytest.mark.slow (anything over {SLOW_S:g} s), or make it faster")


def sharing_cores():
    """How many xdist workers share each two CPUs (at least 1): a test takes that much longer while the others run
    launches of two processes beside it. -n auto gives a worker two CPUs, so this is 1 except on fewer than four
    (2 on the 2-CPU machine)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1.0, workers * 2 / len(os.sched_getaffinity(0)))


@pytest.fixture
def hh_dir():
    if not os.path.isdir(HH_DIR):
        pytest.skip(f"the HH-RLHF test splits are not at {os.path.abspath(HH_DIR)} (they sit beside the project in CI)")
    return HH_DIR


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's process-wide state reset after the test, for a module of in-process runs (each builds its own
    Accelerator) to use on every test: ``pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")``."""
    from training import reset_accelerate_state

    yield
    reset_accelerate_state()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from training import save_tiny_model

    return save_tiny_model(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    from training import synthetic_pairs

    # 81 pairs: 65 train and 16 eval, so 2 processes get uneven shards of the training set (one padded)
    return synthetic_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", 81)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, data_file, tmp_path_factory):
    """The single-process, unsharded runs the DeepSpeed and FSDP runs are compared with: full fine-tuning and LoRA."""
    from training import STEPS, reset_accelerate_state, run

    out = {}
    for lora in (False, True):
        folder = tmp_path_factory.mktemp(f"one-lora{lora}") / "out"
        out[lora] = (run(tiny_model_dir, data_file, folder, **STEPS, **{"lora.enabled": lora})["records"], folder)
        reset_accelerate_state()
    return out

