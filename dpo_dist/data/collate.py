"""Join tokenized pairs (or groups) into one padded batch: chosen rows first, then rejected rows, with labels.

For a batch of B pairs the collator returns ``2B`` rows, row ``i`` being pair ``i``'s prompt + chosen response and
row ``B + i`` its prompt + rejected response, so one forward pass scores both sides (``logprobs.concatenated_forward``).
A batch of G groups (one prompt, k >= 2 responses each) has a row per response, every group's first responses, then
every group's second, and so on (a group with fewer responses has no row where it has none).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

IGNORE_INDEX = -100
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
# A group example (one prompt, k >= 2 responses) has these instead of a pair's chosen and rejected columns: its k
# responses' token ids, and (optional) their k reference log-probs.
GROUP_COLUMN = "responses_input_ids"
GROUP_REFERENCE_COLUMN = "ref_responses_logps"


def is_group(example: dict[str, Any]) -> bool:
    """Whether an example is a group (``responses_input_ids``) rather than a pair."""
    return GROUP_COLUMN in example


def responses_of(example: dict[str, Any]) -> list[list[int]]:
    """An example's responses in order: a group's ``responses_input_ids``, a pair's ``[chosen, rejected]``."""
    if is_group(example):
        responses = [list(r) for r in example[GROUP_COLUMN]]
        if len(responses) < 2:
            raise ValueError(f"a group needs at least 2 responses, got {len(responses)}")
        return responses
    return [list(example["chosen_input_ids"]), list(example["rejected_input_ids"])]


def ref_responses_of(example: dict[str, Any]) -> list[float] | None:
    """An example's reference log-probs, one per response (a group's ``ref_responses_logps``, a pair's
    ``[ref_chosen_logps, ref_rejected_logps]``), or None where it carries none."""
    if GROUP_REFERENCE_COLUMN in example:
        return [float(x) for x in example[GROUP_REFERENCE_COLUMN]]
    if all(column in example for column in REFERENCE_COLUMNS):
        return [float(example[column]) for column in REFERENCE_COLUMNS]
    return None


def group_columns(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """What a batch with groups carries besides its tokens (either collator; a pair in it is the group ``[chosen,
    rejected]``): ``group_tokens`` (G,), each group's tokens counted as k sequences (prompt k times), the figure
    throughput is reported in; ``response_mask`` (G, K) bool, True for the responses a group has (K: the largest k);
    and ``ref_responses_logps`` (G, K) float32, 0 past a group's k, where the examples carry reference log-probs."""
    responses = [responses_of(e) for e in examples]
    sizes = [len(r) for r in responses]
    out = {
        "group_tokens": torch.tensor([len(r) * len(e["prompt_input_ids"]) + sum(map(len, r))
                                      for r, e in zip(responses, examples)], dtype=torch.long),
        "response_mask": torch.arange(max(sizes))[None, :] < torch.tensor(sizes)[:, None],
    }
    references = [ref_responses_of(e) for e in examples]
    if references[0] is not None:
        if any(ref is None or len(ref) != k for ref, k in zip(references, sizes)):
            raise ValueError("every example of a batch carries reference log-probs, one per response, or none does")
        out[GROUP_REFERENCE_COLUMN] = torch.tensor([ref + [0.0] * (max(sizes) - len(ref)) for ref in references],
                                                   dtype=torch.float32)
    return out


class PreferenceCollator:
    """Pads ``prompt + response`` rows to the longest in the batch.

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` (counting real tokens only, so the padding side
    does not move positions) and ``labels`` (response ids; ``-100`` on the prompt and on padding), each of shape
    ``(2B, T)``; ``pair_tokens`` (B,), each pair's non-padding tokens over its two rows; and ``ref_chosen_logps`` /
    ``ref_rejected_logps`` of shape ``(B,)`` when the examples carry them.

    A batch with any group (``responses_input_ids``; a pair in it is the group ``[chosen, rejected]``): the same four
    keys with a row per response, ``(N, T)``, and ``row_sequence`` (N,): each row's sequence, ``j * G + g`` for
    group g's response j (the packed collator's numbering), in increasing order; with :func:`group_columns`' keys in
    place of ``pair_tokens`` and the pairs' reference columns.
    """

    def __init__(self, pad_token_id: int, *, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if any(map(is_group, examples)):
            return self._groups(examples)
        sequences, labels = [], []
        for side in ("chosen", "rejected"):
            for example in examples:
                prompt, response = list(example["prompt_input_ids"]), list(example[f"{side}_input_ids"])
                sequences.append(prompt + response)
                labels.append([IGNORE_INDEX] * len(prompt) + response)
        batch = self._rows(sequences, labels)
        batch["pair_tokens"] = batch["attention_mask"].view(2, len(examples), -1).sum(dim=(0, 2))  # both rows of a pair
        for column in REFERENCE_COLUMNS:
            if column in examples[0]:
                batch[column] = torch.tensor([float(e[column]) for e in examples], dtype=torch.float32)
        return batch

    def _groups(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A batch with groups (class docstring): a row per response, ordered by sequence ``j * G + g``."""
        responses = [responses_of(e) for e in examples]
        g = len(examples)
        sequences, labels, row_sequence = [], [], []
        for j in range(max(map(len, responses))):
            for i, example in enumerate(examples):
                if j < len(responses[i]):
                    prompt, response = list(example["prompt_input_ids"]), responses[i][j]
                    sequences.append(prompt + response)
                    labels.append([IGNORE_INDEX] * len(prompt) + response)
                    row_sequence.append(j * g + i)
        batch = self._rows(sequences, labels)
        batch["row_sequence"] = torch.tensor(row_sequence, dtype=torch.long)
        batch.update(group_columns(examples))
        return batch

    def _rows(self, sequences: list[list[int]], labels: list[list[int]]) -> dict[str, torch.Tensor]:
        """``input_ids``, ``attention_mask``, ``labels``, ``position_ids`` (N, T) of ``prompt + response`` rows."""
        width = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": self._pad(sequences, width, self.pad_token_id),
            "attention_mask": self._pad([[1] * len(s) for s in sequences], width, 0),
            "labels": self._pad(labels, width, IGNORE_INDEX),
        }
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        return batch

    def _pad(self, rows: list[list[int]], width: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        return out
