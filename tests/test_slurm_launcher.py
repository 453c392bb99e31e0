"""slurm/accelerate_launch.py without a cluster: the one agent error it leaves out of a node's output, and what it
keeps (tests/test_slurm.py runs it on a cluster)."""

import importlib.util
import logging
import os

from training import ROOT


def test_the_exit_barrier_error_of_a_finished_job_is_left_out_and_other_errors_stay(monkeypatch):
    import accelerate.commands.launch

    spec = importlib.util.spec_from_file_location("slurm_accelerate_launch", os.path.join(ROOT, "slurm",
                                                                                           "accelerate_launch.py"))
    wrapper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrapper)
    agent = logging.getLogger("torch.distributed.elastic.agent.server.api")
    monkeypatch.setattr(agent, "filters", list(agent.filters))
    monkeypatch.setattr(agent, "level", agent.level)
    monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
    monkeypatch.setattr("sys.argv", ["accelerate_launch.py", "train.py"])
    monkeypatch.setattr(accelerate.commands.launch, "launch_command", lambda args: None)  # the trainers exited 0
    assert wrapper.main() == 0
    assert "TORCH_CPP_LOG_LEVEL" not in os.environ, "not passed on to the trainers"

    def passes(message):
        return bool(agent.filter(agent.makeRecord(agent.name, logging.ERROR, __file__, 1, message, (0.01,), None)))

    assert not passes("Error waiting on exit barrier. Elapsed: %s seconds")  # torch 2.13's api.py, word for word
    assert passes("Error waiting on workers: %s")
    assert agent.getEffectiveLevel() == logging.ERROR  # its warnings are left out, its errors stay
