"""Iterative DPO: ``rounds.count`` rounds, each sampling its pairs from the policy of the round's start.

    accelerate launch launch/train.py --config recipes/sentiment_rounds.yaml

``train_rounds(cfg)`` builds the run as training does (``setup(data=False)``: one accelerator, one policy, one
optimizer for all rounds), then for each round r:

1. **sampling**: ``rounds.samples_per_prompt`` completions of every training prompt from the policy, sharded over
   the processes (:func:`dpo_dist.rounds.sampling.sample_round`, cached a batch at a time, keyed by the policy
   and the sampling settings);
2. **judging**: each completion scored alone by the judge (:mod:`dpo_dist.eval.judges`), on the main process; a
   judge that fails, returns NaN or the wrong count stops the run naming the judge and the prompt, before anything
   is written as pairs;
3. **pairing**: each prompt's distinct non-empty completions become a ranked row, paired by ``rounds.pairs`` and
   ``rounds.min_score_gap`` through the data stage's own rules (ties and small gaps dropped and counted);
4. **reference**: the pairs' reference log-probs, from the starting model (``rounds.reference=start``; LoRA: the
   adapters off) or from the policy at the round's start (``previous``), computed once and cached in the round;
5. **training**: ``rounds.steps_per_round`` optimizer steps (or ``train.epochs`` over the pairs), the learning-rate
   schedule restarting each round, the optimizer's moments carried over; a checkpoint at the round's end;
6. **eval**: held-out prompts sampled from the policy and (once) from the starting model at temperature 1; the mean
   judge score, the win rate against the starting model's samples (the i-th against the i-th, drawn with the same
   random numbers) and the KL to the starting model; a line in ``rounds.jsonl``.

A stop signal in any stage ends the process at the stage's next safe point (exit status 75); the same command then
goes on from there: what a stage wrote is whole (:mod:`dpo_dist.rounds.records`), training resumes from its
checkpoint. A finished run, run again, prints its rounds and does nothing else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Iterator

import torch

from dpo_dist.config import Config
from dpo_dist.data.formats import PAIR_CANDIDATES
from dpo_dist.data.load import auto_num_proc, load_train_eval
from dpo_dist.data.order import DataOrder, pair_groups
from dpo_dist.data.prompts import load_prompts
from dpo_dist.data.tokenization import Truncation, tokenize_pairs, tokenize_prompt
from dpo_dist.distributed import gather_in_order, say, shard_indices
from dpo_dist.eval.against_base import kl_estimate, mean_and_stderr, prompt_text
from dpo_dist.eval.judges import JudgeError, build_score_judge, checked_scores, outcomes_from_scores
from dpo_dist.eval.scoring import response_logps
from dpo_dist.model.adapters import policy_as_reference
from dpo_dist.model.generation import Sampling
from dpo_dist.model.load import load_reference_copy, resolve_source
from dpo_dist.progress import progress
from dpo_dist.rounds import records
from dpo_dist.rounds.records import round_dir
from dpo_dist.rounds.sampling import sample_round, sampling_settings
from dpo_dist.distributed import prepare_frozen
from dpo_dist.train.checkpoint import save_checkpoint
from dpo_dist.train.checks import TrainingError
from dpo_dist.train import reference_cache
from dpo_dist.train.inputs import attach_reference
from dpo_dist.train.lock import OutputLock
from dpo_dist.train.metrics import read_run_file
from dpo_dist.train.preemption import Preempted, StopSignals
from dpo_dist.train.reference import as_reference
from dpo_dist.train.trainer import Run, finish, loop, setup

EVAL_SEED_OFFSET = 7919  # the held-out samples' seed: train.seed + this, the same in every round and for the start


def train_rounds(cfg: Config) -> dict[str, Any]:
    """Every round as configured; returns the rounds' lines (and the run's records, state and counts, as
    :func:`dpo_dist.train.trainer.train` does)."""
    t = cfg.train
    done = finished_run(cfg)
    if done is not None:
        return done
    signals = StopSignals(grace_s=t.stop_grace_s)
    lock = OutputLock(t.output_dir)
    try:
        try:
            run = setup(cfg, signals, lock, data=False)
            rounds = Rounds(run, signals)
            for r in range(1, cfg.rounds.count + 1):
                rounds.one_round(r)
        finally:
            signals.close()
        run.counts = run_counts(t.output_dir) if run.accelerator.is_main_process else {}  # run.json: main's
        finish(run)
    finally:
        lock.release()
    lines = records.finished_rounds(t.output_dir)
    say(run.accelerator, records.rounds_table(lines, lines[0]["start_eval_score"] if lines else None))
    return {"records": run.metrics.records, "state": run.state, "counts": run.counts, "output_dir": t.output_dir,
            "rounds": lines}


def finished_run(cfg: Config) -> dict[str, Any] | None:
    """A run whose every round is in rounds.jsonl and whose model is written: its lines, printed; else None."""
    out = cfg.train.output_dir
    lines = records.finished_rounds(out)
    if [line["round"] for line in lines] != list(range(1, cfg.rounds.count + 1)) or not read_run_file(out):
        return None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{out}: all {cfg.rounds.count} rounds are done and model/ is written; nothing to do", flush=True)
        print(records.rounds_table(lines, lines[0].get("start_eval_score")), flush=True)
    return {"records": [], "state": None, "counts": read_run_file(out).get("pairs"), "output_dir": out, "rounds": lines,
            "finished_before": True}


def run_counts(output_dir: str) -> dict[str, Any]:
    """run.json's pair counts: every round's training pairs (each round's own counts are its rounds.jsonl line)."""
    pairs = {line["round"]: line["pairs"] for line in records.finished_rounds(output_dir)}
    return {"train_pairs": sum(pairs.values()), "eval_pairs": 0, "dropped_too_long": 0, "sources": [],
            "rounds": pairs}


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def round_sampling(cfg: Config, r: int) -> Sampling:
    """How round ``r`` samples its training completions: a seed of its own per round."""
    s = cfg.rounds
    return Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, top_k=0,
                    seed=cfg.train.seed + 1_000_003 * r)


