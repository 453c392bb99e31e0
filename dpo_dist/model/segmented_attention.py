"""Packed rows' attention one segment at a time: the kernel computes each segment's own blocks, not whole rows.

A packed row holds several ``prompt | response_0 | ... | response_k-1`` segments (a pair's: ``prompt | chosen |
rejected``; ``dpo_dist.data.packing``). With the dense ``(R, 1, W, W)`` mask the kernel computes every query of a row
against every key of it; on the CPU it skips no masked block. Given the batch's ``attention_spans``,
:func:`segmented_attention` instead runs, per segment:

- ``prompt | first response``: one causal block (what a sequence of its own computes);
- each later response's queries against the prompt's keys and its own (causal from the end of the prompt): the same
  keys a ``prompt | response`` sequence gives those tokens, the other responses left out;
- a row's padding: one causal block, as the dense mask treats it (a segment of its own).

A sliding window counts position ids, as :func:`dpo_dist.model.attention.packed_mask` does (where it could cut a block,
that block gets an explicit mask). The result equals the dense mask's to fp32 rounding (the kernel sums other
blocks in another order; tests/test_exactness.py), pads included.

The model's layers reach it through transformers' attention interface: :func:`install` wraps the registered ``sdpa``
function so that a forward given ``packed_attention_spans=`` (``dpo_dist.train.logprobs.packed_forward`` passes it;
the kwarg travels through the model to each attention call, and gradient checkpointing replays it) runs here, and
every other call runs the original unchanged. Such a forward's mask is a stand-in that would mask every key, so a
layer the spans did not reach raises instead of passing for exact, and :func:`expect_every_layer` checks that every
layer ran here.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

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
    groups = q.shape[1] // k.shape[1]
    if groups > 1 and mask is not None and q.device.type != "cpu":
        # CUDA's fused kernels take grouped key/value heads only without a mask (else SDPA's math fallback)
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def _heads_first(piece: torch.Tensor) -> torch.Tensor:
    """(L, H, D) -> (1, H, L, D), a view."""
    return piece.transpose(0, 1).unsqueeze(0)


def span_sizes(spans: Sequence[Sequence[int]]) -> list[int]:
    """The lengths of the pieces :func:`segmented_attention` splits a batch's flat positions into, in row order: per
    span ``prompt + response_0 + padding`` (the first block), then each later response with tokens.

    Shape: spans (S, 4 + K) as ``attention_spans`` -> a list of ints summing to R * W."""
    sizes = []
    for _, _, padding, prompt, *responses in spans:
        first, later = (responses[0], responses[1:]) if responses else (0, [])
        sizes += [prompt + first + padding] + [n for n in later if n]
    return sizes


def segmented_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        spans: Sequence[Sequence[int]], *, scale: float | None = None, dropout: float = 0.0,
                        window: int | None = None) -> torch.Tensor:
    """Attention over packed rows, a segment's parts at a time (module docstring).

    ``spans``: ``(row, start, padding, prompt, response_0, ..., response_K-1)`` per part of a row, in row order,
    covering every position (``PackedPairCollator``'s ``attention_spans``; a response of length 0, or a column past
    a segment's own responses, has no queries and costs no call). The inputs are split once each into the parts'
    pieces, views of them (so the backward joins the pieces' gradients in one concatenation, where indexing each
    piece out would add a full-size gradient per piece); only each later response's keys and values are copied,
    joined to the prompt's.

    Shape: query (R, Hq, W, D), key and value (R, Hkv, W, D) -> (R, W, Hq, D) contiguous (what transformers'
    attention functions return).
    """
    rows, _, width, _ = query.shape
    # transformers' projections are (R, W, H, D) in memory: views, one flat sequence of R * W positions
    flat = [t.transpose(1, 2).reshape(rows * width, t.shape[1], t.shape[3]) for t in (query, key, value)]
    sizes = span_sizes(spans)
    if sum(sizes) != rows * width:
        raise ValueError(f"attention_spans cover {sum(sizes)} positions, the batch has {rows} x {width}")
    q_pieces, k_pieces, v_pieces = (iter(t.split(sizes)) for t in flat)
    outputs = []
    block = dict(scale=scale, dropout=dropout)
    for _, _, padding, prompt, *responses in spans:
        q, k, v = next(q_pieces), next(k_pieces), next(v_pieces)
        outputs.append(_attend(_heads_first(q), _heads_first(k), _heads_first(v), 0, None if padding else window,
                               **block))
        for n in responses[1:]:
            if not n:
                continue
            # its queries continue the prompt's positions; its keys: the prompt's, then its own
            k_later = torch.cat([k[:prompt], next(k_pieces)])
            v_later = torch.cat([v[:prompt], next(v_pieces)])
            outputs.append(_attend(_heads_first(next(q_pieces)), _heads_first(k_later), _heads_first(v_later),
                                   prompt, window, **block))
    out = torch.cat([o.transpose(1, 2) for o in outputs], dim=1)  # (1, R * W, Hq, D)
    return out.view(rows, width, out.shape[2], out.shape[3])


_ORIGINAL: dict[str, Any] = {}
_CALLS = [0]  # segmented attention calls so far: a forward given spans must have run one per layer
REFUSED = ("softcap", "position_bias", "s_aux", "head_mask")  # what segmented attention does not apply


def is_unused_mask(mask: Any) -> bool:
    """Whether ``mask`` is ``dpo_dist.model.attention.unused_mask``'s stand-in (an expanded boolean scalar)."""
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and mask.dim() == 4 and not any(mask.stride())


def _sdpa_or_segmented(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' ``sdpa`` attention function, or :func:`segmented_attention` where the forward was given spans."""
    spans = kwargs.pop(SPANS_KWARG, None)
    if spans is None:
        if is_unused_mask(attention_mask):
            raise RuntimeError("a packed forward laid out for segmented attention reached an attention layer without "
                               f"its spans ({SPANS_KWARG}); use train.attention_layout=dense")
        return _ORIGINAL["sdpa"](module, query, key, value, attention_mask, *args, **kwargs)
    if args:
        raise TypeError(f"segmented attention takes its options by keyword, got {len(args)} positional")
    refused = [name for name in REFUSED if kwargs.get(name) is not None]
    refused += ["is_causal=False"] if kwargs.get("is_causal") is False else []
    if refused:
        raise ValueError(f"segmented attention does not apply {', '.join(refused)}; use train.attention_layout=dense")
    _CALLS[0] += 1
    out = segmented_attention(query, key, value, spans, scale=kwargs.get("scaling"), dropout=kwargs.get("dropout", 0.0),
                              window=kwargs.get("sliding_window"))
    return out, None


@contextlib.contextmanager
def expect_every_layer(layers: int) -> Iterator[None]:
    """Raise after a forward given spans unless segmented attention ran in each of ``layers`` attention layers (a
    layer that dropped the spans would have met the stand-in mask and raised; one whose attention function is not
    the registered ``sdpa`` would not)."""
    before = _CALLS[0]
    yield
    ran = _CALLS[0] - before
    if ran != layers:
        raise RuntimeError(f"segmented attention ran in {ran} of the model's {layers} attention layers (is "
                           f"transformers' sdpa attention function overridden?); use train.attention_layout=dense")


def install() -> None:
    """Register :func:`_sdpa_or_segmented` as transformers' ``sdpa`` attention function (idempotent; calls without
    spans run the original unchanged)."""
    from transformers.modeling_utils import AttentionInterface

    if "sdpa" not in _ORIGINAL:
        _ORIGINAL["sdpa"] = AttentionInterface._global_mapping["sdpa"]
        AttentionInterface.register("sdpa", _sdpa_or_segmented)
