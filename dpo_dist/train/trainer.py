"""The DPO training loop on ``accelerate.Accelerator``.

    accelerate launch launch/train.py [--config RECIPE.yaml] [section.key=value ...]
    accelerate launch --multi_gpu --num_processes 2 launch/train.py ...     (DDP; works on CPU-only machines too)
    python launch/train.py ...                                              (one process)

``train(cfg)`` reads top to bottom: build the accelerator, load the policy, prepare the pairs (reference log-probs
precomputed and cached), then one ``train_step`` per optimizer step, ``evaluate`` and ``save_checkpoint`` on their
schedules, and the final export. Data order is a pure function of (seed, epoch): the position in the data is the
optimizer step, which is what a resumed run restores.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from dpo_dist.config import (CONFIG_FILE, HISTORY_FILE, Config, history_entry, read_config_history, save_config,
                             write_config_history)
from dpo_dist.data.collate import PreferenceCollator
from dpo_dist.data.order import DataOrder, pair_groups
from dpo_dist.data.packing import PackedPairCollator
from dpo_dist.data.show import show_pair
from dpo_dist.distributed import (
    build_accelerator,
    configure_deepspeed,
    fsdp_summary,
    fsdp_version,
    gather_in_order,
    launch_mixed_precision,
    prepare_frozen,
    process_state,
    say,
    set_cpu_threads,
    shard_indices,
    uses_deepspeed,
    uses_fsdp,
    zero_stage,
)
from dpo_dist.model.attention import (FLEX_BLOCK, base_model, choose_attention_layout, choose_packing,
                                     flex_training_unsupported)
from dpo_dist.model.load import (
    Precision,
    base_config_values,
    load_policy,
    load_reference_copy,
    resolve_precision,
    resolve_source,
)
from dpo_dist.progress import progress
from dpo_dist.train.checkpoint import (
    ABANDONED,
    TrainState,
    adapter_only_checkpoints,
    load_checkpoint,
    record_start,
    remove_partial_writes,
    resume_point,
    save_checkpoint,
    set_aside_later_checkpoints,
)
from dpo_dist.train.best import stopped_early, track_best
from dpo_dist.train.shape import engine_name, record, resume_shape, run_shape
from dpo_dist.train.checks import (
    TrainingError,
    check_combination,
    check_launch_precision,
    check_output_locations,
    check_resume_changes,
    check_step,
    watch_divergence,
)
from dpo_dist.train.final import checkpoint_final_state, drop_final_checkpoint, final_weights, save_final_model
from dpo_dist.train.host_memory import describe_threshold, keep_freed_memory
from dpo_dist.train.inputs import attach_reference, model_identity, said_counts, tokenized_pairs
from dpo_dist.train.metrics import (
    MetricsLog,
    flat_config,
    held_state_gb,
    is_finite,
    peak_memory_gb,
    plot,
    reduce_stats,
    stats_width,
    summary,
    write_run_file,
)
from dpo_dist.train.objective import batch_losses
from dpo_dist.train.lock import OutputLock
from dpo_dist.train.optim import build_optimizer, lr_lambda, take_hyperparameters, windowed_lr_lambda
from dpo_dist.train.preemption import Preempted, StopSignals
from dpo_dist.train.samples import generate_samples, held_out_prompts, sampling_step


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: Any, eval_tok: Any, cfg: Config, accelerator: Any, reference_model: Any, collator: Any) -> dict[str, float]:
    """Pair (or ranking) metrics over the whole eval split, sharded over processes; ``eval/``-prefixed."""
    shard = shard_indices(len(eval_tok), accelerator)
    rows = [torch.zeros(0, stats_width(cfg.data.responses), device=accelerator.device)]
    was_training = model.training
    model.eval()
    size = cfg.train.eval_batch_size
    with progress(len(eval_tok), "eval", unit="pair", shown=accelerator.is_main_process and cfg.train.progress_bar,
                  leave=False) as bar:
        for start in range(0, len(shard), size):
            batch = to_device(collator([eval_tok[i] for i in shard[start : start + size]]), accelerator.device)
            rows.append(batch_losses(model, batch, cfg, reference_model)[1])
            bar.update(min(size * accelerator.num_processes, len(eval_tok) - bar.n))  # every process, a batch each
    model.train(was_training)
    return reduce_stats(gather_in_order(torch.cat(rows), len(eval_tok), accelerator), prefix="eval/")


def train_step(model: Any, optimizer: Any, micro_batches: list[dict[str, torch.Tensor]], cfg: Config, accelerator: Any,
               reference_model: Any) -> dict[str, float]:
    """One optimizer step over ``A`` micro-batches; returns the step's metrics, reduced over all processes once, and
    ``update_applied`` (1 or 0).

    The step's loss is checked before the last micro-batch's backward (under DeepSpeed that backward steps the
    engine), the gradient norm before ``optimizer.step`` (a no-op under DeepSpeed; a GradScaler skips a step whose
    gradients overflowed): a non-finite one returns with the update not applied.
    """
    stats = []
    record: dict[str, float] = {}
    for batch in micro_batches:
        with accelerator.accumulate(model):
            loss, batch_stats = batch_losses(model, batch, cfg, reference_model)
            stats.append(batch_stats)
            if accelerator.sync_gradients:
                record = reduce_stats(accelerator.gather(torch.cat(stats)))
                if not is_finite(record["loss"]):
                    return {**record, "grad_norm": float("nan"), "update_applied": 0.0}
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                max_norm = cfg.train.max_grad_norm if cfg.train.max_grad_norm is not None else float("inf")
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_norm)
                record["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
                if not is_finite(record["grad_norm"]) and accelerator.scaler is None and not zero_stage(accelerator):
                    return {**record, "update_applied": 0.0}
            optimizer.step()
            optimizer.zero_grad()
    return {**record, "update_applied": 0.0 if optimizer.step_was_skipped else 1.0}


@dataclass
class Run:
    """Everything a training run holds, built by :func:`setup`."""

    cfg: Config
    accelerator: Any
    precision: Precision
    model: Any
    tokenizer: Any
    optimizer: Any
    scheduler: Any
    train_tok: Any
    eval_tok: Any
    counts: dict
    order: DataOrder
    total_steps: int
    reference_model: Any
    state: TrainState
    metrics: MetricsLog
    collator: Any  # PackedPairCollator or PreferenceCollator
    sample_prompts: list[list[int]]  # token ids of the held-out prompts completed at sampling steps (train.sample_prompts)
    windows: list[tuple[int, int]] | None = None  # setup(data=False): the schedule's (first step, steps) windows
    record_extra: dict[str, Any] = field(default_factory=dict)  # written with every step's metrics (the round)


def setup(cfg: Config, signals: StopSignals, lock: OutputLock, *, data: bool = True) -> Run:
    """Accelerator, the output folder's lock, policy, pairs (with reference log-probs), optimizer and schedule, resumed
    state (a changed config checked before anything loads). A stop signal during the reference precompute stops it at
    the next batch (:class:`Preempted`). ``data=False``: no pairs yet (iterative rounds make theirs from the policy:
    ``dpo_dist.rounds``): the run's ``train_tok``, ``order`` and ``total_steps`` are set by the caller, and
    ``windows`` holds the schedule's windows, one per set of pairs."""
    t = cfg.train
    device = process_state(timeout_s=t.collective_timeout_s).device
    precision = resolve_precision(cfg, device, deepspeed=uses_deepspeed())
    check_launch_precision(launch_mixed_precision(), precision.compute)
    accelerator = build_accelerator(
        timeout_s=t.collective_timeout_s, mixed_precision=precision.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps, log_with=t.report_to or None,
        project_dir=t.output_dir,
    )
    check_output_locations(cfg, accelerator)  # before anything is loaded or computed
    took_over = lock.acquire(accelerator)  # before anything is written to the folder
    if took_over:
        say(accelerator, took_over)
    changes, resumed_folder = check_resume_changes(cfg, accelerator)  # keys that cannot change mid-run: refused
    given = cfg  # config.yaml keeps the config as given; the shape below may recompute its accumulation
    resume_from = resume_point(accelerator, t.output_dir, t.resume)  # checked against its manifest
    shape = run_shape(cfg, accelerator.num_processes,
                      engine_name(accelerator.num_processes, zero_stage(accelerator), fsdp_version(accelerator)))
    if resume_from:  # on another process count or batch split: the same global batch, or refused here
        cfg, said_shape = resume_shape(cfg, shape, resume_from, accumulation_given=any(
            c.key == "train.gradient_accumulation_steps" for c in changes))
        t, shape = cfg.train, run_shape(cfg, shape.processes, shape.engine)
        accelerator.gradient_accumulation_steps = t.gradient_accumulation_steps
        if said_shape:
            say(accelerator, said_shape)
    from accelerate.utils import set_seed

    set_seed(t.seed)
    threads = set_cpu_threads(t.cpu_threads, accelerator)  # (count, why) on CPU runs
    kept = keep_freed_memory() if t.keep_freed_memory and accelerator.device.type == "cpu" else None
    if accelerator.is_main_process:
        os.makedirs(t.output_dir, exist_ok=True)
        if not changes:  # a changed config is written once the resumed step is known, with its history
            save_config(given, os.path.join(t.output_dir, CONFIG_FILE))
        if resumed_folder is None:  # a run that starts over has no history yet
            write_config_history(t.output_dir, [])
        for name in remove_partial_writes(t.output_dir):
            print(f"removed {os.path.join(t.output_dir, name)}: left by a run killed while writing it", flush=True)
    say(accelerator, f"global batch {shape.said()}"
        + (f", {threads[0]} CPU threads each ({threads[1]})" if threads else "")
    )
    if kept:
        say(accelerator, f"host memory: what PyTorch frees is kept for reuse, for this process's life (malloc: blocks "
                         f"up to {describe_threshold(kept)} from the heap, no trimming; train.keep_freed_memory=false "
                         "for glibc's defaults)")

    stage = zero_stage(accelerator)
    check_combination(cfg, stage, fsdp_version(accelerator))
    refused = flex_training_unsupported(cfg.model.attn_implementation, accelerator.device)
    if refused:
        raise TrainingError(refused)
    with accelerator.main_process_first():
        resolve_source(cfg.model.name_or_path)  # a built-in model is converted once, by the main process
    say(accelerator, precision.said)
    model, tokenizer = load_policy(cfg, accelerator.device, precision.weights)  # together: under ZeRO-3 loading is a collective
    if cfg.model.quantization == "none":
        model.to(accelerator.device)  # a quantized base was loaded onto its device already
    start = record_start(accelerator, model, t.output_dir, resume_from)  # PiSSA/OLoRA only
    dtype = precision.compute
    identity = model_identity(cfg, resolve_source(cfg.model.name_or_path), str(dtype).removeprefix("torch."), accelerator)
    if data:
        train_tok, eval_tok, counts = tokenized_pairs(
            cfg, accelerator, model, tokenizer, identity,
            stop_check=lambda: signals.raise_if_received("while sampling the built-in sentiment set"))
        for line in said_counts(counts):
            say(accelerator, line)
        if cfg.data.responses == "ranking":
            say(accelerator, "data.responses=ranking: an example is one prompt's k responses, best first, with one "
                             "plackett_luce loss; the pair counts, the global batch and the pairs seen count rankings")
        order = DataOrder(len(train_tok), per_device=t.per_device_batch_size, accumulation=t.gradient_accumulation_steps,
                          processes=accelerator.num_processes, seed=t.seed, groups=pair_groups(train_tok))
        total_steps = t.max_steps or t.epochs * order.steps_per_epoch
        if order.repeated_per_epoch:
            say(accelerator, f"each epoch repeats {order.repeated_per_epoch} pairs to fill its last global batch")
        schedule = lr_lambda(total_steps, round(t.warmup_ratio * total_steps), t.lr_scheduler)
    else:  # the caller gives the pairs later, a set at a time (rounds), each with its steps' window of the schedule
        train_tok = eval_tok = order = None
        counts, total_steps, windows = {}, 0, []
        schedule = windowed_lr_lambda(windows, t.warmup_ratio, t.lr_scheduler)
    configure_deepspeed(accelerator, per_device_batch_size=t.per_device_batch_size,
                        gradient_accumulation_steps=t.gradient_accumulation_steps, max_grad_norm=t.max_grad_norm,
                        dtype=dtype)
    optimizer = build_optimizer(model, cfg, grad_scaler=accelerator.scaler is not None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)  # stepped here once per optimizer step, not by Accelerate
    if uses_fsdp() or fsdp_version(accelerator):
        say(accelerator, fsdp_summary(model, accelerator))
    if cfg.lora.enabled and not stage and not fsdp_version(accelerator):  # ZeRO, FSDP: sharded, every weight
        adapter_only_checkpoints(accelerator, model)
    try:
        packed, said = choose_packing(t.packing, model, share_prompt=t.share_prompt)
        layout, said_layout = choose_attention_layout(t.attention_layout, model, accelerator.device, packed=packed)
    except ValueError as error:
        raise TrainingError(str(error)) from None
    say(accelerator, said)
    if said_layout:
        say(accelerator, said_layout)
    block = FLEX_BLOCK if base_model(model).config._attn_implementation == "flex_attention" else None
    collator = (PackedPairCollator(tokenizer.pad_token_id, share_prompt=t.share_prompt, pad_to_multiple_of=block,
                                   attention_layout=layout)
                if packed else PreferenceCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=block))
    if cfg.reference.mode == "precomputed" and data:  # after prepare: under ZeRO-3 every rank serves its shard
        train_tok, eval_tok = attach_reference(cfg, accelerator, model, tokenizer, identity, train_tok, eval_tok,
                                               collator=collator, autocast=precision.autocast, start=start,
                                               stop_check=lambda where: signals.stop_if_asked(accelerator, where))
    reference_model = None
    if cfg.reference.mode == "online":  # LoRA: the policy with adapters off; full: a frozen copy, sharded under ZeRO-3
        reference_model = model if cfg.lora.enabled else prepare_frozen(
            load_reference_copy(cfg, accelerator.device, precision.weights), accelerator)

    state = TrainState()
    if resume_from:
        state = load_checkpoint(accelerator, resume_from, adapter_only=cfg.lora.enabled)
        take_hyperparameters(scheduler, cfg)  # this config's learning rate, not the checkpoint's
        say(accelerator, f"resumed from {resume_from} at step {state.global_step} ({state.global_step * shape.global_batch} "
                         "pairs seen)")
    state.shape = record(shape)  # what this run's checkpoints are written with
    if changes and accelerator.is_main_process:
        history = read_config_history(resumed_folder) + [history_entry(state.global_step, changes)]
        write_config_history(t.output_dir, history)
        save_config(given, os.path.join(t.output_dir, CONFIG_FILE))
        print(f"config changed at step {state.global_step}: {', '.join(c.said() for c in changes)}; the new values "
              f"hold from step {state.global_step + 1} (recorded in {os.path.join(t.output_dir, HISTORY_FILE)})",
              flush=True)
    accelerator.wait_for_everyone()  # every process has read the checkpoints before any is moved
    if accelerator.is_main_process:
        moved = set_aside_later_checkpoints(t.output_dir, state.global_step)
        if moved:
            print(f"{', '.join(moved)} (from a run that went past step {state.global_step}, not continued) moved to "
                  f"{os.path.join(t.output_dir, ABANDONED)}/", flush=True)
    sample_prompts = held_out_prompts(eval_tok, t.sample_prompts) if t.sample_prompts and eval_tok is not None else []
    if t.sample_prompts:
        say(accelerator, f"samples: completions of the first {len(sample_prompts)} held-out prompts (of "
                          f"train.sample_prompts={t.sample_prompts}) at each sampling step, to samples.jsonl")
    metrics = MetricsLog(t.output_dir, accelerator, resume_step=state.global_step)
    if t.report_to:
        accelerator.init_trackers("dpo_dist", config=flat_config(cfg))
    return Run(cfg, accelerator, precision, model, tokenizer, optimizer, scheduler, train_tok, eval_tok, counts, order,
               total_steps, reference_model, state, metrics, collator, sample_prompts,
               windows=None if data else windows)


