import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

HH_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "hh-rlhf")


def pytest_configure(config):
    config.addinivalue_line("markers", "hh_rlhf: needs the real HH-RLHF test splits at ../shared/data/hh-rlhf")
    config.addinivalue_line("markers", "multiprocess: launches several processes")
    config.addinivalue_line("markers", "slurm: runs jobs on a local SLURM cluster (slurm/local_cluster.sh; needs root or the packages)")


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

