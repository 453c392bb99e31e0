"""Judges: how good a response to a prompt is, alone (score judges) or against another (pairwise).

A judge is named by a spec, one of :data:`dpo_dist.config.JUDGE_KINDS` (read by :func:`dpo_dist.config.judge_parts` alone):

- ``sentiment``: VADER's compound sentiment score of each response (the DPO paper's controlled-sentiment task).
- ``reward_model:PATH``: an ``AutoModelForSequenceClassification`` scores prompt + response (through its tokenizer's
  chat template when it has one); one output is the score, two outputs give the log-odds of the second label.
- ``python:MODULE:FUNCTION``: ``FUNCTION(prompts, completions)`` from an importable module returns one number per
  completion: a rule, a regex, a call to a service.
- ``llm:PATH``: a local causal LM. Pairwise (evaluation, :class:`LLMJudge`) it reads the prompt and both responses
  labelled A and B and is scored on answering "A" or "B" (the log-probs of the two answers, no sampling). Which
  response is A is drawn at random for each comparison (seeded), so a judge that prefers a position favours neither
  side on average; the report says how often the judge picked A. As a score judge (rounds, :class:`LLMScoreJudge`)
  it reads one response in a template and its score is log P("Yes") - log P("No").

Every judge answers ``compare(prompts, responses, baseline_responses)`` with one outcome per comparison: 1 when the
first response wins, 0.5 for a tie, 0 when the baseline's wins. A score judge (:class:`ScoreJudge`) also gives each
response's score (``scores``), which the evaluation report averages and plots and iterative rounds pair completions
by; :func:`checked_scores` is the one check of what a score judge returned. :func:`build_judge` builds evaluation's
judges, :func:`build_score_judge` rounds' (``llm:PATH`` scores then).
"""

from __future__ import annotations

import importlib
import math
import numbers
import os
import random
import string
import sys
from typing import Any

import torch

from dpo_dist.config import JUDGE_KINDS, judge_options_unread, judge_parts
from dpo_dist.eval.options import JUDGE_INSTRUCTION
from dpo_dist.eval.scoring import response_logps
from dpo_dist.progress import progress


class JudgeError(ValueError):
    """A judge that cannot be built, or that returned what is not one finite score per completion."""


# What the LLM score judge asks of each completion (rounds.judge_template replaces it): a yes/no question, so that
# the score log P(Yes) - log P(No) says how sure the judge is that the response is good.
SCORE_TEMPLATE = (
    "Read the prompt and the response below. Is the response a good, helpful answer to the prompt or continuation "
    "of it: relevant, accurate, well written and appropriate?\n\n[Prompt]\n{prompt}\n\n[Response]\n{response}\n\n"
    "Is the response good? Answer with one word, Yes or No."
)
QUANTIZATIONS = ("none", "4bit")  # rounds.judge_quantization's values; a model judge's weights (load_judge_model)
SHOWN_CHARS = 80  # of a prompt or completion in a JudgeError's line


def outcomes_from_scores(scores: list[float], baseline_scores: list[float]) -> list[float]:
    """1 where the first score is higher, 0.5 where equal, 0 where lower."""
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores)]


