"""Prompt sharing and padding-free packing: a batch of pairs (or groups) as a few rows with no wasted tokens.

Each pair becomes one segment, ``prompt | chosen | rejected``, with the prompt computed once for both responses; a
group (one prompt, ``k >= 2`` responses) likewise becomes ``prompt | response_0 | ... | response_k-1``, the prompt
computed once for all k. A pair is the group ``[chosen, rejected]``: what follows says "responses" for both. The
pairs of one ranked row (one ``group`` id) that meet in a batch are one segment, the prompt and each distinct response
once (:class:`PackedPairCollator`, ``pair_sequences``).

- **Attention** (the batch carries per-token segment, branch and position ids; the mask built from them is
  ``dpo_dist.model.attention.packed_mask``'s, in the form each attention kernel and layer type takes): causal within a
  segment, never across segments (so several segments share a row, block-diagonally), and a response's tokens do not
  see the other responses' — they see the prompt and themselves, exactly as in a ``prompt | response`` sequence of
  its own. A sliding window is a distance in position ids, not in row offsets (a later response sits after the
  earlier ones in the row but continues the prompt's positions).
- **Positions** restart at 0 for each segment; every response continues from the end of the prompt.
- **Branch ids**: the prompt is ``PROMPT``, response ``j`` of a segment is ``CHOSEN + j`` (so a pair's responses are
  ``CHOSEN`` and ``REJECTED``): the mask needs only "prompt, or my own branch".
- **Scoring**: a response's first token is predicted by the prompt's last position (used once per response), each
  later token by the position before it in its own response.

Segments are packed into rows first-fit decreasing; the row capacity is chosen per batch to waste the fewest
positions without making rows so wide that attention (which a boolean mask computes in full) costs more than the
padding saved (:func:`choose_rows`).

**Attention layout.** A dense mask has the kernel compute every query against every key of its row, ``W x W`` per
row, of which the segments' own blocks are a fraction; so rows are kept narrow, at the price of some padding. The
segmented layout (``attention_spans``) gives the kernel each segment's parts alone instead: ``prompt | first
response`` as one causal block, each later response's queries against the prompt's keys and their own
(``dpo_dist.model.segmented_attention``). Attention then costs the same however the segments are laid out, so they
all go in one row with no padding at all. It costs a kernel call per part, which short segments may not repay:
``dpo_dist.attention_cost.segmented_pays`` weighs the two layouts per batch.

Every response keeps its own log-probs (and so its own weight in the mean loss); the result equals scoring each
``prompt + response`` separately (tested, log-probs and gradients).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from dpo_dist.attention_cost import POSITION_COST, dense_cost, segmented_pays
from dpo_dist.data.collate import REFERENCE_COLUMNS, group_columns, is_group, responses_of
from dpo_dist.data.tokenization import GROUP

# Branch ids: which part of its segment a token is in (response j: CHOSEN + j). Padding is its own segment (-1) on
# branch PROMPT.
PROMPT, CHOSEN, REJECTED = 0, 1, 2
PAD_SEGMENT = -1
ATTENTION_LAYOUTS = ("auto", "dense", "segmented")


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


def choose_rows(lengths: Sequence[int], attention_tokens: int = POSITION_COST) -> list[list[int]]:
    """The packing that costs least under a dense mask: rows first-fit decreasing under each capacity from the longest
    segment to all of them in one row, each costed by :func:`dpo_dist.attention_cost.dense_cost`."""
    longest, total = max(lengths), sum(lengths)
    best, best_cost = None, float("inf")
    for capacity in sorted({longest, total, *(min(total, longest * k // 4) for k in range(5, 17))}):
        rows = plan_rows(lengths, capacity)
        width = row_width(rows, lengths)
        cost = dense_cost(len(rows), width, attention_tokens)
        if cost < best_cost:
            best, best_cost = rows, cost
    return best


def segment_parts(segment: tuple[list[int], list[tuple[list[int], int]]]) -> tuple[int, ...]:
    """A segment's (prompt, response_0, ..., response_k-1) lengths: one response where the prompt is not shared."""
    prompt, responses = segment
    return (len(prompt), *(len(response) for response, _ in responses))


def row_width(rows: list[list[int]], lengths: Sequence[int]) -> int:
    """The widest row's tokens."""
    return max(sum(lengths[i] for i in row) for row in rows)


def tokens_through_model(batch: dict[str, torch.Tensor]) -> int:
    """The token positions a batch puts through the model, padding left out: a packed batch's segment positions (the
    prompt once per segment: once for a pair with the prompt shared, once for a ranked row's pairs merged), a padded
    one's non-padding positions (the prompt once per response). ``pair_tokens``, the throughput figure, counts each
    pair as two sequences whatever the batch computed."""
    if "segment_ids" in batch:
        return int((batch["segment_ids"] != PAD_SEGMENT).sum())
    return int(batch["attention_mask"].sum())


