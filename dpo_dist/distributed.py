"""Build the Accelerator the way this machine needs it, and shard work over its processes.

Everything distributed goes through the ``Accelerator``: the math modules never call ``torch.distributed``.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import sys
import warnings
from typing import Any

import torch


def process_state(*, timeout_s: int | None = None):
    """Accelerate's ``PartialState``: this process's place in the group and its device, known before the Accelerator
    is built (its precision depends on the device).

    ``accelerate launch --multi_gpu --num_processes N`` on a machine without GPUs leaves each process alone unless
    the state is created with ``cpu=True`` first; then the processes form one MULTI_CPU group over gloo (under an
    FSDP config, switched to FSDP once the Accelerator exists: :func:`_fsdp_on_cpu`).
    ``timeout_s`` bounds how long a collective may wait for a missing rank.
    """
    from accelerate import PartialState

    if uses_fsdp() and os.environ.get("FSDP_VERSION", "1") != "2":
        raise FSDPConfigError(
            f"the accelerate config asks for FSDP version {os.environ.get('FSDP_VERSION', '1')}; dpo_dist runs FSDP2 "
            "(fully_shard): set fsdp_version: 2 in its fsdp_config (accelerate_configs/fsdp.yaml)"
        )
    kwargs: dict[str, Any] = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if uses_deepspeed():
            # DeepSpeed on CPU: without gloo set first, Accelerate reports 1 process while DeepSpeed sees them all.
            return PartialState(backend="gloo", **kwargs)
        return PartialState(cpu=True, **kwargs)
    return PartialState(**kwargs)


def build_accelerator(*, timeout_s: int | None = None, mixed_precision: str = "no", **kwargs: Any):
    """An ``accelerate.Accelerator`` that sees every process, GPUs or not (see :func:`process_state`).

    ``mixed_precision`` (``no``, ``bf16``, ``fp16``) is the policy's autocast, and for fp16 its GradScaler. Accelerate
    1.15 leaves fp16 off on CPU without a word (no autocast, no scaler: fp32); torch has both there, so they are
    switched on: fp16 runs the same code on CPU as on GPUs.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    state = process_state(timeout_s=timeout_s)
    if timeout_s is not None:
        kwargs.setdefault("kwargs_handlers", []).append(InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s)))
    multi_cpu = state.distributed_type == DistributedType.MULTI_CPU
    if multi_cpu:
        kwargs.setdefault("cpu", True)
    accelerator = Accelerator(mixed_precision=mixed_precision, **kwargs)
    if mixed_precision == "fp16" and accelerator.device.type == "cpu" and not accelerator.native_amp:
        scaler_kwargs = accelerator.scaler_handler.to_kwargs() if accelerator.scaler_handler is not None else {}
        accelerator.native_amp = True
        accelerator.scaler = torch.amp.GradScaler("cpu", **scaler_kwargs)
    if multi_cpu and uses_fsdp():
        return _fsdp_on_cpu(accelerator)
    return accelerator


def launch_mixed_precision() -> str:
    """What ``accelerate launch`` was asked for (``--mixed_precision`` or its config's ``mixed_precision``): no, bf16,
    fp16 or fp8; ``no`` when not launched by it."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()


def _fsdp_on_cpu(accelerator: Any) -> Any:
    """FSDP over gloo on a machine without GPUs. Accelerate turns an FSDP config into FSDP only for GPU-like
    distributed types; with ``cpu=True`` (how CPU processes join) it silently runs MULTI_CPU data parallel and
    shards nothing. ``fully_shard`` itself works on CPU tensors over gloo, so the state is switched to FSDP here,
    with the plugin read from the launch config as Accelerate would have."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    state = accelerator.state
    if state.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()
        if isinstance(plugin.cpu_offload, CPUOffloadPolicy) and plugin.cpu_offload.pin_memory:
            # Pinned memory needs an accelerator ("Cannot access accelerator device when none is available").
            plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
        if state.mixed_precision != "no":
            plugin.set_mixed_precision(state.mixed_precision)
        state.fsdp_plugin = plugin
        # Both: every later AcceleratorState() copies PartialState's distributed type over its own.
        PartialState().distributed_type = state.distributed_type = DistributedType.FSDP
    return accelerator


def uses_fsdp() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def uses_deepspeed() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


class FSDPConfigError(ValueError):
    """The accelerate config asks for an FSDP setup dpo_dist does not run."""


class DeepSpeedConfigError(ValueError):
    """The DeepSpeed config disagrees with the training config, or asks for what cannot work."""


