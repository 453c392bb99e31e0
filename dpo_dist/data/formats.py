"""Preference record formats: detect them and normalize one raw row into a prompt and two responses.

Three layouts are understood (docs/data.md shows one example record of each):

- ``text``: ``prompt``, ``chosen``, ``rejected`` are strings.
- ``conversational``: ``chosen`` / ``rejected`` are lists of ``{"role", "content"}`` messages (roles in ``ROLES``):

  - beside a ``prompt`` message list: the responses alone, or whole conversations that begin with the prompt
    messages;
  - beside a ``prompt`` string or no prompt: whole conversations sharing their leading messages, which are the
    prompt (the UltraFeedback-binarized layout; the string must then be the content of one of their user messages),
    or, when those leading messages hold no user message (assistant-only lists, perhaps after a system message),
    the string is the user message: ``[system...,] user(prompt)`` is the prompt.
- ``hh``: Anthropic HH transcripts: ``chosen`` / ``rejected`` are whole ``\\n\\nHuman: ... \\n\\nAssistant: ...`` texts;
  the prompt is the shared text up to and including the last ``\\n\\nAssistant:``.

Every function here is pure: a bad row raises :class:`RowError` with a short reason (one of ``REASONS``), and the
caller (``load.py``) decides whether that stops loading or skips the row.
"""

from __future__ import annotations

import re
from typing import Any, Literal

Format = Literal["text", "conversational", "hh"]
FORMATS: tuple[str, ...] = ("text", "conversational", "hh")

HH_ASSISTANT = "\n\nAssistant:"

# The reasons a row can be rejected; the skip report counts rows by these keys.
REASONS = (
    "missing_field",
    "wrong_type",
    "empty_response",
    "identical_responses",
    "prompts_differ",
    "no_assistant_turn",
    "no_prompt",
    "prompt_not_prefix",
    "unknown_role",
    "template_error",
)

# The message roles a row may use: the ones chat templates are written for. Any other role ("wizard") is a bad row;
# a template that rejects one of these on some row (no system role, strict alternation) is found by rendering the
# row (``tokenization.render_conversation``, at load when ``load_pairs`` is given the tokenizer).
ROLES = ("system", "user", "assistant", "tool")


class RowError(ValueError):
    """A row that cannot be used. ``reason`` is one of ``REASONS``; the message says what is wrong."""

    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


def detect_format(row: dict[str, Any]) -> Format:
    """Guess the format of a dataset from its first row.

    Message lists in ``chosen`` mean conversational; strings with a ``prompt`` column mean text; strings without
    one mean HH transcripts.
    """
    if "chosen" not in row:
        raise RowError("missing_field", f"no 'chosen' field (fields: {sorted(row)})")
    if isinstance(row["chosen"], list):
        return "conversational"
    if "prompt" in row:
        return "text"
    return "hh"


def normalize_row(row: dict[str, Any], data_format: Format, *, hh_as_messages: bool = False) -> dict[str, Any]:
    """One raw row -> ``{"prompt", "chosen", "rejected"}``.

    Text and HH rows give three strings (HH rows give messages instead when ``hh_as_messages``); conversational
    rows give three message lists: the prompt messages and each side's response messages.
    """
    if data_format == "text":
        return _normalize_text(row)
    if data_format == "hh":
        pair = _normalize_hh(row)
        return hh_to_messages(pair) if hh_as_messages else pair
    if data_format == "conversational":
        return _normalize_conversational(row)
    raise ValueError(f"unknown data format {data_format!r}; valid: {FORMATS}")