def shown(text: str) -> str:
    """``text`` as an error line shows it: its repr (newlines escaped, so the line stays one line), cut to
    :data:`SHOWN_CHARS` characters."""
    return repr(text[:SHOWN_CHARS]) + ("..." if len(text) > SHOWN_CHARS else "")


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, newlines included, as one space: an error message is one line."""
    return " ".join(text.split())


def checked_scores(judge: Any, prompts: list[str], completions: list[str]) -> list[float]:
    """``judge.scores(prompts, completions)`` as plain floats in order, or a :class:`JudgeError` of one line naming
    the judge and the prompt concerned: the judge raised, returned another count than one score per completion, or a
    score that is not a finite number (a bool or a string is not a number; NaN and inf are refused).

    Why here, once: rounds pair completions by their scores and evaluation compares them; a NaN compares false with
    everything (it would lose every comparison and never make a pair), and a wrong count would pair one completion's
    score with another's. Every judge's scores pass through this check, whatever the judge is.
    """
    if len(prompts) != len(completions):
        raise JudgeError(f"judge {judge.name}: asked to score {len(completions)} completions of {len(prompts)} prompts")
    if not prompts:
        return []
    try:
        raw = judge.scores(prompts, completions)
    except Exception as error:  # noqa: BLE001  any failure of a user's judge becomes the one-line error
        raise JudgeError(f"judge {judge.name} raised {type(error).__name__}: {one_line(str(error))} (scoring "
                         f"{len(prompts)} completions, the first of prompt {shown(prompts[0])})") from error
    if hasattr(raw, "tolist"):  # a tensor or an array of scores
        raw = raw.tolist()
    if not isinstance(raw, (list, tuple)):
        raise JudgeError(f"judge {judge.name} returned a {type(raw).__name__}, not a list of one score per completion "
                         f"(scoring {len(prompts)} completions, the first of prompt {shown(prompts[0])})")
    if len(raw) != len(completions):
        raise JudgeError(f"judge {judge.name} returned {len(raw)} scores for {len(completions)} completions "
                         f"(the first of prompt {shown(prompts[0])})")
    out = []
    for prompt, completion, score in zip(prompts, completions, raw):
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            problem = f"a {type(score).__name__}, {shown(one_line(str(score)))}, not a number"
        elif not math.isfinite(score):
            problem = f"{float(score)!r}, not a finite number"
        else:
            out.append(float(score))
            continue
        raise JudgeError(f"judge {judge.name} scored a completion {problem}: prompt {shown(prompt)}, "
                         f"completion {shown(completion)}")
    return out


class ScoreJudge:
    """A judge that scores each response alone; the higher score wins."""

    name = "score"

    def scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        raise NotImplementedError

    def compare(self, prompts: list[str], responses: list[str], baseline: list[str]) -> tuple[list[float], dict]:
        first, second = checked_scores(self, prompts, responses), checked_scores(self, prompts, baseline)
        return outcomes_from_scores(first, second), {"scores": first, "baseline_scores": second}


class SentimentJudge(ScoreJudge):
    name = "sentiment (VADER compound score, -1 to 1)"

    def scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        from dpo_dist.data.sentiment import vader_scores

        return vader_scores(responses)


def import_function(module_name: str, function_name: str, spec: str) -> Any:
    """``module_name.function_name``, imported, or a :class:`JudgeError` naming ``spec``.

    The current directory is searched last, after the import path: the launchers run as scripts, so the import path
    starts at ``launch/``, not where the run was started, and a judge module beside the user's config would not be
    found (``python -m`` searches there first; here it cannot shadow an installed module)."""
    here = os.getcwd()
    if here not in sys.path and "" not in sys.path:
        sys.path.append(here)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001  not found, or the module failed as it ran
        raise JudgeError(f"judge {spec}: cannot import module {module_name!r} ({type(error).__name__}: "
                         f"{one_line(str(error))}); "
                         "it must be importable from the current directory or PYTHONPATH") from error
    function = getattr(module, function_name, None)
    if not callable(function):
        raise JudgeError(f"judge {spec}: module {module_name} ({getattr(module, '__file__', '?')}) has no function "
                         f"{function_name!r}")
    return function


class FunctionJudge(ScoreJudge):
    """``python:MODULE:FUNCTION``: ``FUNCTION(prompts, completions)`` returns one number per completion (a list, a
    tuple, an array or a tensor), the higher the better; :func:`checked_scores` checks what it returns."""

    def __init__(self, target: str):
        module_name, function_name = target.split(":")
        self.name = f"python:{target}"
        self.function = import_function(module_name, function_name, self.name)

    def scores(self, prompts: list[str], responses: list[str]) -> Any:
        return self.function(list(prompts), list(responses))  # copies: the function cannot change the caller's lists


def load_judge_model(auto_class: Any, path: str, device: torch.device, quantization: str = "none") -> Any:
    """A judge's model from ``path``, in eval mode on ``device``. ``4bit``: its linear layers 4-bit NF4 as the trainer
    loads a QLoRA base (:func:`dpo_dist.model.load.quantization_config`, and its one 4-bit numerics on any CPU,
    :func:`~dpo_dist.model.load.one_4bit_path`), computing in float32 on CPU and bf16 (else fp16) on a GPU."""
    if quantization not in QUANTIZATIONS:
        raise JudgeError(f"judge quantization {quantization!r}: use {' or '.join(QUANTIZATIONS)}")
    if quantization == "none":
        return auto_class.from_pretrained(path).to(device).eval()
    from dpo_dist.model.load import one_4bit_path, quantization_config, resolve_dtype

    compute = resolve_dtype("auto", device)
    model = auto_class.from_pretrained(path, dtype=compute, device_map={"": device},
                                       quantization_config=quantization_config(quantization, compute))
    one_4bit_path(model)
    return model.eval()


class RewardModelJudge(ScoreJudge):
    def __init__(self, path: str, device: torch.device, batch_size: int = 16, quantization: str = "none"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = f"reward model {path}" + (" (4-bit)" if quantization == "4bit" else "")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = load_judge_model(AutoModelForSequenceClassification, path, device, quantization)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.model.config.num_labels not in (1, 2):
            raise JudgeError(f"reward model {path} has {self.model.config.num_labels} outputs: expected 1 (a score) "
                             "or 2 (the log-odds of the second label are the score)")
        self.device, self.batch_size = device, batch_size

    def _text(self, prompt: str, response: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return prompt + response

    @torch.no_grad()
    def scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        out: list[float] = []
        with progress(len(prompts), f"judging: {self.name}", unit="response") as bar:
            for start in range(0, len(prompts), self.batch_size):
                texts = [self._text(p, r) for p, r in zip(prompts[start : start + self.batch_size],
                                                          responses[start : start + self.batch_size])]
                batch = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
                logits = self.model(**batch).logits.float()
                out += (logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]).tolist()
                bar.update(len(texts))
        return out


def judging_text(tokenizer: Any, question: str) -> str:
    """The text an LLM judge reads, ending where its answer begins: ``question`` as a user turn through the chat
    template when the tokenizer has one, else followed by ``Answer:``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return question + "\nAnswer:"


