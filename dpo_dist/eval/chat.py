"""A conversation with a model: history, chat template, streamed sampling (the engine behind launch/chat.py).

The prompt is rendered with the tokenizer's chat template and tokenized as training tokenized prompts (no automatic
special tokens; BOS once if the tokenizer uses one), so the model sees the format it was trained on. Without a chat
template (or with ``raw=True``) each input is plain text the model continues, and there is no history. When the
history no longer fits the model's context, the oldest exchanges are dropped (the system message stays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from dpo_dist.data.tokenization import uses_bos
from dpo_dist.model.generation import generate_responses, generation_config


@dataclass
class ChatSampling:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0
    greedy: bool = False


class Chat:
    def __init__(self, model: Any, tokenizer: Any, device: torch.device, *, sampling: ChatSampling,
                 system: str | None = None, raw: bool = False):
        self.model, self.tokenizer, self.device, self.sampling = model, tokenizer, device, sampling
        self.raw = raw or not getattr(tokenizer, "chat_template", None)
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.last_dropped = 0  # exchanges dropped from the history to fit the last prompt
        self.add_bos = uses_bos(tokenizer)
        limit = getattr(model.config, "max_position_embeddings", None) or 4096
        self.max_prompt_tokens = max(1, limit - sampling.max_new_tokens)
        eos = {tokenizer.eos_token_id}
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
        self.eos_ids = sorted(eos)

    def reset(self) -> None:
        self.messages = []

    def _conversation(self, user: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages + [{"role": "user", "content": user}]

    def prompt_ids(self, user: str) -> tuple[list[int], int]:
        """The token ids for the model, and how many earlier exchanges were dropped to fit the context."""
        dropped = 0
        while True:
            if self.raw:
                text = user
            else:
                text = self.tokenizer.apply_chat_template(self._conversation(user), tokenize=False,
                                                          add_generation_prompt=True)
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            bos = self.tokenizer.bos_token_id
            if self.add_bos and ids[:1] != [bos]:
                ids = [bos] + ids
            if len(ids) <= self.max_prompt_tokens or not self.messages:
                return ids[-self.max_prompt_tokens :], dropped
            self.messages = self.messages[2:]  # the oldest user/assistant exchange
            dropped += 1

    @torch.no_grad()
    def reply(self, user: str, streamer: Any = None) -> str:
        """The model's answer to ``user``, streamed to ``streamer`` if given; kept in the history."""
        ids, self.last_dropped = self.prompt_ids(user)
        s = self.sampling
        config = generation_config(self.tokenizer, max_new_tokens=s.max_new_tokens,
                                   temperature=None if s.greedy else s.temperature, top_p=s.top_p, top_k=s.top_k,
                                   eos_token_id=self.eos_ids)
        (response,) = generate_responses(self.model, [ids], config, self.device, streamer=streamer)
        answer = self.tokenizer.decode(response, skip_special_tokens=True)
        if not self.raw:
            self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        return answer