def configure_deepspeed(accelerator: Any, *, per_device_batch_size: int, gradient_accumulation_steps: int,
                        max_grad_norm: float | None, dtype: torch.dtype) -> dict | None:
    """Write batch size, accumulation, clipping and precision from the training config into DeepSpeed's config.

    A value the DeepSpeed config leaves out or sets to ``auto`` is filled in; one it sets to something else is an
    error naming both (the training config is the one owner of these numbers). Returns the DeepSpeed config, or None
    without DeepSpeed.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    config = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": (per_device_batch_size, "train.per_device_batch_size"),
        "gradient_accumulation_steps": (gradient_accumulation_steps, "train.gradient_accumulation_steps"),
        "train_batch_size": (per_device_batch_size * gradient_accumulation_steps * accelerator.num_processes,
                             "train.per_device_batch_size x train.gradient_accumulation_steps x processes"),
        "gradient_clipping": (float(max_grad_norm or 0.0), "train.max_grad_norm"),
    }
    for key, (value, source) in wanted.items():
        current = config.get(key, "auto")
        if current != "auto" and current != value:
            raise DeepSpeedConfigError(
                f"the DeepSpeed config sets {key}={current}, the training config {source} gives {value}: "
                f"remove {key} from the DeepSpeed config (or set it to auto) and set it in the training config"
            )
        config[key] = value
    for precision, enabled in (("bf16", dtype == torch.bfloat16), ("fp16", dtype == torch.float16)):
        section = config.setdefault(precision, {})
        current = section.get("enabled", "auto")
        # Only a precision the DeepSpeed config switches on is a choice: accelerate writes enabled=False for both
        # whenever its mixed_precision is "no" (our ZeRO configs), which must not veto model.dtype=bfloat16 on GPUs.
        if current not in ("auto", False) and bool(current) != enabled:
            raise DeepSpeedConfigError(
                f"the DeepSpeed config sets {precision}.enabled={current} but model.dtype resolves to {dtype}: "
                f"set model.dtype to match or {precision}.enabled to auto"
            )
        section["enabled"] = enabled
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # the final export consolidates the shards
    if accelerator.gradient_accumulation_steps != gradient_accumulation_steps:
        raise DeepSpeedConfigError(
            f"accelerate launch set gradient accumulation to {accelerator.gradient_accumulation_steps} (its config or "
            f"ACCELERATE_GRADIENT_ACCUMULATION_STEPS), the training config to {gradient_accumulation_steps}: "
            "remove it from the accelerate config; train.gradient_accumulation_steps owns it"
        )
    return config


def zero_stage(accelerator: Any) -> int:
    """The DeepSpeed ZeRO stage, 0 without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return int(plugin.zero_stage) if plugin is not None else 0


def fsdp_version(accelerator: Any) -> int:
    """The FSDP version (2: ``fully_shard``), 0 without FSDP."""
    from accelerate.utils import DistributedType

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return int(plugin.fsdp_version) if accelerator.distributed_type == DistributedType.FSDP and plugin else 0


def forwards_are_collective(accelerator: Any) -> bool:
    """Whether every forward of the policy is a collective: its weights sharded (ZeRO-3, FSDP) over several
    processes, each forward gathering them. Then every process must run the same forwards: generation in step with
    the others (``synced_gpus``), a stand-in batch where a process has none."""
    return bool(zero_stage(accelerator) == 3 or fsdp_version(accelerator)) and accelerator.num_processes > 1


