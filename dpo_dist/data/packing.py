"""Prompt sharing and padding-free packing: a batch of pairs as a few rows with no wasted tokens.

Each pair becomes one segment, ``prompt | chosen | rejected``, with the prompt computed once for both responses:

- **Attention** (a boolean mask per row, ``(R, 1, W, W)``): causal within a segment, never across segments (so
  several pairs share a row, block-diagonally), and the rejected tokens do not see the chosen ones — they see the
  prompt and themselves, exactly as in a ``prompt | rejected`` sequence of their own.
- **Positions** restart at 0 for each segment; the rejected response continues from the end of the prompt, as the
  chosen one does.
- **Scoring**: a response's first token is predicted by the prompt's last position (used twice, once per response),
  each later token by the position before it in its own response.

Segments are packed into rows first-fit decreasing; the row capacity is chosen per batch to waste the fewest
positions without making rows so wide that attention (which a boolean mask computes in full) costs more than the
padding saved (:func:`choose_rows`). Every pair keeps its own log-probs (and so its own weight in the mean
loss); the result equals scoring ``prompt + chosen`` and ``prompt + rejected`` separately (tested, log-probs and
gradients).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dpo_dist.data.collate import REFERENCE_COLUMNS


def plan_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Segment indices per row: first-fit decreasing into rows of ``capacity`` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def choose_rows(lengths: Sequence[int], attention_tokens: int = 2048) -> list[list[int]]:
    """The packing that costs least: rows first-fit decreasing under each capacity from the longest segment to all of
    them in one row, each costed as ``rows x width x (1 + width / attention_tokens)`` — every position pays for the
    linear layers, and attention grows with the row's width too (a boolean mask is computed in full). 2048 is where,
    on the CPU kernels measured here, attention costs as much per position as the rest of a SmolLM2-sized layer."""
    longest, total = max(lengths), sum(lengths)
    best, best_cost = None, float("inf")
    for capacity in sorted({longest, total, *(min(total, longest * k // 4) for k in range(5, 17))}):
        rows = plan_rows(lengths, capacity)
        width = max(sum(lengths[i] for i in row) for row in rows)
        cost = len(rows) * width * (1 + width / attention_tokens)
        if cost < best_cost:
            best, best_cost = rows, cost
    return best


class PackedPairCollator:
    """Pairs (``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``, optional reference log-probs) ->
    a packed batch for :func:`dpo_dist.train.logprobs.packed_forward`.

    ``share_prompt=True``: one segment per pair, ``prompt | chosen | rejected``. ``False``: two segments per pair,
    ``prompt | chosen`` and ``prompt | rejected`` (packing alone, to measure what sharing adds).

    Keys: ``input_ids``, ``position_ids`` (R, W); ``attention_mask`` (R, 1, W, W) bool; ``pred_rows``, ``targets``,
    ``seq_index`` (K,): for each scored token, the flat position (in R*W) that predicts it, its id, and its sequence
    (pair b's chosen is b, its rejected B + b); ``pair_tokens`` (B,): the pair's tokens counted as two sequences
    (prompt twice), the figure throughput is reported in.
    """

    def __init__(self, pad_token_id: int, *, share_prompt: bool = True):
        self.pad_token_id = pad_token_id
        self.share_prompt = share_prompt

    def segments(self, examples: Sequence[dict[str, Any]]) -> list[tuple[list[int], list[tuple[list[int], int]]]]:
        """(prompt, [(response, sequence index), ...]) per segment."""
        b = len(examples)
        out = []
        for i, e in enumerate(examples):
            prompt, chosen, rejected = (list(e[f"{k}_input_ids"]) for k in ("prompt", "chosen", "rejected"))
            if self.share_prompt:
                out.append((prompt, [(chosen, i), (rejected, b + i)]))
            else:
                out += [(prompt, [(chosen, i)]), (prompt, [(rejected, b + i)])]
        return out

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        segments = self.segments(examples)
        lengths = [len(prompt) + sum(len(r) for r, _ in responses) for prompt, responses in segments]
        rows = choose_rows(lengths)
        width = max(sum(lengths[i] for i in row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding attends to itself (no NaN rows)
        pred_rows, targets, seq_index = [], [], []
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                prompt, responses = segments[i]
                n_p, end = len(prompt), start + lengths[i]
                input_ids[r, start : start + n_p] = torch.tensor(prompt, dtype=torch.long)
                position_ids[r, start : start + n_p] = torch.arange(n_p)
                mask[r, start : start + n_p, start : start + n_p] = torch.ones(n_p, n_p, dtype=torch.bool).tril()
                offset = start + n_p
                for response, seq in responses:
                    n = len(response)
                    span = slice(offset, offset + n)
                    input_ids[r, span] = torch.tensor(response, dtype=torch.long)
                    position_ids[r, span] = torch.arange(n_p, n_p + n)
                    mask[r, span, start : start + n_p] = True  # the prompt
                    mask[r, span, span] = torch.ones(n, n, dtype=torch.bool).tril()  # itself, causally
                    # Token k is predicted by the position before it: the prompt's last for k = 0 (with no prompt,
                    # nothing predicts it, as in the padded form), its own response's previous token after that.
                    first = 0 if n_p else 1
                    predictors = ([start + n_p - 1] if n_p else []) + list(range(offset, offset + n - 1))
                    pred_rows += [r * width + position for position in predictors]
                    targets += response[first:]
                    seq_index += [seq] * (n - first)
                    offset += n
                start = end
        batch = {
            "input_ids": input_ids, "position_ids": position_ids, "attention_mask": mask[:, None],
            "pred_rows": torch.tensor(pred_rows, dtype=torch.long), "targets": torch.tensor(targets, dtype=torch.long),
            "seq_index": torch.tensor(seq_index, dtype=torch.long),
            "pair_tokens": torch.tensor([2 * len(e["prompt_input_ids"]) + len(e["chosen_input_ids"])
                                         + len(e["rejected_input_ids"]) for e in examples], dtype=torch.long),
        }
        for column in REFERENCE_COLUMNS:
            if column in examples[0]:
                batch[column] = torch.tensor([e[column] for e in examples], dtype=torch.float32)
        return batch


# Architectures whose attention takes a 4D boolean mask with explicit position ids (Llama's code path in
# transformers, and GPT-2's); tested on Llama and GPT-2.
PACKING_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gpt2")


def packing_unsupported(model: Any, zero_stage: int) -> str | None:
    """Why packing cannot run with this model and setup, or None when it can."""
    base = getattr(model, "module", model)
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    config = base.config
    if zero_stage == 3:
        return "ZeRO-3 partitions the LM head, which packed scoring reads outside the forward"
    if config.model_type not in PACKING_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one packing is verified on ({', '.join(PACKING_MODEL_TYPES)})"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ("sdpa", "eager"):
        return f"attention {attention!r} takes no 4D attention mask (sdpa and eager do)"
    if not isinstance(base.get_output_embeddings(), torch.nn.Linear):
        return "the LM head is not a plain Linear layer"
    return None


def choose_packing(setting: str, model: Any, zero_stage: int, *, share_prompt: bool = True) -> tuple[bool, str]:
    """``train.packing`` resolved for this model: (on, the line that says so and why). ``on`` where unsupported is an
    error."""
    if setting == "off":
        return False, "packing: off (train.packing=off)"
    reason = packing_unsupported(model, zero_stage)
    if reason and setting == "on":
        raise ValueError(f"train.packing=on, but {reason}; use train.packing=auto or off")
    if reason:
        return False, f"packing: off ({reason})"
    if share_prompt:
        return True, "packing: on (each pair as prompt|chosen|rejected with the prompt computed once, packed into rows)"
    return True, "packing: on (prompt|chosen and prompt|rejected segments packed into rows; train.share_prompt=false)"
