"""Every fault case the tests inject, as data: a new case is one line here. tests/test_faults.py runs them.

- ``BAD_CONFIG``: a ``section.key=value`` override and a fragment of the ConfigError it must raise (load_config; one
  line and exit status 2 from launch/train.py, checked there for a few).
- ``BAD_MODEL_PATHS``: what is on disk (paths under a temporary folder; a trailing / makes a folder), the
  ``model.name_or_path`` given, and a fragment of the ModelError (exit status 2 from launch/train.py).
- ``GOOD_ROWS``, ``BAD_ROWS``: per data format, a good row, and bad rows with a fragment of the error naming the row
  and the reason that ``data.on_bad_row=skip`` counts; every reason of ``dpo_dist.data.formats.REASONS`` is here.
  Conversational rows are loaded with a tokenizer whose chat template accepts only user and assistant messages
  (``USER_ASSISTANT_ONLY``), so a row it cannot render is a case too.
- ``STOP_SIGNALS``: the signals that make a run checkpoint its step and stop (tests/test_interruptions.py, in
  process; tests/test_slurm.py sends them through SLURM). ``KILL_POINTS``: where a SIGKILL is tested and what must
  survive it.

``{tmp}`` in a path or message is the test's temporary folder.
"""

# (override, fragment of the ConfigError)
BAD_CONFIG = [
    ("train.bogus=1", "unknown config key 'train.bogus'; valid keys here: train.output_dir, train.seed"),
    ("trian.max_steps=1", "unknown config key 'trian'; valid keys here: model, lora, data"),
    ("train.max_steps=1.5", "train.max_steps: 1.5 is not int or null"),
    ("train.max_steps=true", "train.max_steps: True is not int or null"),
    ("loss.loss_type=dpo", "loss.loss_type: 'dpo' is not one of sigmoid, robust, hinge, ipo, ipo_sum, simpo"),
    ("train.adam_betas=[0.9, x]", "train.adam_betas[1]: 'x' (str) is not float"),
    ("loss.beta=1e-3x", "loss.beta: '1e-3x' (str) is not float"),
    ("train.attention_layout=sparse", "train.attention_layout: 'sparse' is not one of auto, dense, segmented"),
    ("train.keep_freed_memory=maybe", "train.keep_freed_memory: 'maybe' (str) is not bool"),
    ("train", "override 'train' should look like section.key=value"),
    ("train=3", "train is a section"),
    ("train.max_steps=0", "train.max_steps must be positive"),
    ("data.max_prompt_length=600", "data.max_prompt_length (600) must be below data.max_length (512)"),
    ("loss.loss_type=simpo", "simpo is reference-free: set reference.mode=none"),
    ("loss.loss_type=orpo", "orpo is reference-free: set reference.mode=none"),
    ("loss.loss_type=[sigmoid, dpo]", "loss.loss_type[1]: 'dpo' is not one of sigmoid, robust, hinge, ipo, ipo_sum, simpo, exo_pair"),
    ("loss.loss_weights=[0.8, 0.2]", "loss.loss_weights has 2 weights for the 1 loss types in loss.loss_type (['sigmoid'])"),
    ("loss.loss_type=exo_pair", "loss.loss_type exo_pair needs loss.label_smoothing above 0"),
    ("loss.f_divergence_type=kl", "loss.f_divergence_type: 'kl' is not one of reverse_kl, forward_kl, js_divergence"),
    ("loss.ld_alpha=1.5", "loss.ld_alpha must be in [0, 1], got 1.5"),
    ("reference.sync_ref_model=true", "reference.sync_ref_model: TR-DPO's moving reference"),
    ("loss.ref_model_mixup_alpha=0.6", "precomputed reference log-probs (reference.mode=precomputed) are computed once"),
    ("train.report_to=[neptune]", "unknown tracker 'neptune'"),
    ("train.resume=/nonexistent", "train.resume must be auto, never, or a checkpoint folder"),
    ("train.metric_for_best=eval/acc", "train.metric_for_best 'eval/acc' is not one of eval/loss, eval/rewards/chosen"),
    ("data.sentiment.num_prompts=500", "data.sentiment.num_prompts must be in [1, 240], got 500"),
    ("data.sentiment.completions_per_prompt=1", "data.sentiment.completions_per_prompt must be at least 2"),
    # YAML reads .nan and .inf as floats; every float option refuses them (tests/test_faults.py tries each)
    ("loss.beta=.nan", "loss.beta must be a finite number, got nan"),
    ("loss.beta=.inf", "loss.beta must be a finite number, got inf"),
    ("train.learning_rate=-.inf", "train.learning_rate must be a finite number, got -inf"),
    ("train.adam_betas=[0.9, .nan]", "train.adam_betas[1] must be a finite number, got nan"),
    ("data.sentiment.min_score_gap=.nan", "data.sentiment.min_score_gap must be a finite number, got nan"),
    ("train.learning_rate=-1", "train.learning_rate must not be negative, got -1.0"),
    ("train.weight_decay=-0.1", "train.weight_decay must not be negative, got -0.1"),
    ("loss.rpo_alpha=-1", "loss.rpo_alpha must not be negative, got -1.0"),
    ("train.seed=-1", "train.seed must not be negative, got -1"),
    ("train.adam_betas=[0.9, 1.0]", "train.adam_betas must be two numbers in [0, 1), got [0.9, 1.0]"),
    ("train.max_grad_norm=0", "train.max_grad_norm must be positive, got 0.0"),
    ("train.collective_timeout_s=0", "train.collective_timeout_s must be positive, got 0"),
    ("train.stop_grace_s=0", "train.stop_grace_s must be positive, got 0"),
    ("lora.alpha=0", "lora.alpha must be positive, got 0"),
    ("lora.dropout=1", "lora.dropout must be in [0, 1), got 1.0"),
    ("data.sentiment.min_score_gap=2", "data.sentiment.min_score_gap must be in [0, 2), got 2.0"),
    ("model.attn_implementation=flash_attn", "model.attn_implementation: 'flash_attn' is not one of eager, sdpa, "
     "flash_attention_2, flash_attention_3, flash_attention_4, flex_attention or null"),
    ("data.responses=ranking", "loss.loss_type=sigmoid is pairwise (one term per chosen/rejected pair): it needs "
                               "data.responses=pairs; a ranking of k responses takes plackett_luce"),
    ("data.pair_rule=best", "data.pair_rule: 'best' is not one of best_vs_worst, best_vs_rest, all_pairs"),
    ("data.min_score_gap=-1", "data.min_score_gap must not be negative, got -1"),
    ("data.columns.chosen=prompt", "data.columns.prompt and data.columns.chosen both name the field 'prompt'"),
    ("data.columns.answer=x", "unknown config key 'data.columns.answer'; valid keys here: data.columns.prompt"),
]

