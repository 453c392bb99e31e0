"""Debugging aids for ``train.debug=true``: a training pair shown as the model sees it, token by token."""

from __future__ import annotations

from typing import Any

from dpo_dist.data.collate import IGNORE_INDEX, PreferenceCollator


def show_pair(example: dict[str, Any], tokenizer: Any) -> str:
    """The chosen and rejected rows of one tokenized pair (a ranking's: each response's, best first): each token,
    and whether it is scored (its label) or masked.

    Masked tokens (the prompt) are shown in ``[...]``, scored ones (the response, EOS included) in ``<...>``, and a
    run of N padding positions (the shorter row padded to the longer one's length) as one ``{pad ×N}``: told by the
    attention mask, not by the token id, which is often EOS (a tokenizer without a pad token pads with it).
    """
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id or 0)([example])
    lines = [f"one training pair (row {example.get('row', '?')}), as the model sees it: [masked] <scored> "
             "{pad ×N}: N positions of padding, not data"]
    sides = ("chosen", "rejected")
    if "responses_input_ids" in example:  # a ranking: a row per response, best first
        sides = tuple(f"response {j}" for j in range(len(example["responses_input_ids"])))
    for row, side in enumerate(sides):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        mask = batch["attention_mask"][row].tolist()
        pieces, run = [], 0
        for token, label, real in zip(ids, labels, mask):
            if not real:
                run += 1
                continue
            if run:
                pieces.append(f"{{pad ×{run}}}")
                run = 0
            text = tokenizer.decode([token])
            pieces.append(f"[{text}]" if label == IGNORE_INDEX else f"<{text}>")
        if run:
            pieces.append(f"{{pad ×{run}}}")
        tokens, scored = sum(mask), sum(label != IGNORE_INDEX for label in labels)
        padding = len(ids) - tokens
        lines.append(f"{side}: {tokens} tokens, {tokens - scored} masked, {scored} scored"
                     + (f"; {padding} padding" if padding else ""))
        lines.append("  " + "".join(pieces).replace("\n", "\\n"))
    return "\n".join(lines)