class PackedPairCollator:
    """Pairs (``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``, optional reference log-probs) or
    groups (``prompt_input_ids``, ``responses_input_ids``: k >= 2 token lists, optional ``ref_responses_logps``: k
    floats) -> a packed batch for :func:`dpo_dist.train.logprobs.packed_forward` (pairs) or
    :func:`dpo_dist.train.logprobs.group_logps` (either).

    ``share_prompt=True``: one segment per example, ``prompt | response_0 | ... | response_k-1`` (a pair's:
    ``prompt | chosen | rejected``). ``False``: a segment per response, ``prompt | response`` (packing alone, to
    measure what sharing adds).

    Keys: ``input_ids``, ``position_ids``, ``segment_ids``, ``branch_ids`` (R, W) (the attention mask is built from
    them per model, :func:`dpo_dist.model.attention.packed_attention_mask`); ``pred_rows``, ``targets``,
    ``seq_index`` (T,): for each scored token, the flat position (in R*W) that predicts it, its id, and its sequence:
    response ``j`` of example ``g`` of ``G`` is sequence ``j * G + g`` (so pair b's chosen is b, its rejected G + b).

    A batch of pairs only also has ``pair_tokens`` (G,): the pair's tokens counted as two sequences (prompt twice), the
    figure throughput is reported in; and ``ref_chosen_logps``, ``ref_rejected_logps`` (G,) where the pairs carry them.
    A batch with any group (a pair in it counts as the group ``[chosen, rejected]``) has instead ``group_tokens`` (G,)
    (prompt counted k times), ``response_mask`` (G, K) bool (K: the largest k in the batch; False past a group's k),
    and ``ref_responses_logps`` (G, K) float32 (0 past a group's k) where the examples carry reference log-probs.
    Pairs collate exactly as before groups existed: a batch of pairs has no key a group adds.

    **Pairs of one ranked row** (``share_prompt=True``, ``merge_groups=True``): pairs of the batch that carry the same
    ``group`` id (the pairs ``data.pair_rule`` made from one row; pair data gives every pair its own) and the same
    prompt become one segment, ``prompt | response_0 | ... | response_k-1``: the prompt once, each distinct response
    (identical token lists are one) once, in the order the pairs first name them, chosen before rejected. The batch
    then also carries ``pair_sequences`` (B, 2): pair b's chosen and rejected sequence. The segments are numbered as
    groups are (response j of segment s of S: sequence ``j * S + s``), and a pair whose group appears once in the
    batch is the segment ``prompt | chosen | rejected`` as without merging. Every other key means what it does for
    pairs (``pair_tokens`` still counts each pair as two sequences). A batch where no group appears twice (pair data
    always) has no ``pair_sequences`` and is the batch it was before merging, bit for bit.
    :func:`dpo_dist.train.logprobs.pair_logps` reads a pair's sums from its sequences' (LD-DPO's shared prefix and
    WPO's aligned sums included), the same numbers as a segment per pair.

    ``attention_layout``: ``dense``: rows as :func:`choose_rows` packs them, for a mask over each row; ``segmented``:
    every segment in one row (no padding: the row's width no longer costs attention), and the batch also carries
    ``attention_spans`` (S, 4 + K), K the most responses of a segment in the batch: per part of a row ``row, start,
    padding, prompt, response_0, ..., response_K-1`` lengths, in row order, covering every position (a segment with
    ``padding`` 0 and its responses' lengths, 0 past its own; or a row's padding, with only ``padding``), for
    ``dpo_dist.model.segmented_attention``; ``auto``: segmented where ``dpo_dist.attention_cost.segmented_pays``.
    """

    def __init__(self, pad_token_id: int, *, share_prompt: bool = True, pad_to_multiple_of: int | None = None,
                 attention_layout: str = "dense", merge_groups: bool = True):
        if attention_layout not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention_layout must be one of {ATTENTION_LAYOUTS}, got {attention_layout!r}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of  # FlexAttention's block size: rows a whole number of blocks
        self.share_prompt = share_prompt
        self.attention_layout = attention_layout
        self.merge_groups = merge_groups  # the pairs of one group in a batch: one segment (class docstring)

    def segments(self, examples: Sequence[dict[str, Any]]) -> list[tuple[list[int], list[tuple[list[int], int]]]]:
        """(prompt, [(response, sequence index), ...]) per segment."""
        g = len(examples)
        out = []
        for i, e in enumerate(examples):
            prompt = list(e["prompt_input_ids"])
            responses = [(response, j * g + i) for j, response in enumerate(responses_of(e))]
            out += [(prompt, responses)] if self.share_prompt else [(prompt, [r]) for r in responses]
        return out

    def merged_segments(self, examples: Sequence[dict[str, Any]]) -> tuple[list, int, list[tuple[int, int]]] | None:
        """The segments of a batch of pairs with each group's pairs merged (class docstring): ``(prompt, [(response,
        sequence index), ...])`` per segment, the number of segments S (sequence ``j * S + s`` is segment s's response
        j) and each pair's (chosen, rejected) sequences. None where no group (with its prompt) appears twice."""
        if not (self.share_prompt and self.merge_groups) or any(GROUP not in e or is_group(e) for e in examples):
            return None
        keys = [(e[GROUP], tuple(e["prompt_input_ids"])) for e in examples]  # a prompt cut otherwise: not merged
        members: dict[tuple, list[int]] = {}
        for b, key in enumerate(keys):
            members.setdefault(key, []).append(b)
        if len(members) == len(examples):
            return None
        s = len(members)
        segments, pair_sequences = [], [(0, 0)] * len(examples)
        for index, pairs in enumerate(members.values()):
            responses: list[list[int]] = []  # distinct responses in the order the pairs name them
            for b in pairs:
                sides = [list(examples[b]["chosen_input_ids"]), list(examples[b]["rejected_input_ids"])]
                if len(pairs) == 1:  # a group that appears once: prompt | chosen | rejected, as without merging
                    responses = sides
                    pair_sequences[b] = (index, s + index)
                    continue
                for side in sides:
                    if side not in responses:
                        responses.append(side)
                chosen, rejected = (responses.index(side) for side in sides)
                pair_sequences[b] = (chosen * s + index, rejected * s + index)
            segments.append((list(examples[pairs[0]]["prompt_input_ids"]),
                             [(response, j * s + index) for j, response in enumerate(responses)]))
        return segments, s, pair_sequences

    def layout(self, segments: list, lengths: list[int]) -> tuple[list[list[int]], bool]:
        """Segment indices per row, and whether attention is segmented (``attention_layout``, class docstring)."""
        every_segment_in_one_row = [list(range(len(lengths)))]
        if self.attention_layout == "segmented":
            return every_segment_in_one_row, True
        rows = choose_rows(lengths)
        if self.attention_layout == "auto" and segmented_pays(
                [segment_parts(segment) for segment in segments], len(rows), row_width(rows, lengths)):
            return every_segment_in_one_row, True
        return rows, False

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        merged = self.merged_segments(examples)
        segments, stride, pair_sequences = merged or (self.segments(examples), len(examples), None)
        lengths = [len(prompt) + sum(len(r) for r, _ in responses) for prompt, responses in segments]
        rows, segmented = self.layout(segments, lengths)
        width = row_width(rows, lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        segment_ids = torch.full((len(rows), width), PAD_SEGMENT, dtype=torch.long)
        branch_ids = torch.full((len(rows), width), PROMPT, dtype=torch.long)
        pred_rows, targets, seq_index, spans = [], [], [], []
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                prompt, responses = segments[i]
                n_p, end = len(prompt), start + lengths[i]
                spans.append((r, start, 0, *segment_parts(segments[i])))
                input_ids[r, start : start + n_p] = torch.tensor(prompt, dtype=torch.long)
                position_ids[r, start : start + n_p] = torch.arange(n_p)
                segment_ids[r, start:end] = i
                offset = start + n_p
                for response, seq in responses:
                    n = len(response)
                    span = slice(offset, offset + n)
                    input_ids[r, span] = torch.tensor(response, dtype=torch.long)
                    position_ids[r, span] = torch.arange(n_p, n_p + n)
                    branch_ids[r, span] = CHOSEN + seq // stride  # response j of its segment: CHOSEN + j
                    # Token k is predicted by the position before it: the prompt's last for k = 0 (with no prompt,
                    # nothing predicts it, as in the padded form), its own response's previous token after that.
                    first = 0 if n_p else 1
                    predictors = ([start + n_p - 1] if n_p else []) + list(range(offset, offset + n - 1))
                    pred_rows += [r * width + position for position in predictors]
                    targets += response[first:]
                    seq_index += [seq] * (n - first)
                    offset += n
                start = end
            if start < width:
                spans.append((r, start, width - start))
        batch = {
            "input_ids": input_ids, "position_ids": position_ids, "segment_ids": segment_ids, "branch_ids": branch_ids,
            "pred_rows": torch.tensor(pred_rows, dtype=torch.long), "targets": torch.tensor(targets, dtype=torch.long),
            "seq_index": torch.tensor(seq_index, dtype=torch.long),
        }
        if segmented:
            columns = max(len(span) for span in spans)
            batch["attention_spans"] = torch.tensor([(*span, *[0] * (columns - len(span))) for span in spans],
                                                    dtype=torch.long)
        batch.update(group_columns(examples) if any(map(is_group, examples)) else self._pair_columns(examples))
        if pair_sequences is not None:
            batch["pair_sequences"] = torch.tensor(pair_sequences, dtype=torch.long)
        return batch

    @staticmethod
    def _pair_columns(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """``pair_tokens`` (B,), and the reference columns (B,) the pairs carry."""
        out = {"pair_tokens": torch.tensor([2 * len(e["prompt_input_ids"]) + len(e["chosen_input_ids"])
                                            + len(e["rejected_input_ids"]) for e in examples], dtype=torch.long)}
        for column in REFERENCE_COLUMNS:
            if column in examples[0]:
                out[column] = torch.tensor([e[column] for e in examples], dtype=torch.float32)
        return out