# (paths to create under {tmp}, model.name_or_path, fragment of the ModelError)
BAD_MODEL_PATHS = [
    ([], "{tmp}/no-such-model", "model.name_or_path: {tmp}/no-such-model does not exist (not a local folder, and not "
                                "a Hub id, which looks like org/name)"),
    ([], "~/no-such-model", "model.name_or_path: ~/no-such-model does not exist"),
    (["empty/"], "{tmp}/empty", "model.name_or_path: no model in {tmp}/empty (no config.json or adapter_config.json)"),
    (["run/metrics.jsonl", "run/model/config.json"], "{tmp}/run",
     "no model in {tmp}/run (no config.json or adapter_config.json); the model folders in it: {tmp}/run/model"),
    (["model.safetensors"], "{tmp}/model.safetensors",
     "model.name_or_path: {tmp}/model.safetensors is a file; give the folder that holds config.json"),
]

# A good row of each format; bad rows are written between good ones.
GOOD_ROWS = {
    "text": {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"},
    "hh": {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"},
    "conversational": {"prompt": [{"role": "user", "content": "2+2?"}],
                       "chosen": [{"role": "assistant", "content": "4"}],
                       "rejected": [{"role": "assistant", "content": "5"}]},
    "ranked": {"prompt": "Q: 2+2?", "completions": [" 4", " 5", " four"], "scores": [9, 2, 8.5]},
}
USER = {"role": "user", "content": "2+2?"}
SAYS_4, SAYS_5 = {"role": "assistant", "content": "4"}, {"role": "assistant", "content": "5"}

# (format, bad row, fragment of the error that names the row, the reason skip counts)
BAD_ROWS = [
    ("text", {"prompt": "p", "chosen": "a"}, "missing field 'rejected'", "missing_field"),
    ("text", {"prompt": "p", "chosen": "a", "rejected": 3}, "field 'rejected' should be str, got int", "wrong_type"),
    ("text", {"prompt": "p", "chosen": "  ", "rejected": "b"}, "chosen response is empty", "empty_response"),
    ("text", {"prompt": "p", "chosen": "same", "rejected": "same"}, "chosen is identical to rejected",
     "identical_responses"),
    ("hh", {"chosen": "\n\nHuman: a\n\nAssistant: x"}, "missing field 'rejected'", "missing_field"),
    ("hh", {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
     "chosen and rejected transcripts differ before the last 'Assistant:' turn", "prompts_differ"),
    ("hh", {"chosen": "just text", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "no '\\n\\nAssistant:' in transcript",
     "no_assistant_turn"),
    ("hh", {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: a\n\nAssistant: x"},
     "chosen is identical to rejected", "identical_responses"),
    ("conversational", {"prompt": [USER], "chosen": [{"role": "assistant"}], "rejected": [SAYS_5]},
     "chosen[0] should be a {role, content} message", "wrong_type"),
    ("conversational", {"chosen": [USER, SAYS_4], "rejected": [{"role": "user", "content": "3+3?"}, SAYS_5]},
     "chosen and rejected conversations differ before the final assistant turn", "prompts_differ"),
    ("conversational", {"prompt": [USER], "chosen": [SAYS_4, {"role": "tool", "content": "x"}], "rejected": [SAYS_5]},
     "chosen does not end with an assistant message", "no_assistant_turn"),
    ("conversational", {"chosen": [SAYS_4], "rejected": [SAYS_5]}, "no message before the response", "no_prompt"),
    ("conversational", {"prompt": [USER], "chosen": [{"role": "user", "content": "3+3?"}, SAYS_4],
                        "rejected": [SAYS_5]},
     "the prompt messages are not a prefix of the chosen conversation", "prompt_not_prefix"),
    ("conversational", {"prompt": [{"role": "wizard", "content": "2+2?"}], "chosen": [SAYS_4], "rejected": [SAYS_5]},
     "prompt[0] has role 'wizard'; roles: system, user, assistant, tool", "unknown_role"),
    ("conversational", {"prompt": [USER], "chosen": [USER, SAYS_4], "rejected": [USER]},
     "rejected has no response message after the prompt", "empty_response"),
    ("conversational", {"prompt": [{"role": "system", "content": "Be brief."}, USER], "chosen": [SAYS_4],
                        "rejected": [SAYS_5]},
     "the chat template cannot render this row (roles assistant, system, user): TemplateError: system role not "
     "supported", "template_error"),
    ("ranked", {"prompt": "p", "completions": ["a"], "scores": [1]},
     "completions holds 1 response: a ranked row needs at least 2", "too_few_responses"),
    ("ranked", {"prompt": "p", "chosen": "a", "rejected": []},
     "the rejected list is empty: give at least one rejected response", "too_few_responses"),
    ("ranked", {"prompt": "p", "completions": ["a", "b", "c"], "scores": [1, 2]},
     "scores hold 2 numbers for 3 completions", "scores_length"),
    ("ranked", {"prompt": "p", "completions": ["a", "b"], "scores": [1, float("nan")]},
     "scores[1] is nan: each score must be a finite number", "bad_score"),
    ("ranked", {"prompt": "p", "completions": ["a", "b"], "scores": [1, "2"]},
     "scores[1] is '2': each score must be a finite number", "bad_score"),
    ("ranked", {"prompt": "p", "completions": ["a", "b"], "scores": [1, True]},
     "scores[1] is True: each score must be a finite number", "bad_score"),
    ("ranked", {"prompt": "p", "completions": ["a", "b", "c"], "scores": [3, 3, 3]},
     "every completion has the score 3: no response is better", "scores_tied"),
    ("ranked", {"prompt": "p", "completions": ["a", "b", "a"], "scores": [1, 2, 3]},
     "completions[0] and completions[2] are the same response", "duplicate_responses"),
    ("ranked", {"prompt": "p", "chosen": "b", "rejected": ["a", "b"]},
     "chosen and rejected[1] are the same response", "duplicate_responses"),
    ("ranked", {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 0, 1]},
     "ranking [0, 0, 1] is not a permutation of 0..2 (the completions' indices, best first)", "bad_ranking"),
    ("ranked", {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1]},
     "ranking [0, 1] is not a permutation of 0..2", "bad_ranking"),
    ("ranked", {"prompt": "p", "completions": ["a", "b"], "scores": [1, 2], "ranking": [1, 0]},
     "the row has both scores and a ranking: give one order", "ambiguous_order"),
    ("ranked", {"prompt": "p", "completions": ["a", "b"]},
     "no 'scores' or 'ranking' beside 'completions', nor a 'score' in each completion record", "missing_field"),
    ("ranked", {"prompt": "p", "completions": [{"response": "a", "score": 1}, {"response": "b"}]},
     "completions[1] has no 'score' while completions[0] has one", "missing_field"),
    ("ranked", {"prompt": "p", "completions": ["a", "  "], "scores": [1, 2]}, "completions[1] response is empty",
     "empty_response"),
    ("ranked", {"prompt": "p", "completions": ["a", ["x"]], "scores": [1, 2]},
     "completions[1] should be a string like this dataset's first row's responses, got list", "wrong_type"),
]

# ChatML that accepts only user and assistant, like templates that raise on a system message
USER_ASSISTANT_ONLY = (
    "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
    "{{ raise_exception(m['role'] + ' role not supported') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

STOP_SIGNALS = ("SIGUSR1", "SIGTERM")  # checkpoint the step, exit 75; the same command resumes

# How a user starts training: name -> (accelerate launch arguments before the script, or None for plain python;
# trainer processes). tests/test_signals.py sends every STOP_SIGNAL to the process each form starts.
LAUNCH_FORMS = {
    "python": (None, 1),
    "accelerate": (["--num_processes", "1", "--mixed_precision", "no", "--dynamo_backend", "no"], 1),
    # torchrun's agent without PET_SIGNALS_TO_HANDLE: SIGUSR1 kills it (docs/multi-gpu.md's plain DDP command)
    "accelerate-ddp": (["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                        "--dynamo_backend", "no"], 2),
    "accelerate-zero2": (["--config_file", "accelerate_configs/zero2.yaml", "--num_processes", "2"], 2),
    "accelerate-fsdp2": (["--config_file", "accelerate_configs/fsdp.yaml", "--num_processes", "2"], 2),
}

# where a SIGKILL lands -> what must be left (tests/test_interruptions.py, tests/test_slurm.py)
KILL_POINTS = {
    "inside a checkpoint write (tests/slow_checkpoint_launch.py)": "the previous checkpoint, whole; resume from it",
    "one rank of a multi-node SLURM job": "the whole job fails within a minute, no hang in a collective",
    "a rank stuck in a collective, then SIGTERM (tests/test_signals.py)": "every rank exits within train.stop_grace_s, "
                                                                          "status 124",
    "a full disk during a checkpoint or the export (tests/test_disk.py)": "one line with the bytes needed; the "
                                                                           "previous checkpoint, whole",
}
# Bad only with data.responses=ranking, which needs a strict order of every response (load_pairs(responses=ranking)).
RANKING_BAD_ROWS = [
    ("ranked", {"prompt": "p", "completions": ["a", "b", "c"], "scores": [2, 1, 2]},
     "completions[0] and completions[2] tie at score 2: data.responses=ranking needs a strict order", "partial_order"),
    ("ranked", {"prompt": "p", "chosen": "a", "rejected": ["b", "c"]},
     "one chosen beside 2 rejected orders only the chosen first; data.responses=ranking needs every response in "
     "order", "partial_order"),
]
