"""Preference record formats: detect them and normalize one raw row into a prompt and two responses.

Three layouts are understood (see the README for one example record of each):

- ``text``: ``prompt``, ``chosen``, ``rejected`` are strings.
- ``conversational``: ``chosen`` / ``rejected`` are lists of ``{"role", "content"}`` messages, either the responses
  alone beside a ``prompt`` message list, or whole conversations sharing their leading messages (the
  UltraFeedback-binarized layout, where a ``prompt`` string may sit beside them and is not needed).
- ``hh``: Anthropic HH transcripts: ``chosen`` / ``rejected`` are whole ``\\n\\nHuman: ... \\n\\nAssistant: ...`` texts;
  the prompt is the shared text up to and including the last ``\\n\\nAssistant:``.

Every function here is pure: a bad row raises :class:`RowError` with a short reason (one of ``REASONS``), and the
caller (``data.py``) decides whether that stops loading or skips the row.
"""

from __future__ import annotations

import re
from typing import Any, Literal

Format = Literal["text", "conversational", "hh"]
FORMATS: tuple[str, ...] = ("text", "conversational", "hh")

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"

# The reasons a row can be rejected; the skip report counts rows by these keys.
REASONS = (
    "missing_field",
    "wrong_type",
    "empty_response",
    "identical_responses",
    "prompts_differ",
    "no_assistant_turn",
)


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
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _normalize_conversational(row: dict[str, Any]) -> dict[str, Any]:
    chosen = _messages(row, "chosen")
    rejected = _messages(row, "rejected")
    if isinstance(row.get("prompt"), list):
        prompt = _messages(row, "prompt")
        # Whole conversations beside an explicit prompt: drop the repeated prompt messages.
        for side in (chosen, rejected):
            if side[: len(prompt)] == prompt:
                del side[: len(prompt)]
    else:
        # Shared leading messages are the prompt; each side's response starts at its last run of assistant turns.
        prompt = _conversation_prompt(chosen)
        if rejected[: len(prompt)] != prompt or _conversation_prompt(rejected) != prompt:
            raise RowError("prompts_differ", "chosen and rejected conversations differ before the final assistant turn")
        chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        if not messages:
            raise RowError("empty_response", f"{side} has no response message after the prompt")
        if messages[-1]["role"] != "assistant":
            raise RowError("no_assistant_turn", f"{side} does not end with an assistant message")
    _check_responses(_joined(chosen), _joined(rejected))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _conversation_prompt(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    end = len(messages)
    while end > 0 and messages[end - 1]["role"] == "assistant":
        end -= 1
    return messages[:end]


def _joined(messages: list[dict[str, str]]) -> str:
    return "".join(m["content"] for m in messages if m["role"] == "assistant")