def answer_logps(model: Any, tokenizer: Any, contexts: list[str], answers: tuple[str, ...], *, batch_size: int,
                 device: torch.device, bar: Any) -> list[torch.Tensor]:
    """The summed log-prob of each answer (its tokens) right after each context (:func:`judging_text`), one tensor per
    answer. Without a chat template an answer follows ``Answer:`` after a space, so it is scored as `` Yes``.

    Shape: N contexts, k answers -> k tensors of (N,).
    """
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    lead = " " if not getattr(tokenizer, "chat_template", None) else ""
    ids = [encode(c) for c in contexts]
    return [response_logps(model, ids, [encode(lead + answer)] * len(ids), batch_size=batch_size, device=device,
                           pad_id=tokenizer.pad_token_id or 0, progress=bar) for answer in answers]


class LLMJudge:
    """``llm:PATH`` in evaluation: pairwise, A or B (the module's docstring)."""

    def __init__(self, path: str, device: torch.device, *, seed: int = 0, instruction: str = JUDGE_INSTRUCTION,
                 batch_size: int = 8):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = f"LLM judge {path}"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = load_judge_model(AutoModelForCausalLM, path, device)
        self.device, self.seed, self.instruction, self.batch_size = device, seed, instruction, batch_size

    def context(self, prompt: str, a: str, b: str) -> str:
        """The judging text, ending where the judge's answer (A or B) begins."""
        return judging_text(self.tokenizer, f"{self.instruction}\n\n[Prompt]\n{prompt}\n\n[Response A]\n{a}\n\n"
                                            f"[Response B]\n{b}\n\nWhich response is better? Answer with one letter, "
                                            "A or B.")

    def answer_logps(self, contexts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-prob of answering A and of answering B after each context. Shape: -> (N,), (N,)."""
        with progress(2 * len(contexts), f"judging: {self.name}", unit="answer") as bar:  # A and B after each context
            logp_a, logp_b = answer_logps(self.model, self.tokenizer, contexts, ("A", "B"), batch_size=self.batch_size,
                                          device=self.device, bar=bar)
        return logp_a, logp_b

    def compare(self, prompts: list[str], responses: list[str], baseline: list[str]) -> tuple[list[float], dict]:
        rng = random.Random(self.seed)
        first_is_a = [rng.random() < 0.5 for _ in prompts]
        contexts = [self.context(p, r, b) if flip else self.context(p, b, r)
                    for p, r, b, flip in zip(prompts, responses, baseline, first_is_a)]
        logp_a, logp_b = self.answer_logps(contexts)
        picked_a = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(logp_a.tolist(), logp_b.tolist())]
        outcomes = [p if flip else 1.0 - p for p, flip in zip(picked_a, first_is_a)]
        details = {"judge_picked_a": sum(picked_a) / len(picked_a), "responses_shown_as_a": sum(first_is_a)}
        return outcomes, details


def checked_template(template: str) -> str:
    """``template`` if it names only ``{prompt}`` and ``{response}``, and ``{response}`` at least (else the judge
    would score the prompt alone); a :class:`JudgeError` saying so otherwise. Other braces are written doubled."""
    try:
        fields = {field for _, field, _, _ in string.Formatter().parse(template) if field is not None}
    except ValueError as error:
        raise JudgeError(f"judge template {shown(template)}: {error} (write a literal brace doubled: {{{{ }}}})") \
            from error
    if not fields <= {"prompt", "response"} or "response" not in fields:
        raise JudgeError(f"judge template {shown(template)} has the fields {sorted(fields)}: use {{response}} and "
                         "{prompt} (optional) only; write a literal brace doubled")
    return template


class LLMScoreJudge(ScoreJudge):
    """``llm:PATH`` as a score judge (rounds): the LM reads ``template`` filled with the prompt and one response, and
    the score is log P("Yes") - log P("No") of its answer: the log-odds of a yes, not a sampled verdict, so two
    completions the judge would both call good are still ordered."""

    def __init__(self, path: str, device: torch.device, *, template: str | None = None, batch_size: int = 16,
                 quantization: str = "none"):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.template = checked_template(SCORE_TEMPLATE if template is None else template)
        self.name = f"LLM score judge {path}" + (" (4-bit)" if quantization == "4bit" else "")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = load_judge_model(AutoModelForCausalLM, path, device, quantization)
        self.device, self.batch_size = device, batch_size

    def context(self, prompt: str, response: str) -> str:
        """The judging text of one response, ending where the judge's answer (Yes or No) begins."""
        return judging_text(self.tokenizer, self.template.format(prompt=prompt, response=response))

    def scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        if not responses:
            return []  # response_logps has no batch to stack
        contexts = [self.context(p, r) for p, r in zip(prompts, responses)]
        with progress(2 * len(contexts), f"judging: {self.name}", unit="answer") as bar:  # Yes and No after each
            yes, no = answer_logps(self.model, self.tokenizer, contexts, ("Yes", "No"), batch_size=self.batch_size,
                                   device=self.device, bar=bar)
        return (yes - no).tolist()


def parse_judge(spec: str) -> tuple[str, str]:
    """:func:`dpo_dist.config.judge_parts` (the one reader of judge specs, which the config checks with), its
    refusal a :class:`JudgeError`."""
    try:
        return judge_parts(spec)
    except ValueError as error:
        raise JudgeError(str(error)) from None


# kind -> its score judge, from (argument, device, template, quantization, batch_size): one record per kind. The
# template is the llm judge's, the quantization a model judge's: a kind that takes neither refuses them (below).
SCORE_JUDGES = {
    "sentiment": lambda argument, device, template, quantization, batch_size: SentimentJudge(),
    "reward_model": lambda argument, device, template, quantization, batch_size: RewardModelJudge(
        argument, device, batch_size=batch_size, quantization=quantization),
    "python": lambda argument, device, template, quantization, batch_size: FunctionJudge(argument),
    "llm": lambda argument, device, template, quantization, batch_size: LLMScoreJudge(
        argument, device, template=template, batch_size=batch_size, quantization=quantization),
}


def build_score_judge(spec: str, device: torch.device, *, template: str | None = None, quantization: str = "none",
                      batch_size: int = 16) -> ScoreJudge:
    """The score judge of ``spec`` (rounds.judge): ``sentiment``, ``reward_model:PATH``, ``python:MODULE:FUNCTION``
    or ``llm:PATH`` (:class:`LLMScoreJudge`, ``template`` its question, :data:`SCORE_TEMPLATE` when None).
    ``quantization`` (``4bit``) loads a model judge's linear layers in 4 bits; ``batch_size``: responses per forward
    of a model judge. An option the judge would not read is refused, not ignored."""
    kind, argument = parse_judge(spec)
    unread = judge_options_unread(kind, template=template, quantization=quantization)
    if unread:
        raise JudgeError(f"judge {spec}: {unread}")
    if batch_size < 1:
        raise JudgeError(f"judge {spec}: batch size must be positive, got {batch_size}")
    return SCORE_JUDGES[kind](argument, device, template, quantization, batch_size)


def build_judge(spec: str, device: torch.device, *, seed: int = 0, instruction: str = JUDGE_INSTRUCTION) -> Any:
    """Evaluation's judge of ``spec``: ``sentiment``, ``reward_model:PATH`` or ``python:MODULE:FUNCTION`` (score
    judges: the higher score wins), or ``llm:PATH`` (pairwise, :class:`LLMJudge`, with ``seed`` and
    ``instruction``)."""
    kind, argument = parse_judge(spec)
    if kind == "llm":
        return LLMJudge(argument, device, seed=seed, instruction=instruction)
    return build_score_judge(spec, device)