def eval_sampling(cfg: Config) -> Sampling:
    """How every round (and the starting model) samples the held-out prompts: the model's own distribution (the KL
    estimate needs it), the same random numbers each time."""
    return Sampling(max_new_tokens=cfg.rounds.max_new_tokens, seed=cfg.train.seed + EVAL_SEED_OFFSET)


class Rounds:
    """The rounds of one run: its prompts, judge and starting model, and what each round has written."""

    def __init__(self, run: Run, signals: StopSignals):
        self.run, self.signals = run, signals
        cfg, accelerator = run.cfg, run.accelerator
        self.cfg, self.accelerator, self.out = cfg, accelerator, cfg.train.output_dir
        self.truncation = Truncation(cfg.data.max_length, cfg.data.max_prompt_length)
        with accelerator.local_main_process_first():
            prompts = load_prompts(cfg)
        for line in prompts.lines:
            say(accelerator, line)
        self.train_prompts, self.train_ids = self.tokenized(prompts.train, "training")
        self.eval_prompts, self.eval_ids = self.tokenized(prompts.held_out, "held-out")
        say(accelerator, f"rounds: {cfg.rounds.count} rounds of {len(self.train_ids)} training prompts x "
                         f"{cfg.rounds.samples_per_prompt} completions, judged by {cfg.rounds.judge}; each round "
                         f"evaluated on {len(self.eval_ids)} held-out prompts x {cfg.rounds.eval_samples_per_prompt}")
        self._judge = None
        dtype = str(run.precision.compute).removeprefix("torch.")
        self.start_identity = (reference_cache.model_identity(  # main process only (hashing the weights once)
            resolve_source(cfg.model.name_or_path), revision=cfg.model.revision, dtype=dtype,
            quantization=cfg.model.quantization) if accelerator.is_main_process else None)
        self.start_copy = None
        if not cfg.lora.enabled:  # full fine-tuning: a frozen copy of the starting model, for the KL and the reference
            self.start_copy = run.reference_model or prepare_frozen(
                load_reference_copy(cfg, accelerator.device, run.precision.weights), accelerator)
            say(accelerator, "rounds with full fine-tuning hold a frozen copy of the starting model: each round's KL "
                             "(and rounds.reference=start) is measured against it")

    def tokenized(self, prompts: list[Any], which: str) -> tuple[list[Any], list[list[int]]]:
        """The prompts that leave room for a response within ``data.max_length``, and their token ids as training
        tokenizes them; the others are dropped and said."""
        kept, ids = [], []
        for prompt in prompts:
            tokens = tokenize_prompt(prompt, self.run.tokenizer, self.truncation)
            if tokens is not None:
                kept.append(prompt)
                ids.append(tokens)
        if len(kept) < len(prompts):
            say(self.accelerator, f"{len(prompts) - len(kept)} {which} prompts dropped: they leave no room for a "
                                  f"response within data.max_length={self.cfg.data.max_length}")
        if not kept:
            raise TrainingError(f"no {which} prompt is left to sample from (see above)")
        return kept, ids

    # -- the pieces every stage uses ------------------------------------------------------------------------------

    def judge(self) -> Any:
        """The judge, built on first use, on the main process only (it judges alone)."""
        if self._judge is None:
            s = self.cfg.rounds
            self._judge = build_score_judge(s.judge, self.accelerator.device, template=s.judge_template,
                                            quantization=s.judge_quantization, batch_size=s.judge_batch_size)
        return self._judge

    def on_main(self, work: Callable[[], Any], r: int) -> Any:
        """``work()`` on the main process; its result, or its error as one line, on every process."""
        from accelerate.utils import broadcast_object_list

        result, error = None, None
        if self.accelerator.is_main_process:
            try:
                result = work()
            except (JudgeError, ValueError, OSError) as failure:
                error = f"round {r}: {failure}"
        result, error = broadcast_object_list([result, error])
        if error is not None:
            raise TrainingError(error)
        return result

    def stop_here(self, r: int, where: str) -> None:
        """A collective: every process stops (:class:`Preempted`) if any was signalled."""
        if self.signals.agreed(self.accelerator):
            raise Preempted(f"stopped by {self.signals.by()} in round {r}, {where}: what the round has written so far "
                            f"is kept in {round_dir(self.out, r)}; run the same command again to continue from there")

    def texts(self, completions: list[list[list[int]]]) -> list[list[str]]:
        decode = self.run.tokenizer.batch_decode
        return [decode(responses, skip_special_tokens=True) for responses in completions]

    @contextlib.contextmanager
    def starting_model(self) -> Iterator[Any]:
        """The starting model to generate and score with: LoRA, the policy with its adapters off; full fine-tuning,
        the frozen copy."""
        if self.start_copy is not None:
            model = getattr(self.start_copy, "module", self.start_copy)
            with as_reference(model):
                yield model
            return
        with as_reference(self.accelerator.unwrap_model(self.run.model)) as model:
            yield model

    @contextlib.contextmanager
    def policy(self) -> Iterator[Any]:
        model = self.accelerator.unwrap_model(self.run.model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                yield model
        finally:
            model.train(was_training)

    def sample(self, model: Any, ids: list[list[int]], n: int, sampling: Sampling, folder: str,
               key_parts: dict, r: int) -> list[list[list[int]]]:
        key = digest({**key_parts, **sampling_settings(ids, n=n, sampling=sampling,
                                                       batch_size=self.cfg.rounds.generation_batch_size)})
        result = sample_round(model, self.run.tokenizer, ids, n=n, sampling=sampling,
                              batch_size=self.cfg.rounds.generation_batch_size, accelerator=self.accelerator,
                              cache_dir=os.path.join(folder, f"samples-{key}"),
                              stop_check=lambda where: self.stop_here(r, where),
                              show_progress=self.cfg.train.progress_bar)
        return result.completions

    def logps(self, model: Any, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
        """Each response's summed log-prob under ``model``, sharded over the processes (every process runs the same
        number of forwards: under ZeRO-3 and FSDP2 each is a collective). Shape: -> (N,)."""
        shard = shard_indices(len(prompts), self.accelerator)
        local = response_logps(model, [prompts[i] for i in shard], [responses[i] for i in shard],
                               batch_size=self.cfg.train.eval_batch_size, device=self.accelerator.device,
                               pad_id=self.run.tokenizer.pad_token_id or 0)
        return gather_in_order(local.to(self.accelerator.device), len(prompts), self.accelerator).cpu()

    def timed(self, r: int, stage: str, start: float) -> None:
        if self.accelerator.is_main_process:
            records.add_seconds(self.out, r, stage, time.perf_counter() - start)

    # -- one round ------------------------------------------------------------------------------------------------

    def plan(self, r: int) -> dict[str, Any]:
        """The round's plan.json, written at its start: its first step and the policy it samples from (the starting
        model, or the checkpoint the previous round ended with, by its manifest's digest)."""
        path = os.path.join(round_dir(self.out, r), "plan.json")

        def make() -> dict[str, Any]:
            plan = records.read_json(path)
            if plan is None:
                first = self.run.state.global_step
                if r == 1:
                    policy = {"start": self.start_identity}
                else:
                    manifest = os.path.join(self.out, f"checkpoint-{first}", "manifest.json")
                    with open(manifest, "rb") as handle:
                        policy = {"checkpoint": f"checkpoint-{first}",
                                  "manifest_sha256": hashlib.sha256(handle.read()).hexdigest()}
                plan = {"round": r, "first_step": first, "policy": policy, "steps": None}
                records.write_json(path, plan)
            return plan

        return self.on_main(make, r)

    def one_round(self, r: int) -> None:
        finished = self.on_main(lambda: any(line["round"] == r for line in records.finished_rounds(self.out)), r)
        plan = self.plan(r)  # a finished round's, as written at its start and once its pairs were made
        if finished:
            self.window(plan["first_step"], plan["steps"])
            return
        first = plan["first_step"]
        if self.run.state.global_step < first:
            raise TrainingError(f"round {r} starts at step {first}, but the run resumed at step "
                                f"{self.run.state.global_step}: its checkpoint-{first} is missing")
        folder = round_dir(self.out, r)
        trained = plan["steps"] is not None and self.run.state.global_step >= first + plan["steps"]
        if not trained:
            train_tok = self.pairs_of_round(r, plan)
            plan = self.train(r, plan, train_tok)
        else:
            self.window(first, plan["steps"])
        self.evaluate(r, plan, folder)

    def pairs_of_round(self, r: int, plan: dict[str, Any]) -> Any:
        """Stages 1-4: the round's tokenized training pairs with their reference log-probs."""
        folder, cfg = round_dir(self.out, r), self.cfg
        ranked = os.path.join(folder, "ranked.jsonl")
        have_pairs = self.on_main(lambda: os.path.isfile(ranked), r)
        if not have_pairs:
            if self.run.state.global_step > plan["first_step"]:
                raise TrainingError(f"round {r}: {ranked} is missing, but the run has trained past the round's "
                                    "start: its pairs cannot be sampled again from the policy they came from")
            started = time.perf_counter()
            with self.policy() as model:
                completions = self.sample(model, self.train_ids, cfg.rounds.samples_per_prompt,
                                          round_sampling(cfg, r), folder, {"policy": plan["policy"]}, r)
            self.timed(r, "sampling", started)
            self.stop_here(r, "after sampling")
            started = time.perf_counter()
            self.on_main(lambda: self.judge_and_rank(r, completions), r)
            self.timed(r, "judging", started)
            self.stop_here(r, "after judging")
        started = time.perf_counter()
        train_tok = self.load_pairs(r)
        self.timed(r, "pairing", started)
        started = time.perf_counter()
        train_tok = self.reference(r, plan, train_tok)
        self.timed(r, "reference", started)
        return train_tok

    def judge_and_rank(self, r: int, completions: list[list[list[int]]]) -> None:
        """Main process: every completion's score (samples.jsonl), then each prompt's distinct non-empty completions
        with their scores (ranked.jsonl, what pairs are made from) and what was left out (ranked.json)."""
        folder = round_dir(self.out, r)
        texts = self.texts(completions)
        judge = self.judge()
        n = self.cfg.rounds.samples_per_prompt
        scores = self.scores(self.train_prompts, completions)
        samples, ranked = [], []
        left_out = {"duplicate_completions": 0, "empty_completions": 0, "prompts_with_fewer_than_2": 0,
                    "tied_prompts": 0, "tied_pairs": 0}
        for i, prompt in enumerate(self.train_prompts):
            group = list(zip(texts[i], scores[i * n : (i + 1) * n]))
            samples.append({"prompt": prompt, "completions": texts[i], "scores": [s for _, s in group]})
            distinct: dict[str, float] = {}
            for text, score in group:
                if not text.strip():
                    left_out["empty_completions"] += 1
                elif text in distinct:
                    left_out["duplicate_completions"] += 1
                else:
                    distinct[text] = score
            if len(distinct) < 2:
                left_out["prompts_with_fewer_than_2"] += 1
                continue
            if len(set(distinct.values())) == 1:  # all tied: every candidate pair is dropped (the data stage
                left_out["tied_prompts"] += 1     # refuses such a row)
                left_out["tied_pairs"] += len(PAIR_CANDIDATES[self.cfg.rounds.pairs](list(distinct.values())))
                continue
            responses = list(distinct)
            if isinstance(prompt, list):  # a conversation: each completion is the assistant's turn
                responses = [[{"role": "assistant", "content": text}] for text in responses]
            ranked.append({"prompt": prompt, "completions": responses, "scores": list(distinct.values())})
        records.write_lines(os.path.join(folder, "samples.jsonl"), samples)
        records.write_json(os.path.join(folder, "ranked.json"),
                           {**left_out, "judge": judge.name, "mean_score": sum(scores) / len(scores),
                            "completions": len(scores), "prompts_ranked": len(ranked)})
        records.write_lines(os.path.join(folder, "ranked.jsonl"), ranked)  # last: its presence marks the stage done

    def load_pairs(self, r: int) -> Any:
        """The round's pairs, made from ranked.jsonl by the data stage (``rounds.pairs``, ``rounds.min_score_gap``)
        and tokenized as training tokenizes; pairs.jsonl written for the reader, pair_counts.json for the round's
        line."""
        folder, s = round_dir(self.out, r), self.cfg.rounds
        ranked = os.path.join(folder, "ranked.jsonl")
        left_out = self.on_main(lambda: records.read_json(os.path.join(folder, "ranked.json")), r)
        if left_out["prompts_ranked"] == 0:
            raise TrainingError(
                f"round {r}: no pair can be made: no prompt has two distinct completions with different scores "
                f"({left_out['tied_prompts']} prompts' completions all tied, {left_out['prompts_with_fewer_than_2']} "
                f"had fewer than 2 distinct non-empty ones; see {os.path.join(folder, 'samples.jsonl')}): sample more "
                "(rounds.samples_per_prompt, rounds.max_new_tokens, rounds.temperature) or use a finer judge")
        with self.accelerator.local_main_process_first():
            pairs, _, reports = load_train_eval(
                ranked, data_format="ranked", seed=self.cfg.train.seed, on_bad_row="error",
                tokenizer=self.run.tokenizer, pair_rule=s.pairs, min_score_gap=s.min_score_gap, responses="pairs")
            tokenized, too_long = tokenize_pairs(pairs, self.run.tokenizer, self.truncation,
                                                 num_proc=auto_num_proc(self.cfg.data.num_proc, len(pairs)))
        report = reports[0]
        counts = {"pairs": len(tokenized), "dropped_pairs": report.pairs_below_gap + left_out["tied_pairs"],
                  "dropped_too_long": too_long,
                  "prompts_without_pairs": (left_out["prompts_with_fewer_than_2"] + left_out["tied_prompts"]
                                            + report.rows_without_pairs),
                  "duplicate_completions": left_out["duplicate_completions"],
                  "empty_completions": left_out["empty_completions"], "mean_score": left_out["mean_score"],
                  "judge": left_out["judge"]}
        if self.accelerator.is_main_process:
            records.write_lines(os.path.join(folder, "pairs.jsonl"), [
                {key: pair[key] for key in pair if key not in ("row", "part")} for pair in pairs])
            records.write_json(os.path.join(folder, "pair_counts.json"), counts)  # for the round's line
        say(self.accelerator, f"round {r}: {counts['pairs']} pairs by {s.pairs} ({counts['dropped_pairs']} dropped: "
                              f"tied or a gap below rounds.min_score_gap={s.min_score_gap:g}; "
                              f"{counts['prompts_without_pairs']} prompts without a pair; {too_long} too long)")
        if len(tokenized) == 0:
            raise TrainingError(f"round {r}: no pair was made: every prompt's completions tied, were too close "
                                f"(rounds.min_score_gap={s.min_score_gap:g}) or too long; see "
                                f"{os.path.join(folder, 'samples.jsonl')}")
        return tokenized

    def reference(self, r: int, plan: dict[str, Any], train_tok: Any) -> Any:
        """The pairs with their reference log-probs (``rounds.reference``), cached in the round's folder."""
        cfg, run = self.cfg, self.run
        if cfg.reference.mode != "precomputed":
            return train_tok  # online: the start (LoRA: adapters off; full: the frozen copy) at every step
        which = cfg.rounds.reference if r > 1 else "start"  # at round 1 the policy is the starting model
        where = dataclasses.replace(cfg, reference=dataclasses.replace(
            cfg.reference, cache_dir=os.path.join(round_dir(self.out, r), "reference")))
        identity = ({"rounds_reference": which, "policy": plan["policy"], "start": self.start_identity}
                    if self.accelerator.is_main_process else None)
        model = run.model
        keep = contextlib.nullcontext()
        if which == "start" and self.start_copy is not None:
            model = getattr(self.start_copy, "module", self.start_copy)  # a frozen DeepSpeed engine's module
        elif which == "previous":
            keep = policy_as_reference(run.model)
        with keep:
            (train_tok,) = attach_reference(where, self.accelerator, model, run.tokenizer, identity, train_tok,
                                            collator=run.collator, autocast=run.precision.autocast,
                                            stop_check=lambda stage: self.stop_here(r, "computing the reference"))
        return train_tok

    def window(self, first: int, steps: int) -> None:
        """The round's window of the learning-rate schedule (once), and the current step's rate from it."""
        windows, scheduler = self.run.windows, self.run.scheduler
        if (first, steps) not in windows:
            windows.append((first, steps))
            windows.sort()
        values = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, value in zip(scheduler.optimizer.param_groups, values):
            group["lr"] = value
        scheduler._last_lr = values

    def train(self, r: int, plan: dict[str, Any], train_tok: Any) -> dict[str, Any]:
        """Stage 5: the round's optimizer steps, then a checkpoint of the round's end; the plan with its steps."""
        cfg, run, t = self.cfg, self.run, self.cfg.train
        first = plan["first_step"]
        order = DataOrder(len(train_tok), per_device=t.per_device_batch_size,
                          accumulation=run.cfg.train.gradient_accumulation_steps,
                          processes=self.accelerator.num_processes, seed=t.seed + r, groups=pair_groups(train_tok),
                          first_step=first)
        steps = cfg.rounds.steps_per_round or t.epochs * order.steps_per_epoch
        if plan["steps"] is None:
            plan = {**plan, "steps": steps}
            self.on_main(lambda: records.write_json(os.path.join(round_dir(self.out, r), "plan.json"), plan), r)
        self.window(first, plan["steps"])
        run.train_tok, run.order, run.total_steps = train_tok, order, first + plan["steps"]
        run.record_extra = {"round": r}
        started = time.perf_counter()
        bar = progress(plan["steps"], f"round {r}: DPO", unit="step", initial=run.state.global_step - first,
                       end_line=True, shown=self.accelerator.is_main_process and t.progress_bar)
        run.model.train()
        try:
            loop(run, bar, self.signals)
        finally:
            bar.close()
        end = os.path.join(self.out, f"checkpoint-{run.total_steps}")
        if not self.on_main(lambda: os.path.isdir(end), r):
            save_checkpoint(self.accelerator, self.out, run.state, keep_last=max(t.keep_last, 1),
                            adapter_only=cfg.lora.enabled)
        self.timed(r, "training", started)
        self.stop_here(r, "after training (its checkpoint is written)")
        return plan

    def start_samples(self) -> tuple[list[list[list[int]]], list[float]]:
        """The starting model's held-out samples and their scores, made once (round-0/)."""
        folder = round_dir(self.out, 0)
        with self.starting_model() as model:
            samples = self.sample(model, self.eval_ids, self.cfg.rounds.eval_samples_per_prompt,
                                  eval_sampling(self.cfg), folder, {"policy": "start"}, 0)
        path = os.path.join(folder, "scores.json")

        def scored() -> list[float]:
            kept = records.read_json(path)
            if kept is None:
                kept = self.scores(self.eval_prompts, samples)
                records.write_json(path, kept)
            return kept

        return samples, self.on_main(scored, 0)

    def scores(self, prompts: list[Any], samples: list[list[list[int]]]) -> list[float]:
        """The judge's score of every completion (``samples[i]``: prompt i's), flat, in order; model judges batch
        them (``rounds.judge_batch_size``)."""
        texts = self.texts(samples)
        return checked_scores(self.judge(), [prompt_text(p) for p, group in zip(prompts, texts) for _ in group],
                              [text for group in texts for text in group])

    def evaluate(self, r: int, plan: dict[str, Any], folder: str) -> None:
        """Stage 6: the policy on the held-out prompts against the starting model; the round's line."""
        cfg = self.cfg
        started = time.perf_counter()
        start_samples, start_scores = self.start_samples()
        with self.policy() as model:
            samples = self.sample(model, self.eval_ids, cfg.rounds.eval_samples_per_prompt, eval_sampling(cfg),
                                  folder, {"policy": f"end of round {r}", "step": plan["first_step"] + plan["steps"]},
                                  r)
        n = cfg.rounds.eval_samples_per_prompt
        prompts = [ids for ids in self.eval_ids for _ in range(n)]
        flat = [response for group in samples for response in group]
        with self.policy() as model:
            policy_logps = self.logps(model, prompts, flat)
        with self.starting_model() as model:
            start_logps = self.logps(model, prompts, flat)
        groups = [i for i in range(len(self.eval_ids)) for _ in range(n)]
        self.stop_here(r, "evaluating")

        def judged() -> dict[str, Any]:
            scores = self.scores(self.eval_prompts, samples)
            outcomes = outcomes_from_scores(scores, start_scores)
            score, score_err = mean_and_stderr(scores, groups)
            kl = kl_estimate(policy_logps, start_logps, groups)
            texts, start_texts = self.texts(samples), self.texts(start_samples)
            records.write_lines(os.path.join(folder, "eval_samples.jsonl"), [
                {"prompt": self.eval_prompts[i // n], "completion": texts[i // n][i % n], "score": scores[i],
                 "start_completion": start_texts[i // n][i % n], "start_score": start_scores[i]}
                for i in range(len(scores))])
            result = {"eval_score": score, "eval_score_stderr": score_err,
                      "start_eval_score": sum(start_scores) / len(start_scores),
                      "win_rate": sum(outcomes) / len(outcomes), **kl, "eval_completions": len(scores)}
            records.write_json(os.path.join(folder, "eval.json"), result)
            return result

        result = self.on_main(judged, r)
        self.timed(r, "eval", started)
        if self.accelerator.is_main_process:
            counts = records.read_json(os.path.join(folder, "pair_counts.json"))
            spent = records.read_json(os.path.join(folder, "seconds.json")) or {}
            line = {"round": r, "pairs": counts["pairs"], "dropped_pairs": counts["dropped_pairs"],
                    "mean_score": counts["mean_score"], **result, "seconds": sum(spent.values()),
                    "seconds_by_stage": spent, "first_step": plan["first_step"], "steps": plan["steps"],
                    **{k: counts[k] for k in ("prompts_without_pairs", "duplicate_completions", "empty_completions",
                                              "dropped_too_long", "judge")},
                    "reference": cfg.rounds.reference if r > 1 else "start"}
            records.append_round(self.out, line)
            lines = records.finished_rounds(self.out)
            records.plot_rounds(lines, os.path.join(self.out, records.PLOT_FILE))
            print(f"round {r}: eval score {result['eval_score']:.3f} (start {result['start_eval_score']:.3f}), win "
                  f"rate {result['win_rate']:.3f} against the start, KL {result['kl']:.3f}; "
                  f"{sum(spent.values()):.0f} s", flush=True)
