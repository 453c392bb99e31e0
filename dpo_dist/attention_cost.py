"""What attention costs on the kernels packed rows run on, in query-key pairs of work: the cost model by which
``dpo_dist.data.packing`` lays out packed rows (how wide its dense rows are, and per batch whether the segmented
layout pays) for the attention of ``dpo_dist.model.attention`` and ``dpo_dist.model.segmented_attention``.

Measured on CPU kernels (``benchmarks/attention_layout.py``); ``train.attention_layout=auto`` weighs the layouts on
CPU only. Plain arithmetic, no torch, at the top of the package like ``config``: it models the model stage's kernels
and the data stage lays out rows by it, and a data module may not import the model stage, so it lives where both
may read it.
"""

from __future__ import annotations

from typing import Sequence

# What one more attention kernel call costs, as query-key pairs of work: measured with SmolLM2-135M's attention
# shapes (9 heads, 3 key/value heads, head dim 64) forward and backward on 2 CPU cores (benchmarks/attention_layout.py).
CALL_COST = 7_000
# What a position costs in the linear layers, in the same units (SmolLM2-sized layers on the same CPU): where a
# dense row of this width spends as much on attention per position as on the rest of the layer.
POSITION_COST = 2048


def dense_cost(rows: int, width: int, attention_tokens: int = POSITION_COST) -> float:
    """The cost of ``rows`` packed rows ``width`` wide under a dense mask, ``rows x width x (1 + width /
    attention_tokens)``: every position pays for the linear layers, and attention grows with the row's width too (a
    boolean mask is computed in full). 2048 is where, on the CPU kernels measured here, attention costs as much per
    position as the rest of a SmolLM2-sized layer."""
    return rows * width * (1 + width / attention_tokens)


def segmented_pays(parts: Sequence[Sequence[int]], rows: int, width: int, *,
                   position_cost: int = POSITION_COST, call_cost: int = CALL_COST) -> bool:
    """Whether the segmented layout (all segments in one row, no padding; ``parts``: each segment's ``(prompt,
    response_0, ..., response_k-1)`` lengths, any k) costs less than the dense mask over ``rows x width``.

    Both in query-key pairs of attention work: every position costs ``position_cost`` (the linear layers, as in
    :func:`dense_cost`); the dense mask computes ``width`` keys for each of its ``rows x width`` queries; the
    segmented layout computes each part's block in full (the CPU kernel's backward skips little of a causal block):
    ``prompt | response_0`` as one, and each later response's queries against the prompt and itself; and it pays
    ``call_cost`` for each kernel call, one per part (a response with no tokens has none)."""
    dense = rows * width * (position_cost + width)
    segmented = 0
    for prompt, *responses in parts:
        first = responses[0] if responses else 0
        segmented += (prompt + sum(responses)) * position_cost + (prompt + first) ** 2 + call_cost
        for n in responses[1:]:
            if n:
                segmented += n * (prompt + n) + call_cost
    return segmented < dense
