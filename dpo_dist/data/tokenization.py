"""Turn normalized pairs into token ids in token space: joined text is never re-tokenized.

For each pair:

- the prompt is tokenized once, without the tokenizer's automatic special tokens; BOS is then put in front exactly
  once if the tokenizer uses one (it adds BOS when asked for special tokens) and the text does not already start
  with it (a chat template that renders ``{{ bos_token }}``);
- each response is tokenized alone, without special tokens, and EOS is appended once at its end. With a chat
  template the rendered response ends with the template's end-of-turn text; when that is EOS, the response is cut
  right after it, so EOS is never doubled;
- truncation: the prompt keeps its last ``max_prompt_length`` tokens (the latest turns; BOS stays in front), then
  each response keeps its first ``max_length - len(prompt)`` tokens (a cut response has no EOS: it did not end).
  A pair whose prompt leaves no room for a response is dropped and counted, never cut into an empty response.

The result per pair is ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (responses only);
``collate.py`` joins them into model inputs with labels. A ranking (``data.responses=ranking``: a record with
``responses``, best first) becomes ``prompt_input_ids`` and ``responses_input_ids``, each response tokenized and
truncated exactly as a pair's (:func:`tokenize_group`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import datasets

from dpo_dist.data.formats import RowError

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
PART = "part"  # a mixture's pairs: the index of the entry (data.sources[i]) each came from (dpo_dist.data.load)
# Every loaded pair's source row, unique across everything loaded for a run (a mixture's parts, a given eval set):
# the pairs a ranked row gives share it, so they are split and subset together and their prompt is the same.
GROUP = "group"
CARRIED = ("row", PART, GROUP)  # kept through tokenization, where a pair has them: where it came from, to count by
# A ranking's responses, best first (dpo_dist.data.load with responses=ranking), and their token ids once tokenized.
RESPONSES_COLUMN = "responses"
GROUP_COLUMNS = ("prompt_input_ids", "responses_input_ids")


class TokenizationError(ValueError):
    """The tokenizer or the truncation settings cannot produce valid pairs."""


@dataclass(frozen=True)
class Truncation:
    """``max_length`` bounds prompt + response in tokens; ``max_prompt_length`` bounds the prompt (None: only
    ``max_length`` does)."""

    max_length: int = 1024
    max_prompt_length: int | None = 512

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise TokenizationError(f"max_length must be at least 2, got {self.max_length}")
        if self.max_prompt_length is not None and not 1 <= self.max_prompt_length < self.max_length:
            raise TokenizationError(
                f"max_prompt_length must be in [1, max_length) = [1, {self.max_length}), got {self.max_prompt_length}"
            )


def uses_bos(tokenizer: Any) -> bool:
    """True if the tokenizer puts BOS in front when asked to add special tokens (Llama does; GPT-2 and Qwen don't)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def check_tokenizer(tokenizer: Any) -> None:
    if tokenizer.eos_token_id is None:
        raise TokenizationError("the tokenizer has no eos_token: set tokenizer.eos_token before tokenizing pairs")


def tokenize_pair(
    pair: dict[str, Any], tokenizer: Any, truncation: Truncation, *, add_bos: bool
) -> dict[str, list[int]] | None:
    """One normalized pair -> token ids, or None when the prompt leaves no room for a response.

    ``add_bos`` is ``uses_bos(tokenizer)``, worked out once by the caller.
    """
    if isinstance(pair["prompt"], list):
        prompt_text, chosen_text, rejected_text = render_conversation(pair, tokenizer)
    else:
        prompt_text, chosen_text, rejected_text = pair["prompt"], pair["chosen"], pair["rejected"]

    bos = tokenizer.bos_token_id
    prompt_ids = _encode(tokenizer, prompt_text)
    has_bos = add_bos or (bos is not None and prompt_ids[:1] == [bos])
    if has_bos and prompt_ids[:1] != [bos]:
        prompt_ids = [bos] + prompt_ids
    chosen_ids = _response_ids(tokenizer, chosen_text)
    rejected_ids = _response_ids(tokenizer, rejected_text)

    if truncation.max_prompt_length is not None and len(prompt_ids) > truncation.max_prompt_length:
        keep = truncation.max_prompt_length - int(has_bos)
        prompt_ids = ([bos] if has_bos else []) + prompt_ids[len(prompt_ids) - keep :]
    room = truncation.max_length - len(prompt_ids)
    if room < 1:
        return None
    return {
        "prompt_input_ids": prompt_ids,
        "chosen_input_ids": chosen_ids[:room],
        "rejected_input_ids": rejected_ids[:room],
    }


def tokenize_group(
    example: dict[str, Any], tokenizer: Any, truncation: Truncation, *, add_bos: bool
) -> dict[str, Any] | None:
    """One ranking (``prompt`` and its ``responses``, best first) -> ``prompt_input_ids`` and ``responses_input_ids``,
    or None when the prompt leaves no room for a response. Each response is tokenized as :func:`tokenize_pair`
    tokenizes a pair's (rendered with the prompt, EOS once, cut to ``max_length - len(prompt)``), so a ranking of 2
    has exactly the token ids of the pair ``[chosen, rejected]``."""
    prompt_ids, responses = None, []
    for response in example[RESPONSES_COLUMN]:
        ids = tokenize_pair({"prompt": example["prompt"], "chosen": response, "rejected": response}, tokenizer,
                            truncation, add_bos=add_bos)
        if ids is None:
            return None
        prompt_ids = ids["prompt_input_ids"]
        responses.append(ids["chosen_input_ids"])
    return {"prompt_input_ids": prompt_ids, "responses_input_ids": responses}


def tokenize_prompt(prompt: str | list[dict[str, str]], tokenizer: Any, truncation: Truncation) -> list[int] | None:
    """A prompt alone (text or messages), as :func:`tokenize_pair` tokenizes it in a pair: BOS, chat template,
    ``max_prompt_length``; None when it leaves no room for a response."""
    reply: Any = [{"role": "assistant", "content": "."}] if isinstance(prompt, list) else " ."
    pair = tokenize_pair({"prompt": prompt, "chosen": reply, "rejected": reply}, tokenizer, truncation,
                         add_bos=uses_bos(tokenizer))
    return None if pair is None else pair["prompt_input_ids"]


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _response_ids(tokenizer: Any, text: str) -> list[int]:
    """Response ids ending in exactly one EOS."""
    eos_token, eos = tokenizer.eos_token, tokenizer.eos_token_id
    stripped = text.rstrip()
    if stripped.endswith(eos_token):  # a chat template's end of turn: cut after it (drops the trailing newline)
        text = stripped[: -len(eos_token)]
    ids = _encode(tokenizer, text)
    while ids and ids[-1] == eos:
        ids.pop()
    return ids + [eos]


def render_conversation(pair: dict[str, Any], tokenizer: Any) -> tuple[str, str, str]:
    """Render prompt and response messages with the chat template; each response is the text the template adds
    after the prompt's generation prompt.

    A row the template cannot render (it raises: a role it does not accept, strict alternation) or renders with an
    ambiguous prompt/response boundary raises :class:`RowError` (``template_error``), so the caller can name the row;
    a tokenizer without a chat template raises :class:`TokenizationError`.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizationError(
            "conversational pairs need a tokenizer with a chat_template (set tokenizer.chat_template, or use text data)"
        )
    try:
        prompt_text = tokenizer.apply_chat_template(pair["prompt"], tokenize=False, add_generation_prompt=True)
        fulls = [tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=False)
                 for side in ("chosen", "rejected")]
    except Exception as error:  # jinja2's TemplateError (raise_exception), or whatever the template's code raises
        roles = sorted({m["role"] for m in pair["prompt"] + pair["chosen"] + pair["rejected"]})
        raise RowError("template_error", f"the chat template cannot render this row (roles {', '.join(roles)}): "
                                         f"{type(error).__name__}: {error}") from error
    responses = []
    for full in fulls:
        if not full.startswith(prompt_text):
            raise RowError(
                "template_error",
                "the chat template renders the prompt differently with and without the response, so the prompt/"
                f"response boundary is ambiguous:\nprompt: {prompt_text[-200:]!r}\nfull: {full[:len(prompt_text)][-200:]!r}"
            )
        responses.append(full[len(prompt_text) :])
    return prompt_text, responses[0], responses[1]


def tokenize_pairs(
    pairs: datasets.Dataset, tokenizer: Any, truncation: Truncation, *, num_proc: int | None = None
) -> tuple[datasets.Dataset, int]:
    """Tokenize every pair; returns the tokenized dataset (with ``row`` and ``group``, and a mixture's ``part``, kept)
    and how many pairs were dropped because their prompt left no room for a response.

    A ``datasets.map`` over Arrow (token ids stored as int32): with pairs read from files (``load_pairs``) the
    result is cached by the datasets fingerprint, which covers the tokenizer and the truncation, so the same pairs
    and settings are tokenized once and a change of either tokenizes again. ``num_proc``: processes (None: one).
    """
    check_tokenizer(tokenizer)
    add_bos = uses_bos(tokenizer)
    grouped = RESPONSES_COLUMN in pairs.column_names  # rankings (data.responses=ranking): tokenize_group
    columns = GROUP_COLUMNS if grouped else PAIR_COLUMNS

    def encode(pair: dict[str, Any]) -> dict[str, Any]:
        try:
            ids = (tokenize_group if grouped else tokenize_pair)(pair, tokenizer, truncation, add_bos=add_bos)
        except RowError as error:
            raise TokenizationError(
                f"row {pair.get('row', '?')}: {error} (load_pairs(..., tokenizer=) finds such rows while loading, "
                "naming the file, and on_bad_row=skip leaves them out)"
            ) from error
        if ids is None:
            return {"keep": False, **{column: [] for column in columns}}
        return {"keep": True, **ids}

    drop = [c for c in pairs.column_names if c not in CARRIED]
    features = datasets.Features({
        **{c: pairs.features[c] for c in CARRIED if c in pairs.column_names},
        "keep": datasets.Value("bool"),
        **{column: datasets.List(datasets.Value("int32")) for column in columns},
    })
    if grouped:
        features["responses_input_ids"] = datasets.List(datasets.List(datasets.Value("int32")))
    encoded = pairs.map(encode, remove_columns=drop, features=features, num_proc=num_proc, desc="tokenizing pairs")
    total = len(encoded)
    dropped = total - sum(encoded.with_format("arrow")["keep"].to_pylist())
    if dropped:
        encoded = encoded.filter(lambda keep: keep, input_columns="keep", batched=True, desc="dropping long prompts")
    kept = encoded.remove_columns("keep")
    if dropped:
        logger.warning(
            "dropped %d of %d pairs whose prompt leaves no room for a response (max_length=%d, max_prompt_length=%s)",
            dropped, total, truncation.max_length, truncation.max_prompt_length,
        )
    return kept, dropped
