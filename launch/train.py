"""Train a policy with DPO.

    accelerate launch launch/train.py                                   # the default run (offline, CPU is fine)
    accelerate launch launch/train.py --config recipes/hh_rlhf_smollm2_lora.yaml train.max_steps=100 loss.beta=0.05
    accelerate launch --multi_gpu --num_processes 2 launch/train.py ... # DDP, on GPUs or CPU-only machines
    python launch/train.py ...                                          # one process
    sbatch slurm/dpo.sbatch ...                                         # SLURM, several nodes (see the README)

SIGUSR1 or SIGTERM (preemption) makes it write a checkpoint after the current step and exit with status 75; the same
command then continues from it (train.resume=auto). A config or model setting that cannot work (an output folder that
cannot be written too) is one line on stderr and exit status 2, before any step; a run that fails later (data,
checkpoint, a full disk, a non-finite loss) exits with 1.

Options are ``section.key=value`` overrides on top of the recipe (or the defaults); ``--help`` lists them all.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import _checkout  # noqa: F401  this checkout's root on the import path, before any dpo_dist import

from dpo_dist.config import ConfigError, describe, load_config


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="DPO training on accelerate. Options are section.key=value overrides; see the list below.",
        epilog="options (section.key, type, default):\n" + "\n".join(describe()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="a YAML recipe (see recipes/); overrides apply on top of it")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, *, whole_process: bool = False) -> int:
    """Train as ``argv`` (default ``sys.argv``) says; the exit status. ``whole_process``: this process runs this command
    alone (``python launch/train.py``), so libraries the run does not use are kept out of it
    (:func:`dpo_dist.distributed.load_only_what_is_used`)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from dpo_dist.launch_policy import apply_fallback

    try:
        cfg, fallback = apply_fallback(load_config(args.config, args.overrides))
    except ConfigError as error:
        tell(f"config error: {error}")
        return 2
    if cfg is None:
        return 0  # the single-device fallback trains in local rank 0 alone
    if fallback:
        print(fallback, flush=True)
    rank = int(os.environ.get("RANK", "0"))
    from dpo_dist.distributed import configure_logging, load_only_what_is_used, uses_deepspeed

    if whole_process:  # before peft or accelerate is imported: bitsandbytes for a 4/8-bit base or its optimizers
        load_only_what_is_used(bitsandbytes=cfg.model.quantization != "none" or cfg.train.optimizer != "adamw",
                               deepspeed=uses_deepspeed())
    configure_logging(rank)  # rank 0 speaks for the job; the others log errors only
    from dpo_dist.train.checkpoint import CheckpointError
    from dpo_dist.data.load import DataError
    from dpo_dist.distributed import DeepSpeedConfigError, FSDPConfigError
    from dpo_dist.model.load import ModelError
    from dpo_dist.publish.card import write_run_card
    from dpo_dist.train.preemption import PREEMPTED_EXIT_CODE, Preempted, stop_with_launcher
    from dpo_dist.data.tokenization import TokenizationError
    from dpo_dist.train.disk import DiskFullError
    from dpo_dist.train.trainer import TrainingError, train

    if cfg.rounds.count > 1:  # iterative DPO: every round's pairs sampled from the policy and judged
        from dpo_dist.rounds.loop import train_rounds as train

    stop_with_launcher()  # a signal that kills the launcher alone reaches this process as SIGTERM
    try:
        result = train(cfg)
        if rank == 0 and not result.get("finished_before"):  # the main process: model/'s card, from what the run wrote
            write_run_card(result["output_dir"])
        status = 0
    except ConfigError as error:  # a folder the run would write cannot be written: found before anything loads
        tell(f"config error: {error}")
        status = 2
    except ModelError as error:  # a setting names a model that cannot be loaded: a config error, found at load
        tell(f"model error: {error}")
        status = 2
    except (DataError, TokenizationError, TrainingError, DeepSpeedConfigError, FSDPConfigError, CheckpointError,
            DiskFullError, OSError) as error:
        tell(f"error: {error}")
        status = 1
    except Preempted as stop:
        if rank == 0:  # every process stopped at the same step with the same checkpoint: one line says it
            tell(f"preempted: {stop}")
        status = PREEMPTED_EXIT_CODE
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_now(status)
    flush_output()
    return status


def tell(line: str) -> None:
    """A line on stderr that cannot change the exit status: after a stop its reader may be gone (a launcher that died
    of the signal, a closed pipe), and the status still has to say what happened."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:
        flush_output()


def flush_output() -> None:
    """Flush stdout and stderr; one whose reader is gone gets /dev/null instead, so that the interpreter's own flush at
    exit does not fail too and turn the status into 120."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)


def exit_now(status: int) -> None:
    """End a distributed process without the interpreter's teardown. Everything is written and the process group is
    destroyed by now (or, after an error, the process ends anyway), and tearing down gloo's and DeepSpeed's native
    objects at interpreter exit can abort the process ("terminate called without an active exception", SIGABRT)
    after a run that succeeded, which would turn a finished run into a failed job; skipping that teardown leaves
    nothing to abort."""
    logging.shutdown()
    flush_output()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main(whole_process=True))