def train(cfg: Config) -> dict[str, Any]:
    """Run DPO training as configured; returns the metric records, the final state and the pair counts.

    SIGUSR1/SIGTERM (preemption) are recorded from the start: before the first step they stop the run cleanly
    (nothing to checkpoint), after it they checkpoint the current step and stop (:class:`Preempted` either way)."""
    if cfg.rounds.count > 1:
        raise TrainingError(f"rounds.count={cfg.rounds.count}: iterative rounds run through "
                            "dpo_dist.rounds.loop.train_rounds (launch/train.py picks it)")
    signals = StopSignals(grace_s=cfg.train.stop_grace_s)
    lock = OutputLock(cfg.train.output_dir)
    try:
        try:
            run = setup(cfg, signals, lock)
            t, accelerator, state = run.cfg.train, run.accelerator, run.state  # run.cfg: resumed on another shape
            signals.stop_if_asked(accelerator, "during setup")
            if t.debug:
                torch.autograd.set_detect_anomaly(True)
                say(accelerator, show_pair(run.train_tok[0], run.tokenizer))
            bar = progress(run.total_steps, "DPO", unit="step", initial=state.global_step, end_line=True,
                           shown=accelerator.is_main_process and t.progress_bar)
            run.model.train()
            try:
                loop(run, bar, signals)
            finally:
                bar.close()
        finally:
            signals.close()
        finish(run)
    finally:
        lock.release()  # the run has ended, cleanly or not; a killed one leaves the lock, recognised as stale
    return {"records": run.metrics.records, "state": state, "counts": run.counts, "output_dir": t.output_dir}


