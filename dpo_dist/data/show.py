"""Debugging aids for ``train.debug=true``: a training pair shown as the model sees it, token by token."""

from __future__ import annotations

from typing import Any

from dpo_dist.data.collate import IGNORE_INDEX, PreferenceCollator


def show_pair(example: dict[str, Any], tokenizer: Any) -> str:
    """The chosen and rejected rows of one tokenized pair: each token, and whether it is scored (its label) or masked.

    Masked tokens (the prompt) are shown in ``[...]``, scored ones (the response, EOS included) in ``<...>``.
    """
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id or 0)([example])
    lines = [f"one training pair (row {example.get('row', '?')}), as the model sees it: [masked] <scored>"]
    for row, side in enumerate(("chosen", "rejected")):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        pieces = []
        for token, label in zip(ids, labels):
            text = tokenizer.decode([token])
            pieces.append(f"[{text}]" if label == IGNORE_INDEX else f"<{text}>")
        scored = sum(label != IGNORE_INDEX for label in labels)
        lines.append(f"{side}: {len(ids)} tokens, {len(ids) - scored} masked, {scored} scored")
        lines.append("  " + "".join(pieces).replace("\n", "\\n"))
    return "\n".join(lines)
