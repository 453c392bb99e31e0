"""Packed rows' attention one segment at a time: the kernel computes each segment's own blocks, not whole rows.

A packed row holds several ``prompt | chosen | rejected`` segments (``dpo_dist.data.packing``). With the dense
``(R, 1, W, W)`` mask the kernel computes every query of a row against every key of it; on the CPU it skips no
masked block. Given the batch's ``attention_spans``, :func:`segmented_attention` instead runs, per segment:

- ``prompt | first response``: one causal block (what a sequence of its own computes);
- the second response's queries against the prompt's keys and its own (causal from the end of the prompt): the same
  keys a ``prompt | second`` sequence gives those tokens, the first response left out;
- a row's padding: one causal block, as the dense mask treats it (a segment of its own).

A sliding window counts position ids, as :func:`dpo_dist.data.packing.packed_mask` does (where it could cut a block,
that block gets an explicit mask). The result equals the dense mask's to fp32 rounding (the kernel sums other
blocks in another order; tests/test_exactness.py), pads included.

The model's layers reach it through transformers' attention interface: :func:`install` wraps the registered ``sdpa``
function so that a forward given ``packed_attention_spans=`` (``dpo_dist.train.logprobs.packed_forward`` passes it;
the kwarg travels through the model to each attention call, and gradient checkpointing replays it) runs here, and
every other call runs the original unchanged.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

SPANS_KWARG = "packed_attention_spans"


def _mask(queries: int, keys: int, first_query: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Which keys each query sees, by position: query ``i`` sits at ``first_query + i``, key ``k`` at ``k``; a key at
    or before the query and (with a window) fewer than ``window`` positions back. Shape: (queries, keys) bool."""
    q = torch.arange(first_query, first_query + queries, device=device)[:, None]
    k = torch.arange(keys, device=device)[None, :]
    visible = k <= q
    if window is not None:
        visible &= (q - k) < window
    return visible


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_query: int, window: int | None, *,
            scale: float | None, dropout: float) -> torch.Tensor:
    """One block through SDPA: causal by position (query ``i`` at ``first_query + i``, keys from position 0), with
    the window where it reaches inside the block. Shapes: q (1, Hq, Lq, D), k/v (1, Hkv, Lk, D) -> (1, Hq, Lq, D)."""
    queries, keys = q.shape[2], k.shape[2]
    square = first_query == 0 and queries == keys
    cut = window is not None and first_query + queries - 1 >= window  # some query reaches further back than window
    mask = None if square and not cut else _mask(queries, keys, first_query, window if cut else None, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _heads_first(piece: torch.Tensor) -> torch.Tensor:
    """(L, H, D) -> (1, H, L, D), a view."""
    return piece.transpose(0, 1).unsqueeze(0)


def segmented_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        spans: Sequence[Sequence[int]], *, scale: float | None = None, dropout: float = 0.0,
                        window: int | None = None) -> torch.Tensor:
    """Attention over packed rows, a segment's parts at a time (module docstring).

    ``spans``: ``(row, start, prompt, first, second, padding)`` per part of a row, in row order, covering every
    position (``PackedPairCollator``'s ``attention_spans``). Each piece is a view of the inputs (split once per
    tensor, so the backward concatenates the pieces' gradients once instead of adding a full-size gradient per piece).

    Shape: query (R, Hq, W, D), key and value (R, Hkv, W, D) -> (R, W, Hq, D) contiguous (what transformers'
    attention functions return).
    """
    rows, _, width, _ = query.shape
    # transformers' projections are (R, W, H, D) in memory: these are views, one flat sequence of R * W positions
    q_flat, k_flat, v_flat = (t.transpose(1, 2).reshape(rows * width, t.shape[1], t.shape[3]) for t in (query, key, value))
    q_sizes, kv_sizes = [], []
    for _, _, prompt, first, second, padding in spans:
        q_sizes += [prompt + first + padding] + ([second] if second else [])
        kv_sizes += [prompt, first + padding] + ([second] if second else [])
    if sum(q_sizes) != rows * width:
        raise ValueError(f"attention_spans cover {sum(q_sizes)} positions, the batch has {rows} x {width}")
    q_pieces, k_pieces, v_pieces = (iter(t.split(sizes)) for t, sizes in
                                    ((q_flat, q_sizes), (k_flat, kv_sizes), (v_flat, kv_sizes)))
    outputs = []
    for _, _, prompt, first, second, padding in spans:
        k_prompt, k_first, v_prompt, v_first = next(k_pieces), next(k_pieces), next(v_pieces), next(v_pieces)
        block = dict(scale=scale, dropout=dropout)
        outputs.append(_attend(_heads_first(next(q_pieces)), _heads_first(torch.cat([k_prompt, k_first])),
                               _heads_first(torch.cat([v_prompt, v_first])), 0, None if padding else window, **block))
        if second:  # its queries continue the prompt's positions; its keys: the prompt's, then its own
            k_second, v_second = next(k_pieces), next(v_pieces)
            outputs.append(_attend(_heads_first(next(q_pieces)), _heads_first(torch.cat([k_prompt, k_second])),
                                   _heads_first(torch.cat([v_prompt, v_second])), prompt, window, **block))
    out = torch.cat([o.transpose(1, 2) for o in outputs], dim=1)  # (1, R * W, Hq, D)
    return out.view(rows, width, out.shape[2], out.shape[3])


_ORIGINAL: dict[str, Any] = {}


def _sdpa_or_segmented(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention function, or :func:`segmented_attention` where the forward was given spans."""
    spans = kwargs.pop(SPANS_KWARG, None)
    if spans is None:
        return _ORIGINAL["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)
    for unsupported in ("softcap", "position_bias", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"segmented attention does not apply {unsupported}; use train.attention_layout=dense")
    if args:
        raise TypeError(f"segmented attention takes its options by keyword, got {len(args)} positional")
    out = segmented_attention(query, key, value, spans, scale=kwargs.get("scaling"), dropout=kwargs.get("dropout", 0.0),
                              window=kwargs.get("sliding_window"))
    return out, None


def install() -> None:
    """Register :func:`_sdpa_or_segmented` as transformers' ``sdpa`` attention function (idempotent; calls without
    spans run the original unchanged). A forward that reached the original with spans would still be exact: the
    dense mask is passed alongside them."""
    from transformers.modeling_utils import AttentionInterface

    if "sdpa" not in _ORIGINAL:
        _ORIGINAL["sdpa"] = AttentionInterface._global_mapping["sdpa"]
        AttentionInterface.register("sdpa", _sdpa_or_segmented)
