"""The test tiers: `pytest -m "not slow"` answers in minutes because every test over conftest.SLOW_S is marked slow,
and an unmarked test that runs past conftest.UNMARKED_LIMIT_S fails, naming itself. Checked on a small inner session
that runs the project's conftest hooks with the limit at 0.1 s."""

import os

pytest_plugins = "pytester"

TESTS = os.path.dirname(os.path.abspath(__file__))

INNER_CONFTEST = f"""
import importlib.util

spec = importlib.util.spec_from_file_location("project_conftest", {os.path.join(TESTS, "conftest.py")!r})
project = importlib.util.module_from_spec(spec)
spec.loader.exec_module(project)
project.UNMARKED_LIMIT_S = 0.1
project.sharing_cores = lambda: 1.0  # the inner session runs alone, though this one may run under xdist
pytest_configure = project.pytest_configure
pytest_collection_modifyitems = project.pytest_collection_modifyitems
pytest_runtest_makereport = project.pytest_runtest_makereport
"""

INNER_TESTS = """
import time

import pytest


@pytest.fixture
def slow_setup():
    time.sleep(0.15)


def test_quick():
    pass


def test_sleepy():
    time.sleep(0.15)


def test_quick_with_a_slow_fixture(slow_setup):
    pass


@pytest.mark.slow
def test_sleepy_marked():
    time.sleep(0.15)


@pytest.mark.multiprocess
def test_sleepy_multiprocess():
    time.sleep(0.15)
"""


def test_an_unmarked_test_over_the_limit_fails_and_marked_ones_are_left_out_of_the_fast_tier(pytester):
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_TESTS)
    everything = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider")
    everything.assert_outcomes(passed=3, failed=2)
    failed = {r.nodeid.split("::")[1] for r in everything.reprec.getfailures() if r.when == "call"}
    assert failed == {"test_sleepy", "test_quick_with_a_slow_fixture"}
    assert "is not marked slow: mark it @pytest.mark.slow" in everything.stdout.str()
    fast = pytester.runpytest_inprocess("-q", "-p", "no:cacheprovider", "-m", "not slow")
    fast.assert_outcomes(passed=1, failed=2, deselected=2)


def test_modules_are_collected_longest_first_and_keep_their_order(pytester):
    """What xdist hands out first (pytest.ini: whole modules, in the order collected): a SLURM module, then the
    modules with the most multi-process tests, then those with slow tests; the tests of a module keep their order."""
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(
        test_a="def test_2():\n    pass\n\ndef test_1():\n    pass\n",
        test_b="import pytest\n\n@pytest.mark.multiprocess\ndef test_x():\n    pass\n",
        test_c="import pytest\n\npytestmark = pytest.mark.slurm\n\ndef test_x():\n    pass\n",
        test_d="import pytest\n\n@pytest.mark.slow\ndef test_x():\n    pass\n",
        test_e="import pytest\n\n@pytest.mark.multiprocess\ndef test_x():\n    pass\n\n"
               "@pytest.mark.multiprocess\ndef test_y():\n    pass\n",
    )
    collected = pytester.runpytest_inprocess("--collect-only", "-q", "-p", "no:cacheprovider")
    ids = [line for line in collected.stdout.lines if "::" in line]
    assert ids == ["test_c.py::test_x", "test_e.py::test_x", "test_e.py::test_y", "test_b.py::test_x",
                   "test_d.py::test_x", "test_a.py::test_2", "test_a.py::test_1"]


def test_the_limit_grows_with_the_workers_that_share_each_two_cpus(monkeypatch):
    import conftest

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert conftest.sharing_cores() == 1.0  # no xdist
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    assert conftest.sharing_cores() == 2.0  # -n auto on 2 CPUs: two workers
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "8")
    assert conftest.sharing_cores() == 1.0  # -n auto on 16 CPUs: a worker per two


def test_deepspeed_ops_are_built_in_the_background_only_for_launch_tests(pytester, monkeypatch):
    """A session holding launch tests starts tests/build_deepspeed_ops.py once, detached; the fast tier does not."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        import pytest

        pytest.skip("DeepSpeed is not installed: nothing to build")
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    pytester.makeconftest(INNER_CONFTEST + """
import types
started = []
project.subprocess = types.SimpleNamespace(DEVNULL=None, Popen=lambda command, **kwargs: started.append((command, kwargs)))
pytest_collection_finish = project.pytest_collection_finish


def pytest_sessionfinish(session):
    print(f"started: {[(command[-1], kwargs['start_new_session']) for command, kwargs in started]}")
""")
    pytester.makepyfile(test_inner="import pytest\n\n@pytest.mark.multiprocess\ndef test_x():\n    pass\n\n"
                                   "def test_y():\n    pass\n")
    builder = os.path.join(TESTS, "build_deepspeed_ops.py")
    everything = pytester.runpytest_inprocess("-q", "-s", "-p", "no:cacheprovider")
    assert f"started: [({builder!r}, True)]" in everything.stdout.str()
    fast = pytester.runpytest_inprocess("-q", "-s", "-p", "no:cacheprovider", "-m", "not slow")
    assert "started: []" in fast.stdout.str()