def _field(row: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in row or row[key] is None:
        raise RowError("missing_field", f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise RowError("wrong_type", f"field {key!r} should be {names}, got {type(value).__name__}")
    return value


def _check_responses(chosen_text: str, rejected_text: str) -> None:
    for side, text in (("chosen", chosen_text), ("rejected", rejected_text)):
        if not text.strip():
            raise RowError("empty_response", f"{side} response is empty")
    if chosen_text == rejected_text:
        raise RowError("identical_responses", "chosen is identical to rejected")


def _normalize_text(row: dict[str, Any]) -> dict[str, Any]:
    prompt = _field(row, "prompt", str)
    chosen = _field(row, "chosen", str)
    rejected = _field(row, "rejected", str)
    _check_responses(chosen, rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def split_hh(transcript: str) -> tuple[str, str]:
    """``"\\n\\nHuman: q\\n\\nAssistant: a"`` -> ``("\\n\\nHuman: q\\n\\nAssistant:", " a")``."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise RowError("no_assistant_turn", f"no {HH_ASSISTANT!r} in transcript")
    cut += len(HH_ASSISTANT)
    return transcript[:cut], transcript[cut:]


def _normalize_hh(row: dict[str, Any]) -> dict[str, Any]:
    chosen_prompt, chosen = split_hh(_field(row, "chosen", str))
    rejected_prompt, rejected = split_hh(_field(row, "rejected", str))
    if chosen_prompt != rejected_prompt:
        raise RowError("prompts_differ", "chosen and rejected transcripts differ before the last 'Assistant:' turn")
    _check_responses(chosen, rejected)
    return {"prompt": chosen_prompt, "chosen": chosen, "rejected": rejected}


def hh_to_messages(pair: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """An HH text pair -> conversational messages, so a tokenizer's chat template can render it.

    ``"\\n\\nHuman: q\\n\\nAssistant: a\\n\\nHuman: r\\n\\nAssistant:"`` gives user ``q``, assistant ``a``, user ``r``.
    Consecutive turns of one speaker merge; text before the first marker (rare) opens the first user turn.
    """
    pieces = _HH_MARKER.split(pair["prompt"][: -len(HH_ASSISTANT)])
    turns: list[dict[str, str]] = []
    roles = ["user"] + ["user" if speaker == "Human" else "assistant" for speaker in pieces[1::2]]
    for role, content in zip(roles, pieces[0::2]):
        content = content.strip()
        if not content and not turns:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += "\n\n" + content
        else:
            turns.append({"role": role, "content": content})
    if not turns or turns[-1]["role"] != "user":
        raise RowError("no_assistant_turn", "HH prompt has no Human turn before the last Assistant turn")
    return {
        "prompt": turns,
        "chosen": [{"role": "assistant", "content": pair["chosen"].strip()}],
        "rejected": [{"role": "assistant", "content": pair["rejected"].strip()}],
    }


_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")


def _messages(row: dict[str, Any], key: str) -> list[dict[str, str]]:
    value = _field(row, key, list)
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RowError("wrong_type", f"{key}[{i}] should be a {{role, content}} message, got {message!r:.80}")
        if not isinstance(message["role"], str) or not isinstance(message["content"], str):
            raise RowError("wrong_type", f"{key}[{i}] role and content should be strings")
        if message["role"] not in ROLES:
            raise RowError("unknown_role", f"{key}[{i}] has role {message['role']!r}; roles: {', '.join(ROLES)}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _normalize_conversational(row: dict[str, Any]) -> dict[str, Any]:
    chosen = _messages(row, "chosen")
    rejected = _messages(row, "rejected")
    if isinstance(row.get("prompt"), list):
        prompt = _messages(row, "prompt")
        if not prompt:
            raise RowError("no_prompt", "the prompt message list is empty")
        chosen = _response_after(prompt, chosen, "chosen")
        rejected = _response_after(prompt, rejected, "rejected")
    else:
        # Shared leading messages are the prompt; each side's response starts at its last run of assistant turns.
        prompt = _conversation_prompt(chosen)
        if rejected[: len(prompt)] != prompt or _conversation_prompt(rejected) != prompt:
            raise RowError("prompts_differ", "chosen and rejected conversations differ before the final assistant turn")
        chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
        if row.get("prompt") is not None:
            prompt = _with_prompt_string(prompt, _field(row, "prompt", str))
        if not prompt:
            raise RowError("no_prompt", "no message before the response: chosen and rejected hold only assistant "
                                        "messages and there is no prompt field")
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages:
            raise RowError("empty_response", f"{side} has no response message after the prompt")
        if messages[-1]["role"] != "assistant":
            raise RowError("no_assistant_turn", f"{side} does not end with an assistant message")
    _check_responses(_joined(chosen), _joined(rejected))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _response_after(prompt: list[dict[str, str]], messages: list[dict[str, str]], side: str) -> list[dict[str, str]]:
    """One side beside a prompt message list: the response alone, or a whole conversation beginning with the prompt.

    A response is what the model says after the prompt: it starts with an assistant message and holds no user or
    system message (tool results between assistant turns are fine). Anything else means the prompt list is not what
    precedes this side's response, and the prompt/response boundary is unknown.
    """
    if messages[: len(prompt)] == prompt:
        messages = messages[len(prompt) :]
    elif messages and messages[0]["role"] != "assistant":
        raise RowError("prompt_not_prefix", f"the prompt messages are not a prefix of the {side} conversation "
                                            f"({side}[0] is a {messages[0]['role']} message: "
                                            f"{messages[0]['content']!r:.60})")
    for message in messages:
        if message["role"] in ("user", "system"):
            raise RowError("prompt_not_prefix", f"{side} has a {message['role']} message after the prompt "
                                                f"({message['content']!r:.60}): the prompt list must hold every "
                                                "message before the final assistant response")
    return messages


def _with_prompt_string(prompt: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """The shared leading messages with the row's ``prompt`` string accounted for, never dropped.

    With a user message among them (whole conversations, UltraFeedback-binarized) the string repeats one of them
    and adds nothing; if it matches none, the row is ambiguous. Without one (assistant-only lists, perhaps after a
    system message) the string is the user's turn, right before the response.
    """
    if not text.strip():
        raise RowError("no_prompt", "the prompt string is empty")
    users = [m["content"] for m in prompt if m["role"] == "user"]
    if not users:
        return prompt + [{"role": "user", "content": text}]
    if text.strip() not in (content.strip() for content in users):
        raise RowError("prompts_differ", f"the prompt string {text!r:.60} is not the content of any user message of "
                                         "the conversations (drop the prompt field, or make it one of them)")
    return prompt


def _conversation_prompt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    end = len(messages)
    while end > 0 and messages[end - 1]["role"] == "assistant":
        end -= 1
    return messages[:end]


def _joined(messages: list[dict[str, str]]) -> str:
    return "".join(m["content"] for m in messages if m["role"] == "assistant")