def loop(run: Run, bar: Any, signals: StopSignals) -> None:
    """Optimizer steps until the end, early stopping, or a stop signal (then a checkpoint and :class:`Preempted`)."""
    cfg, t, accelerator, state = run.cfg, run.cfg.train, run.accelerator, run.state
    stop_reason = stopped_early(state, cfg)  # resumed from where it stopped early: only the export is left
    while state.global_step < run.total_steps and stop_reason is None:
        started = time.perf_counter()
        micro_batches = [to_device(run.collator([run.train_tok[i] for i in indices]), accelerator.device)
                         for indices in run.order.micro_batches(state.global_step, accelerator.process_index)]
        lr = run.scheduler.get_last_lr()[0]
        record = train_step(run.model, run.optimizer, micro_batches, cfg, accelerator, run.reference_model)
        step = state.global_step + 1
        applied = bool(record.pop("update_applied"))
        if not is_finite(record["loss"], record["grad_norm"]):
            said = check_step(step, record, applied=applied, loss_scaling=run.precision.loss_scaling, cfg=cfg)
            say(accelerator, said)  # a skipped fp16 overflow; anything else raised
        else:
            diverged = watch_divergence(accelerator, run.model, state, step, record, lr, cfg)
            if diverged:
                raise diverged
        run.scheduler.step()
        state.global_step, state.pairs_seen = step, step * run.order.global_batch
        tokens, elapsed = record.pop("tokens"), time.perf_counter() - started
        record = {"step": step, **run.record_extra, "epoch": (step - run.order.first_step) / run.order.steps_per_epoch,
                  **record, "lr": lr,
                  "tokens/s": tokens / elapsed, "step_time_s": elapsed, "examples_seen": state.pairs_seen}
        improved = False
        evaluated = run.eval_tok is not None and (step == run.total_steps or bool(t.eval_every and step % t.eval_every == 0))
        if evaluated:
            record.update(evaluate(run.model, run.eval_tok, cfg, accelerator, run.reference_model, run.collator))
            improved, stop_reason = track_best(state, record, cfg)
        run.metrics.write(record)
        if run.sample_prompts and sampling_step(step, run.total_steps, evaluated, cfg):
            run.metrics.write_samples(generate_samples(run.model, run.tokenizer, run.sample_prompts, cfg, accelerator, step))
        saved = (bool(t.save_every and step % t.save_every == 0)
                 or improved and bool(t.save_every or t.early_stopping_patience))  # early stopping exports the best
        if saved:
            if improved:
                state.best_checkpoint = os.path.join(t.output_dir, f"checkpoint-{step}")
            save_checkpoint(accelerator, t.output_dir, state, keep_last=t.keep_last, adapter_only=cfg.lora.enabled)
        if step < run.total_steps and stop_reason is None and signals.agreed(accelerator):
            if not saved:
                save_checkpoint(accelerator, t.output_dir, state, keep_last=t.keep_last, adapter_only=cfg.lora.enabled)
            accelerator.end_training()
            by = signals.by()
            raise Preempted(f"stopped by {by} after step {step}: checkpoint written to "
                            f"{os.path.join(t.output_dir, f'checkpoint-{step}')}; run the same command again "
                            "(train.resume=auto) to continue from it")
        if t.debug and step <= 3 and accelerator.is_main_process:
            bar.write(f"debug: step {step} took {time.perf_counter() - started:.2f} s, peak memory so far "
                      f"{peak_memory_gb(accelerator.device):.2f} GiB ({accelerator.device.type})")
        bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['rewards/accuracies']:.2f}", refresh=False)
        bar.update(1)
    if stop_reason:
        say(accelerator, stop_reason)


