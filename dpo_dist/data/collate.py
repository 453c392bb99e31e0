"""Join tokenized pairs into one padded batch: chosen rows first, then rejected rows, with labels.

For a batch of B pairs the collator returns ``2B`` rows, row ``i`` being pair ``i``'s prompt + chosen response and
row ``B + i`` its prompt + rejected response, so one forward pass scores both sides (``logprobs.concatenated_forward``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

IGNORE_INDEX = -100
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


class PreferenceCollator:
    """Pads ``prompt + response`` rows to the longest in the batch.

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` (counting real tokens only, so the padding side
    does not move positions) and ``labels`` (response ids; ``-100`` on the prompt and on padding), each of shape
    ``(2B, T)``; ``pair_tokens`` (B,), each pair's non-padding tokens over its two rows; and ``ref_chosen_logps`` /
    ``ref_rejected_logps`` of shape ``(B,)`` when the examples carry them.
    """

    def __init__(self, pad_token_id: int, *, padding_side: str = "right", pad_to_multiple_of: int | None = None):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id = pad_token_id
        self.padding_side = padding_side
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences, labels = [], []
        for side in ("chosen", "rejected"):
            for example in examples:
                prompt, response = list(example["prompt_input_ids"]), list(example[f"{side}_input_ids"])
                sequences.append(prompt + response)
                labels.append([IGNORE_INDEX] * len(prompt) + response)
        width = max(len(s) for s in sequences)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {
            "input_ids": self._pad(sequences, width, self.pad_token_id),
            "attention_mask": self._pad([[1] * len(s) for s in sequences], width, 0),
            "labels": self._pad(labels, width, IGNORE_INDEX),
        }
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        batch["pair_tokens"] = batch["attention_mask"].view(2, len(examples), -1).sum(dim=(0, 2))  # both rows of a pair
        for column in REFERENCE_COLUMNS:
            if column in examples[0]:
                batch[column] = torch.tensor([float(e[column]) for e in examples], dtype=torch.float32)
        return batch

    def _pad(self, rows: list[list[int]], width: int, value: int) -> torch.Tensor:
        out = torch.full((len(rows), width), value, dtype=torch.long)
        for i, row in enumerate(rows):
            if self.padding_side == "right":
                out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            else:
                out[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        return out
