"""Preference record formats: detect them and normalize one raw row into a prompt and two responses, or a prompt
and k ranked responses that :func:`ranked_pairs` turns into pairs.

Four layouts are understood (docs/data.md shows one example record of each):

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
- ``ranked``: more than two responses per prompt (:func:`normalize_ranked`): ``prompt`` and ``completions`` (k >= 2
  responses, each a string, a message list, or a record ``{"response", "score"}``) ordered by ``scores`` (one number
  each, higher is better), a ``ranking`` (indices, best first) or the records' scores; or one ``chosen`` beside a
  list of ``rejected`` responses. Responses are strings (text) or message lists (conversational, read as above).

:func:`rename_columns` maps a dataset's own field names to these (``data.columns``) before anything else reads a row.

Every function here is pure: a bad row raises :class:`RowError` with a short reason (one of ``REASONS``), and the
caller (``load.py``) decides whether that stops loading or skips the row.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Literal, Mapping

from dpo_dist.config import DATA_FORMATS, PAIR_RULES

Format = Literal[DATA_FORMATS]
FORMATS: tuple[str, ...] = DATA_FORMATS

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
    # ranked rows
    "too_few_responses",
    "scores_length",
    "bad_score",
    "scores_tied",
    "duplicate_responses",
    "bad_ranking",
    "ambiguous_order",
    "partial_order",  # data.responses=ranking only: tied scores, or one chosen beside unordered rejected
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
    """Guess the format of a dataset from its first row (its fields named as ours: :func:`rename_columns`).

    A ``completions`` list, or a list of responses in ``rejected``, means ranked; message lists in ``chosen`` mean
    conversational; strings with a ``prompt`` column mean text; strings without one mean HH transcripts.
    """
    if "completions" in row:
        return "ranked"
    if "chosen" not in row:
        raise RowError("missing_field", f"no 'chosen' or 'completions' field (fields: {sorted(row)})")
    rejected = row.get("rejected")
    if isinstance(rejected, list) and rejected and not isinstance(rejected[0], dict):
        return "ranked"  # a list of responses (strings or message lists), not one message list
    if isinstance(row["chosen"], list):
        return "conversational"
    if "prompt" in row:
        return "text"
    return "hh"


def rename_columns(row: dict[str, Any], columns: Mapping[str, str] | None) -> dict[str, Any]:
    """A raw row with the dataset's field names replaced by ours: ``columns`` maps ours to the dataset's
    (``data.columns``: ``{"prompt": "instruction", "score": "overall_score"}``). The records of a ``completions``
    list are renamed too (their ``response`` and ``score``). A field of the dataset that bears one of our names but is
    mapped away from (UltraFeedback's own ``prompt`` when ``prompt`` reads ``instruction``) is not read."""
    renamed = {ours: theirs for ours, theirs in (columns or {}).items() if ours != theirs}
    if not renamed:
        return row
    ours_of = {theirs: ours for ours, theirs in renamed.items()}

    def rename(record: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in record.items():
            if key in ours_of:
                out[ours_of[key]] = value
            elif key not in renamed:
                out[key] = value
        return out

    row = rename(row)
    if isinstance(row.get("completions"), list):
        row["completions"] = [rename(item) if isinstance(item, dict) else item for item in row["completions"]]
    return row


def response_kind(row: dict[str, Any]) -> Literal["text", "conversational"]:
    """Whether a ranked row's responses are strings (text) or message lists (conversational), from its first one;
    a dataset's rows must all be of its first row's kind (the pairs' columns have one type)."""
    if isinstance(row.get("completions"), list) and row["completions"]:
        first = row["completions"][0]
        if isinstance(first, dict):
            first = first.get("response")
    else:
        first = row.get("chosen")
    return "conversational" if isinstance(first, list) else "text"


def normalize_row(row: dict[str, Any], data_format: Format, *, hh_as_messages: bool = False) -> dict[str, Any]:
    """One raw pair row -> ``{"prompt", "chosen", "rejected"}`` (ranked rows: :func:`normalize_ranked`).

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
    raise ValueError(f"unknown data format {data_format!r} for a pair row; pair formats: text, conversational, hh")


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
    return _message_list(_field(row, key, list), key)


def _message_list(value: list[Any], key: str) -> list[dict[str, str]]:
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
    prompt, (chosen, rejected) = _conversation(row, [("chosen", _messages(row, "chosen")),
                                                     ("rejected", _messages(row, "rejected"))])
    _check_responses(_joined(chosen), _joined(rejected))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _conversation(row: dict[str, Any], sides: list[tuple[str, list[dict[str, str]]]]
                  ) -> tuple[list[dict[str, str]], list[list[dict[str, str]]]]:
    """The prompt messages and each side's response messages; ``sides`` are (name, messages), two for a pair, k for
    a ranked row. The row's ``prompt`` is a message list, a string or absent (see the module docstring)."""
    names = [name for name, _ in sides]
    if isinstance(row.get("prompt"), list):
        prompt = _messages(row, "prompt")
        if not prompt:
            raise RowError("no_prompt", "the prompt message list is empty")
        responses = [_response_after(prompt, messages, name) for name, messages in sides]
    else:
        # Shared leading messages are the prompt; each side's response starts at its last run of assistant turns.
        first, prompt = names[0], _conversation_prompt(sides[0][1])
        for name, messages in sides[1:]:
            if messages[: len(prompt)] != prompt or _conversation_prompt(messages) != prompt:
                raise RowError("prompts_differ",
                               f"{first} and {name} conversations differ before the final assistant turn")
        responses = [messages[len(prompt) :] for _, messages in sides]
        if row.get("prompt") is not None:
            prompt = _with_prompt_string(prompt, _field(row, "prompt", str))
        if not prompt:
            listed = " and ".join([", ".join(names[:-1]), names[-1]])
            raise RowError("no_prompt", f"no message before the response: {listed} hold only assistant "
                                        "messages and there is no prompt field")
    for name, messages in zip(names, responses):
        if not messages:
            raise RowError("empty_response", f"{name} has no response message after the prompt")
        if messages[-1]["role"] != "assistant":
            raise RowError("no_assistant_turn", f"{name} does not end with an assistant message")
    return prompt, responses


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


def normalize_ranked(row: dict[str, Any], kind: Literal["text", "conversational"]) -> dict[str, Any]:
    """One raw ranked row -> ``{"prompt", "responses", "scores", "order"}``.

    ``responses``: the k >= 2 responses, normalized as a pair's (strings for ``kind`` text; message lists for
    conversational, each the response alone after the shared prompt messages). ``scores``: k floats, higher is
    better: the row's scores; for a ``ranking`` (best first) k-1 for the best down to 0, so a gap is a rank
    difference; for a chosen beside a list of rejected, 1 and 0 each. ``order``: where the order came from,
    ``scores``, ``ranking`` or ``chosen`` (the rejected responses unordered among themselves).
    """
    if "completions" in row:
        names, values, scores, order = _completions(row)
    else:
        rejected = _field(row, "rejected", list)
        if "chosen" not in row or row["chosen"] is None:
            raise RowError("missing_field", "missing field 'chosen'")
        names = ["chosen"] + [f"rejected[{i}]" for i in range(len(rejected))]
        values, scores, order = [row["chosen"], *rejected], [1.0] + [0.0] * len(rejected), "chosen"
        if not rejected:
            raise RowError("too_few_responses", "the rejected list is empty: give at least one rejected response")
    if kind == "text":
        prompt = _field(row, "prompt", str)
        for name, value in zip(names, values):
            if not isinstance(value, str):
                raise RowError("wrong_type", f"{name} should be a string like this dataset's first row's responses, "
                                             f"got {type(value).__name__}")
            if not value.strip():
                raise RowError("empty_response", f"{name} response is empty")
        responses, texts = list(values), list(values)
    else:
        sides = []
        for name, value in zip(names, values):
            if not isinstance(value, list):
                raise RowError("wrong_type", f"{name} should be a message list like this dataset's first row's "
                                             f"responses, got {type(value).__name__}")
            sides.append((name, _message_list(value, name)))
        prompt, responses = _conversation(row, sides)
        texts = [_joined(messages) for messages in responses]
        for name, text in zip(names, texts):
            if not text.strip():
                raise RowError("empty_response", f"{name} response is empty")
    seen: dict[str, str] = {}
    for name, text in zip(names, texts):
        if text in seen:
            raise RowError("duplicate_responses", f"{seen[text]} and {name} are the same response")
        seen[text] = name
    return {"prompt": prompt, "responses": responses, "scores": scores, "order": order}


def _completions(row: dict[str, Any]) -> tuple[list[str], list[Any], list[float], str]:
    """A ``completions`` row's response names (``completions[i]``), raw responses, scores and their origin."""
    completions = _field(row, "completions", list)
    k = len(completions)
    if k < 2:
        raise RowError("too_few_responses", f"completions holds {k} response{'s' * (k != 1)}: a ranked row needs at "
                                             "least 2")
    names = [f"completions[{i}]" for i in range(k)]
    values, record_scores = [], []
    for name, item in zip(names, completions):
        if isinstance(item, dict):  # a record: {"response": ..., "score": ...} (data.columns names its fields)
            if item.get("response") is None:
                raise RowError("missing_field", f"{name} is a record without a 'response' field "
                                                f"(fields: {sorted(item)}; data.columns.response names it)")
            values.append(item["response"])
            record_scores.append(item.get("score"))
        else:
            values.append(item)
            record_scores.append(None)
    given = [name for name, score in zip(names, record_scores) if score is not None]
    scores, ranking = row.get("scores"), row.get("ranking")
    if given:
        if len(given) < k:
            missing = next(name for name, score in zip(names, record_scores) if score is None)
            raise RowError("missing_field", f"{missing} has no 'score' while {given[0]} has one (data.columns.score "
                                            "names the records' score field)")
        if scores is not None or ranking is not None:
            raise RowError("ambiguous_order", "the completions' records hold scores and the row has "
                                              f"{'scores' if scores is not None else 'a ranking'} too: give one order")
        return names, values, _scores(record_scores, k, "the completions' scores"), "scores"
    if scores is not None and ranking is not None:
        raise RowError("ambiguous_order", "the row has both scores and a ranking: give one order")
    if scores is not None:
        if not isinstance(scores, list):
            raise RowError("wrong_type", f"field 'scores' should be a list, got {type(scores).__name__}")
        return names, values, _scores(scores, k, "scores"), "scores"
    if ranking is not None:
        return names, values, _ranking_scores(ranking, k), "ranking"
    records = [item for item in completions if isinstance(item, dict)]
    hint = (f" (the completions are records with the fields {sorted(records[0])}: data.columns.score names the one "
            "holding the score)" if records else "")
    raise RowError("missing_field", "no 'scores' or 'ranking' beside 'completions', nor a 'score' in each completion "
                                    f"record: the responses have no order{hint}")


def _scores(scores: list[Any], k: int, what: str) -> list[float]:
    if len(scores) != k:
        raise RowError("scores_length", f"{what} hold {len(scores)} numbers for {k} completions")
    for i, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise RowError("bad_score", f"{what}[{i}] is {score!r}: each score must be a finite number")
    if len(set(scores)) == 1:
        raise RowError("scores_tied", f"every completion has the score {scores[0]!r}: no response is better")
    return [float(score) for score in scores]


def _ranking_scores(ranking: Any, k: int) -> list[float]:
    """A ranking (indices, best first) as scores: k-1 for the best down to 0 for the worst."""
    if (not isinstance(ranking, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in ranking)
            or sorted(ranking) != list(range(k))):
        raise RowError("bad_ranking", f"ranking {ranking!r:.80} is not a permutation of 0..{k - 1} (the completions' "
                                      "indices, best first)")
    scores = [0.0] * k
    for position, index in enumerate(ranking):
        scores[index] = float(k - 1 - position)
    return scores


def ranked_order(ranked: dict[str, Any]) -> list[int]:
    """A normalized ranked row's (:func:`normalize_ranked`) response indices best first, for ``data.responses=ranking``,
    whose loss reads a strict order of all k responses: a row that gives less is a bad row (``partial_order``): two
    tied scores (a ranking never ties), or one chosen beside a list of rejected (unordered among themselves)."""
    scores = ranked["scores"]
    if ranked["order"] == "chosen":
        raise RowError("partial_order", f"one chosen beside {len(scores) - 1} rejected orders only the chosen first; "
                                        "data.responses=ranking needs every response in order (data.responses=pairs "
                                        "takes such rows)")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    for better, worse in zip(order, order[1:]):
        if scores[better] == scores[worse]:
            first, second = sorted((better, worse))
            raise RowError("partial_order", f"completions[{first}] and completions[{second}] tie at score "
                                            f"{scores[better]:g}: data.responses=ranking needs a strict order (pairs "
                                            "mode takes such rows, dropping the tied pair)")
    return order


def _best_vs_worst(scores: list[float]) -> list[tuple[int, int]]:
    best = max(range(len(scores)), key=lambda i: scores[i])  # max and min keep the first listed of equals
    worst = min(range(len(scores)), key=lambda i: scores[i])
    return [(best, worst)]


def _best_vs_rest(scores: list[float]) -> list[tuple[int, int]]:
    best = max(range(len(scores)), key=lambda i: scores[i])
    return [(best, j) for j in range(len(scores)) if j != best]


def _all_pairs(scores: list[float]) -> list[tuple[int, int]]:
    return [(i, j) if scores[i] >= scores[j] else (j, i)
            for i in range(len(scores)) for j in range(i + 1, len(scores))]


# data.pair_rule's names (dpo_dist.config.PAIR_RULES) -> the candidate pairs (better, worse) of a row's scores, ties
# included: ranked_pairs drops those below the gap.
PAIR_CANDIDATES: dict[str, Callable[[list[float]], list[tuple[int, int]]]] = {
    "best_vs_worst": _best_vs_worst, "best_vs_rest": _best_vs_rest, "all_pairs": _all_pairs,
}
assert tuple(PAIR_CANDIDATES) == PAIR_RULES


def ranked_pairs(ranked: dict[str, Any], rule: str, min_score_gap: float = 0.0) -> tuple[list[tuple[int, int]], int]:
    """The pairs a normalized ranked row (:func:`normalize_ranked`) gives under ``rule`` (``data.pair_rule``), as
    ``(chosen index, rejected index)`` into its responses, and how many candidate pairs were dropped: tied, or a
    score gap below ``min_score_gap``.

    A chosen beside a list of rejected gives chosen vs each rejected whatever the rule (the rejected responses are
    unordered among themselves; each gap is 1). Example, scores ``[7, 9, 4, 9]``: best_vs_worst ``[(1, 2)]``;
    best_vs_rest ``[(1, 0), (1, 2)]`` and 1 dropped (1 and 3 tie); all_pairs ``[(1, 0), (0, 2), (3, 0), (1, 2),
    (3, 2)]`` (i before j, i < j, as listed) and 1 dropped (1 and 3).
    """
    scores = ranked["scores"]
    if ranked["order"] == "chosen":
        candidates = [(0, j) for j in range(1, len(scores))]
    else:
        candidates = PAIR_CANDIDATES[rule](scores)
    kept = [(i, j) for i, j in candidates if scores[i] > scores[j] and scores[i] - scores[j] >= min_score_gap]
    return kept, len(candidates) - len(kept)