def finish(run: Run) -> None:
    """The final state as a checkpoint (so that a failed export is retried by the same command), the final model,
    summary and plot."""
    t, accelerator = run.cfg.train, run.accelerator
    checkpoint_final_state(accelerator, t.output_dir, run.state, run.cfg)
    final = final_weights(accelerator, run.state, t.output_dir, run.cfg)  # the last step's, or the best checkpoint's
    say(accelerator, final.said)
    save_final_model(accelerator, run.model, run.tokenizer, os.path.join(t.output_dir, "model"),
                     base_config=base_config_values(run.cfg))
    if accelerator.is_main_process:  # the model card (dpo_dist.publish.card) reads it, with metrics.jsonl and config.yaml
        write_run_file(t.output_dir, pairs=run.counts, model_step=final.step, model=final.which)
    drop_final_checkpoint(accelerator, t.output_dir, run.state, run.cfg)
    records = run.metrics.whole()  # from step 1, also when this process resumed the run
    text = summary(records)
    memory = torch.tensor([[peak_memory_gb(accelerator.device), held_state_gb(run.model, run.optimizer)]],
                          device=accelerator.device)
    memory = accelerator.gather(memory).tolist()
    if accelerator.is_main_process:
        with open(os.path.join(t.output_dir, "peak_memory.json"), "w", encoding="utf-8") as handle:
            json.dump({"device": accelerator.device.type, "per_rank_peak_gb": [m[0] for m in memory],
                       "per_rank_state_gb": [m[1] for m in memory]}, handle)
        with open(os.path.join(t.output_dir, "summary.txt"), "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
        if t.plot and records:
            plot(records, os.path.join(t.output_dir, "training_curves.png"))
    if accelerator.is_main_process:  # accelerator.print prints once per node; the records are on the main process
        print(text, flush=True)
        print(f"next: python launch/evaluate.py {t.output_dir}  (win rate and KL against the base) · "
              f"python launch/chat.py {t.output_dir} · python launch/merge.py {t.output_dir}", flush=True)
    accelerator.wait_for_everyone()  # every process done with every collective before any tears its group down
    accelerator.end_training()

