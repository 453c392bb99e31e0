"""Pairwise judges: which of two responses to the same prompt is better.

Every judge answers ``compare(prompts, responses, baseline_responses)`` with one outcome per comparison: 1 when the
first response wins, 0.5 for a tie, 0 when the baseline's wins.

- ``sentiment``: VADER's compound sentiment score of each response (the DPO paper's controlled-sentiment task); the
  more positive one wins, equal scores tie.
- ``reward_model:PATH``: an ``AutoModelForSequenceClassification`` scores prompt + response (through its tokenizer's
  chat template when it has one); one output is the score, two outputs give the log-odds of the second label.
- ``llm:PATH``: a local causal LM reads the prompt and both responses labelled A and B and is scored on answering
  "A" or "B" (the log-probs of the two answers, no sampling). Which response is A is drawn at random for each
  comparison (seeded), so a judge that prefers a position favours neither side on average; the report says how
  often the judge picked A.

Score judges (sentiment, reward model) also give each response's score, which the report averages and plots.
"""

from __future__ import annotations

import random
from typing import Any

import torch

from dpo_dist.eval.scoring import response_logps
from dpo_dist.eval.options import JUDGE_INSTRUCTION
from dpo_dist.progress import progress


def outcomes_from_scores(scores: list[float], baseline_scores: list[float]) -> list[float]:
    """1 where the first score is higher, 0.5 where equal, 0 where lower."""
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, baseline_scores)]


class ScoreJudge:
    """A judge that scores each response alone; the higher score wins."""

    name = "score"

    def scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        raise NotImplementedError

    def compare(self, prompts: list[str], responses: list[str], baseline: list[str]) -> tuple[list[float], dict]:
        first, second = self.scores(prompts, responses), self.scores(prompts, baseline)
        return outcomes_from_scores(first, second), {"scores": first, "baseline_scores": second}


class SentimentJudge(ScoreJudge):
    name = "sentiment (VADER compound score, -1 to 1)"

    def scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        from dpo_dist.data.sentiment import vader_scores

        return vader_scores(responses)


class RewardModelJudge(ScoreJudge):
    def __init__(self, path: str, device: torch.device, batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.name = f"reward model {path}"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        if self.model.config.num_labels not in (1, 2):
            raise ValueError(f"reward model {path} has {self.model.config.num_labels} outputs: expected 1 (a score) "
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


class LLMJudge:
    def __init__(self, path: str, device: torch.device, *, seed: int = 0, instruction: str = JUDGE_INSTRUCTION,
                 batch_size: int = 8):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = f"LLM judge {path}"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        self.device, self.seed, self.instruction, self.batch_size = device, seed, instruction, batch_size

    def context(self, prompt: str, a: str, b: str) -> str:
        """The judging text, ending where the judge's answer (A or B) begins."""
        question = (f"{self.instruction}\n\n[Prompt]\n{prompt}\n\n[Response A]\n{a}\n\n[Response B]\n{b}\n\n"
                    "Which response is better? Answer with one letter, A or B.")
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                      add_generation_prompt=True)
        return question + "\nAnswer:"

    def answer_logps(self, contexts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-prob of answering A and of answering B after each context. Shape: -> (N,), (N,)."""
        encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        lead = " " if not getattr(self.tokenizer, "chat_template", None) else ""
        ids = [encode(c) for c in contexts]
        scored = {}
        with progress(2 * len(ids), f"judging: {self.name}", unit="answer") as bar:  # A and B after each context
            for letter in ("A", "B"):
                answer = encode(lead + letter)
                scored[letter] = response_logps(self.model, ids, [answer] * len(ids), batch_size=self.batch_size,
                                                device=self.device, pad_id=self.tokenizer.pad_token_id or 0,
                                                progress=bar)
        return scored["A"], scored["B"]

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


def build_judge(spec: str, device: torch.device, *, seed: int = 0, instruction: str = JUDGE_INSTRUCTION) -> Any:
    """``sentiment``, ``reward_model:PATH`` or ``llm:PATH``."""
    kind, _, path = spec.partition(":")
    if kind == "sentiment" and not path:
        return SentimentJudge()
    if kind == "reward_model" and path:
        return RewardModelJudge(path, device)
    if kind == "llm" and path:
        return LLMJudge(path, device, seed=seed, instruction=instruction)
    raise ValueError(f"unknown judge {spec!r}: use sentiment, reward_model:PATH or llm:PATH")