def fsdp_summary(model: Any, accelerator: Any) -> str:
    """What FSDP2 did to the prepared policy, in one line (the trainer prints it when an FSDP config was given)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    if not fsdp_version(accelerator):
        if accelerator.device.type == "cpu" and accelerator.num_processes == 1:  # FSDP on CPU runs over gloo
            return ("FSDP: not applied: an FSDP config was given, but one CPU process has nothing to shard (FSDP runs "
                    "on CPU over 2 or more processes); training unsharded")
        return "FSDP: not applied: an FSDP config was given, but Accelerate set up no FSDP here; training unsharded"
    modules = sum(isinstance(m, FSDPModule) for m in model.modules())
    offload = isinstance(accelerator.state.fsdp_plugin.cpu_offload, CPUOffloadPolicy)
    return (f"FSDP2: parameters, gradients and optimizer state sharded over {accelerator.num_processes} processes "
            f"({modules} fully_shard-ed modules)" + (", offloaded to CPU memory" if offload else ""))


def shard_indices(n: int, accelerator: Any) -> list[int]:
    """This process's contiguous share of ``range(n)``, padded to ``ceil(n / processes)`` by repeating the last
    index, so every process runs the same number of batches (ZeRO-3 needs every rank in every forward)."""
    per_rank = math.ceil(n / accelerator.num_processes)
    start = accelerator.process_index * per_rank
    return [min(i, n - 1) for i in range(start, start + per_rank)]


def gather_in_order(local: torch.Tensor, n: int, accelerator: Any) -> torch.Tensor:
    """The rows every process computed for its ``shard_indices``, in dataset order, padding dropped."""
    return accelerator.gather(local.contiguous())[:n]


def say(accelerator: Any, text: str) -> None:
    """Print ``text`` once per job: on the main process. (Accelerate's ``print`` prints once per machine, so each
    node of a SLURM job repeated every line.)"""
    if accelerator.is_main_process:
        print(text, flush=True)


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _one_line_warning(message: Any, category: type, filename: str, lineno: int, line: str | None = None) -> str:
    """A Python warning as one line (the default adds the source line, ``warnings.warn(``, on a second)."""
    where = "/".join(filename.split(os.sep)[-2:])
    return f"{category.__name__}: {message} ({where}:{lineno})\n"


# Python warnings that say nothing about a run, each matched by its message and the module that issues it (a filter
# per warning, never per category): (message regex, category, module regex, why).
NOT_FOR_USERS = (
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning, r"transformers\.modeling_utils",
     "peft 0.21's PeftModel reads transformers' renamed property at every LoRA load: peft's to change, not a run's"),
)


def filter_warnings() -> None:
    """Each Python warning once and on one line; those in :data:`NOT_FOR_USERS` not at all (a filter after those
    already set: ``-W``, ``PYTHONWARNINGS`` and Python's own keep their say).

    Python shows a warning again whenever any code changes the filters (every ``catch_warnings`` does: its registry of
    warnings shown is cleared) and for each line that issues it, and its ``once`` action is per module, not per
    process: under ZeRO-3 torch's deprecation of ``all_gather_into_tensor`` came 4 times, ``reduce_scatter_tensor`` 3.
    So what is shown is kept once per category and text, by the function that shows it (:class:`_OncePerText`)."""
    warnings.formatwarning = _one_line_warning
    if not isinstance(warnings.showwarning, _OncePerText):
        warnings.showwarning = _OncePerText(warnings.showwarning)
    for message, category, module, _ in NOT_FOR_USERS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module, append=True)


class _OncePerText:
    """``warnings.showwarning`` that shows a warning of a category and text once in this process, then never again."""

    def __init__(self, show: Any):
        self.show, self.shown = show, set()

    def __call__(self, message: Any, category: type, filename: str, lineno: int, file: Any = None,
                 line: str | None = None) -> None:
        key = (category, str(message))
        if key not in self.shown:
            self.shown.add(key)
            self.show(message, category, filename, lineno, file, line)


def load_only_what_is_used(*, bitsandbytes: bool, deepspeed: bool) -> None:
    """Keep bitsandbytes out of a process that does not use it (no 4/8-bit base, no 8-bit or paged optimizer), and
    DeepSpeed out of one launched without it. Other libraries import both whenever they are installed, and both speak
    when imported: peft imports bitsandbytes (``peft/helpers.py``, 1.3 s here), which on a CPU with AVX512-BF16 tries
    to fetch a kernel from the Hub and warns "Failed to load CPU gemm_4bit_forward from kernels-community";
    accelerate imports DeepSpeed to recognise its engine (``unwrap_model``, 1.6 s), which warns "Setting accelerator
    to CPU" on a machine without GPUs. A ``None`` in ``sys.modules`` is Python's way to block an import: ``import``
    raises ImportError and ``importlib.util.find_spec`` returns None, so every library takes its path for "not
    installed". Call it before anything imports peft or accelerate (the launch scripts do, first thing). The
    reference cache's key reads installed versions from package metadata, not imports (``scoring_identity``)."""
    for name, used in (("bitsandbytes", bitsandbytes), ("deepspeed", deepspeed)):
        if not used and name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]


def configure_logging(rank: int) -> None:
    """One voice per job. Every process would print the same notices (a library's FutureWarning, DeepSpeed's
    "Setting accelerator to CPU", bitsandbytes' kernel notice), nodes x processes copies of each in slurm-<job>.out.
    Rank 0 logs our INFO, other libraries' warnings, and each Python warning once, on one line
    (:func:`filter_warnings`); every other rank logs errors only and shows no Python warnings. The progress bars of
    datasets and transformers are off: the stages show their own (:mod:`dpo_dist.progress`)."""
    main = rank == 0
    logging.basicConfig(level=logging.WARNING if main else logging.ERROR,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("dpo_dist").setLevel(logging.INFO if main else logging.ERROR)  # other libraries' INFO stays out
    filter_warnings()
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    # transformers' own handler, plus propagation to ours when CI=true (its choice): each notice twice. Ours only.
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    logging.getLogger("accelerate").setLevel(logging.WARNING if main else logging.ERROR)
    if not main:
        warnings.simplefilter("ignore")
        transformers.utils.logging.set_verbosity_error()
        # DeepSpeed sets its logger's level when it is imported (later, or never): a filter stays.
        logging.getLogger("DeepSpeed").addFilter(_ErrorsOnly())


def cpu_budget(environ: dict[str, str] | None = None, affinity: set[int] | None = None) -> tuple[int, str]:
    """(CPUs this process's launcher may use, where that number comes from). Under SLURM: ``SLURM_CPUS_PER_TASK``
    when the job asked for CPUs per task, else ``SLURM_CPUS_ON_NODE`` (the job's CPUs on this node) divided by its
    tasks on the node (``SLURM_NTASKS_PER_NODE``; slurm/dpo.sbatch runs one); never more than the affinity mask,
    which is all of the machine where SLURM does not bind tasks to CPUs (``TaskPlugin=task/none``, as on the local
    test cluster). Elsewhere: the CPUs in the affinity mask."""
    environ = os.environ if environ is None else environ
    if affinity is None:
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    mask = max(1, len(affinity))
    if environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        slurm, source = int(environ["SLURM_CPUS_PER_TASK"]), f"SLURM_CPUS_PER_TASK={environ['SLURM_CPUS_PER_TASK']}"
    elif environ.get("SLURM_CPUS_ON_NODE", "").isdigit():
        tasks = int(environ["SLURM_NTASKS_PER_NODE"]) if environ.get("SLURM_NTASKS_PER_NODE", "").isdigit() else 1
        slurm = int(environ["SLURM_CPUS_ON_NODE"]) // max(1, tasks)
        source = f"SLURM_CPUS_ON_NODE={environ['SLURM_CPUS_ON_NODE']}" + (f" / {tasks} tasks" if tasks > 1 else "")
    else:
        return mask, "the affinity mask"
    if slurm > mask:
        return mask, f"the affinity mask (smaller than {source})"
    return max(1, slurm), source


def set_cpu_threads(requested: int | None, accelerator: Any) -> tuple[int, str] | None:
    """Threads per process for CPU runs, and why: ``requested``, or the CPUs this machine's launcher may use
    (:func:`cpu_budget`) divided by the processes it started (``LOCAL_WORLD_SIZE``). ``accelerate launch`` without a
    config sets ``OMP_NUM_THREADS=1`` on machines without GPUs, which halves a 2-core machine's speed; this undoes
    that. Under SLURM the job's share of the node counts, not the whole machine. Returns None on GPU runs."""
    if accelerator.device.type != "cpu":
        return None
    if requested:
        threads, why = requested, "train.cpu_threads"
    else:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        cpus, source = cpu_budget()
        threads = max(1, cpus // max(1, local))
        why = f"{cpus} CPUs from {source} / {local} processes on this machine"
    torch.set_num_threads(threads)
    return threads, why


def prepare_frozen(model: torch.nn.Module, accelerator: Any) -> torch.nn.Module:
    """A frozen model (the online reference for full fine-tuning) placed like the policy: under ZeRO-3 it is wrapped
    in its own DeepSpeed engine, so its parameters stay sharded and are gathered layer by layer for each forward
    (it was built sharded, since ``zero3_init_flag`` is on); under FSDP2 it is ``fully_shard``-ed with the policy's
    units and settings (Accelerate's own wrapping, without an optimizer); otherwise it is moved to the device, its
    forward under the policy's autocast when mixed precision is on (so at step 1 it computes exactly what the policy
    computes)."""
    model.requires_grad_(False)
    model.eval()
    if fsdp_version(accelerator) == 2:
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model.to(accelerator.device))
    if zero_stage(accelerator) != 3:
        if accelerator.native_amp:  # the policy's forward runs under autocast (accelerate wrapped it in prepare)
            from accelerate.utils import convert_outputs_to_fp32

            model.forward = convert_outputs_to_fp32(accelerator.autocast()(model.forward))
        return model.to(accelerator.device)
    import copy

    import deepspeed

    policy_config = accelerator.state.deepspeed_plugin.deepspeed_config
    config = {key: copy.deepcopy(policy_config[key]) for key in
              ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "bf16", "fp16")
              if key in policy_config}
    config["zero_optimization"] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    return engine
