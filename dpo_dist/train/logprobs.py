"""Per-sequence log-probabilities of response tokens, computed in chunks.

``sequence_logps`` never materializes a full fp32 log-softmax over the vocabulary: it scores only the labelled
positions, a chunk of rows at a time, and its backward recomputes each chunk's softmax instead of storing it. Peak
extra memory is ``chunk_size x vocab`` fp32 however long the batch is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo_dist.data.collate import IGNORE_INDEX
from dpo_dist.model.attention import packed_attention

DEFAULT_CHUNK_SIZE = 1024


def _log_collision(logits: torch.Tensor, logsumexp: torch.Tensor) -> torch.Tensor:
    """log sum_v p(v)^2 of softmax(logits), the log-probability that two draws agree (WPO's normalizer), without
    grad. Shape: logits (c, V) fp32, logsumexp (c,) -> (c,)."""
    with torch.no_grad():
        return torch.logsumexp(2.0 * logits, dim=-1) - 2.0 * logsumexp


class _TokenLogps(torch.autograd.Function):
    """log softmax(logits[rows])[targets], chunked, and (``collision=True``) each row's :func:`_log_collision`, not
    differentiable (else an empty tensor). logits: (M, V) any float dtype; rows, targets: (K,) int64 (a row may be
    scored more than once) -> (K,) float32, (K,) or (0,) float32."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, chunk_size: int,
                collision: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        token_logps = torch.empty(rows.numel(), dtype=torch.float32, device=logits.device)
        logsumexps = torch.empty_like(token_logps)
        collisions = torch.empty(rows.numel() if collision else 0, dtype=torch.float32, device=logits.device)
        for start in range(0, rows.numel(), chunk_size):
            end = start + chunk_size
            chunk = logits[rows[start:end]].float()  # (c, V)
            logsumexp = torch.logsumexp(chunk, dim=-1)
            token_logps[start:end] = chunk.gather(1, targets[start:end, None]).squeeze(1) - logsumexp
            logsumexps[start:end] = logsumexp
            if collision:
                collisions[start:end] = _log_collision(chunk, logsumexp)
        ctx.save_for_backward(logits, rows, targets, logsumexps)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(collisions)
        return token_logps, collisions

    @staticmethod
    def backward(ctx, grad_token_logps: torch.Tensor, _grad_collisions: torch.Tensor | None = None):
        logits, rows, targets, logsumexps = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        for start in range(0, rows.numel(), ctx.chunk_size):
            end = start + ctx.chunk_size
            grad = grad_token_logps[start:end, None].float()  # (c, 1)
            # d/dx [x_t - logsumexp(x)] = onehot(t) - softmax(x)
            chunk_grad = torch.exp(logits[rows[start:end]].float() - logsumexps[start:end, None]) * -grad
            chunk_grad.scatter_add_(1, targets[start:end, None], grad)
            # index_add, not assignment: a row scored more than once (packed, the prompt's last position predicts
            # every response's first token) gets every gradient
            grad_logits.index_add_(0, rows[start:end], chunk_grad.to(grad_logits.dtype))
        return grad_logits, None, None, None, None


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's labelled tokens, and how many tokens were labelled.

    Position ``t`` of ``logits`` predicts ``labels[:, t + 1]``; labels equal to ``-100`` (prompt, padding) are not
    scored.

    Shape: logits (N, T, V); labels (N, T) -> logps (N,) float32, token_counts (N,) int64.
    """
    token_logps, _, seq_index, _ = scored_token_logps(logits, labels, chunk_size=chunk_size)
    n = logits.shape[0]
    logps = torch.zeros(n, dtype=torch.float32, device=logits.device).index_add(0, seq_index, token_logps)
    return logps, (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def scored_token_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE, collision: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each labelled token's log-prob, row-major, with its row and position (and, ``collision=True``, its position's
    log sum_v p(v)^2, detached; else an empty tensor).

    Shape: logits (N, T, V); labels (N, T) -> token_logps (K,) float32, collisions (K,) or (0,), row (K,),
    position (K,).
    """
    n, t, v = logits.shape
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX  # (N, T-1)
    seq_index, pos_index = scored.nonzero(as_tuple=True)
    rows = seq_index * t + pos_index  # flat row of logits[n, pos] in a (N*T, V) view
    token_logps, collisions = _TokenLogps.apply(logits.reshape(n * t, v), rows, targets[scored], chunk_size,
                                                collision)
    return token_logps, collisions, seq_index, pos_index


@dataclass
class PairLogps:
    """Log-probs of both sides of B pairs. Shape: each (B,).

    ``*_shared_logps`` (asked for with ``shared=True``, else None): summed over the first ``min(chosen_tokens,
    rejected_tokens)`` response tokens of each side, the part both responses of the pair have (LD-DPO).
    ``*_aligned_logps`` (``aligned=True``, else None): ``sum_t [log p(y_t) - log sum_v p(v)^2]`` over the response,
    detached (WPO's weight, :func:`dpo_dist.train.loss.wpo_weights`)."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    chosen_shared_logps: torch.Tensor | None = None
    rejected_shared_logps: torch.Tensor | None = None
    chosen_aligned_logps: torch.Tensor | None = None
    rejected_aligned_logps: torch.Tensor | None = None


def response_ranks(seq_index: torch.Tensor, order: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Each scored token's 0-based place within its own response: tokens of sequence ``s`` ranked by ``order`` (any
    key increasing along the response, such as the position or the packed row that predicts it).

    Shape: seq_index, order (K,) int64 -> (K,) int64.
    """
    if seq_index.numel() == 0:
        return seq_index.clone()
    key = seq_index * (int(order.max()) + 1) + order
    by_key = torch.argsort(key)
    counts = torch.bincount(seq_index, minlength=n_seq)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(seq_index)
    ranks[by_key] = torch.arange(seq_index.numel(), device=seq_index.device) - starts[seq_index[by_key]]
    return ranks


def pair_sums(token_logps: torch.Tensor, collisions: torch.Tensor, seq_index: torch.Tensor, order: torch.Tensor,
              b: int, *, shared: bool = False, aligned: bool = False,
              pair_sequences: torch.Tensor | None = None) -> PairLogps:
    """A :class:`PairLogps` from scored tokens: sequence ``s < b`` is pair ``s``'s chosen response, ``b + s`` its
    rejected one; ``order`` increases along each response (:func:`response_ranks`).

    ``pair_sequences`` (B, 2) instead names each pair's chosen and rejected sequence (a batch whose pairs of one group
    share a segment, :class:`dpo_dist.data.packing.PackedPairCollator`): a sequence may be a side of several pairs.
    Each pair's fields are then gathered from its sequences' sums (:func:`merged_pair_sums`).

    Shape: token_logps, seq_index, order (K,); collisions (K,) when ``aligned`` -> each field (B,).
    """
    if pair_sequences is not None:
        return merged_pair_sums(token_logps, collisions, seq_index, order, pair_sequences, shared=shared,
                                aligned=aligned)
    device = token_logps.device

    def per_sequence(values: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(2 * b, dtype=dtype, device=device).index_add(0, seq_index, values)

    logps = per_sequence(token_logps)
    tokens = per_sequence(torch.ones_like(seq_index), torch.long)
    out = PairLogps(logps[:b], logps[b:], tokens[:b], tokens[b:])
    if shared:
        shared_len = torch.minimum(tokens[:b], tokens[b:]).repeat(2)  # (2B,)
        in_shared = response_ranks(seq_index, order, 2 * b) < shared_len[seq_index]
        shared_logps = per_sequence(token_logps * in_shared)
        out.chosen_shared_logps, out.rejected_shared_logps = shared_logps[:b], shared_logps[b:]
    if aligned:
        aligned_logps = per_sequence(token_logps.detach() - collisions)
        out.chosen_aligned_logps, out.rejected_aligned_logps = aligned_logps[:b], aligned_logps[b:]
    return out


def merged_pair_sums(token_logps: torch.Tensor, collisions: torch.Tensor, seq_index: torch.Tensor,
                     order: torch.Tensor, pair_sequences: torch.Tensor, *, shared: bool = False,
                     aligned: bool = False) -> PairLogps:
    """A :class:`PairLogps` of pairs whose responses are sequences of a batch, several pairs naming one sequence
    (``pair_sequences`` (B, 2): each pair's chosen and rejected): each sequence summed once, each pair's sides gathered
    from them (the gradient of a sequence used by several pairs is the sum of theirs).

    LD-DPO's shared-prefix sums depend on the pair (the first ``min(chosen_tokens, rejected_tokens)`` tokens, and a
    response meets partners of other lengths), so they are taken per pair side from the sequence's tokens laid out by
    their place in it (``order``, :func:`response_ranks`): a (sequences, longest) table, summed under each side's
    prefix.

    Shape: token_logps, seq_index, order (K,); collisions (K,) when ``aligned``; pair_sequences (B, 2) -> each
    field (B,).
    """
    # sequence j * S + s: S segments of at most B pairs, each with at most 2B responses; a bound from the shape, not
    # the values, which would wait for the device here
    n_seq = 2 * pair_sequences.shape[0] ** 2
    chosen, rejected = pair_sequences[:, 0], pair_sequences[:, 1]

    def per_sequence(values: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(n_seq, dtype=dtype, device=token_logps.device).index_add(0, seq_index, values)

    logps = per_sequence(token_logps)
    tokens = per_sequence(torch.ones_like(seq_index), torch.long)
    out = PairLogps(logps[chosen], logps[rejected], tokens[chosen], tokens[rejected])
    if shared:  # reads values on the host, as pair_sums' shared sums do (response_ranks)
        used = int(pair_sequences.max()) + 1
        ranks = response_ranks(seq_index, order, used)
        longest = int(tokens.max())
        table = torch.zeros(used, longest, dtype=torch.float32, device=token_logps.device)
        table = table.index_put((seq_index, ranks), token_logps)  # [sequence, place in it]
        shared_len = torch.minimum(out.chosen_tokens, out.rejected_tokens)  # (B,)
        in_shared = torch.arange(longest, device=table.device)[None, :] < shared_len[:, None]  # (B, longest)
        out.chosen_shared_logps = (table[chosen] * in_shared).sum(1)
        out.rejected_shared_logps = (table[rejected] * in_shared).sum(1)
    if aligned:
        aligned_logps = per_sequence(token_logps.detach() - collisions)
        out.chosen_aligned_logps, out.rejected_aligned_logps = aligned_logps[chosen], aligned_logps[rejected]
    return out


def padded_token_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
    collision: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over a :class:`dpo_dist.data.collate.PreferenceCollator` batch's rows, and
    :func:`scored_token_logps` of it. Shape: -> token_logps (T,), collisions (T,) or (0,), row (T,), position (T,)."""
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    return scored_token_logps(outputs.logits, batch["labels"], chunk_size=chunk_size, collision=collision)


def concatenated_forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
    shared: bool = False, aligned: bool = False,
) -> PairLogps:
    """Score chosen and rejected in one forward over the collator's ``2B`` rows (chosen first)."""
    if "pair_tokens" not in batch:
        raise ValueError("this padded batch holds groups (responses_input_ids): score it with group_logps")
    token_logps, collisions, seq_index, pos_index = padded_token_logps(model, batch, chunk_size=chunk_size,
                                                                       collision=aligned)
    b = batch["labels"].shape[0] // 2
    return pair_sums(token_logps, collisions, seq_index, pos_index, b, shared=shared, aligned=aligned)


class _HeadLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[targets], chunked, from hidden states: the LM head runs only on the
    scored positions, and no (tokens, vocab) logits are ever held.

    Backward, two ways. A frozen head (LoRA, or the reference) needs only the hidden states' gradient, and token k's
    log-prob depends on its own hidden state alone, with gradient ``J_k = weight[t_k] - softmax_k @ weight``: the
    forward computes J (K, H) from each chunk's softmax while it has it, and the backward just scales it (no logits
    recomputed). A trainable head recomputes each chunk's logits in the backward for the weight's gradient.

    ``collision=True``: also each position's :func:`_log_collision`, not differentiable (else an empty tensor).

    hidden: (K, H); weight: (V, H); bias: (V,) or None; targets: (K,) int64 -> (K,) float32, (K,) or (0,) float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, precompute_jacobian, collision=False):
        token_logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        logsumexps = torch.empty_like(token_logps)
        collisions = torch.empty(hidden.shape[0] if collision else 0, dtype=torch.float32, device=hidden.device)
        jacobian = torch.empty_like(hidden) if precompute_jacobian else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = torch.nn.functional.linear(hidden[start:end], weight, bias).float()  # (c, V)
            logsumexps[start:end] = torch.logsumexp(logits, dim=-1)
            token_logps[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - logsumexps[start:end]
            if collision:
                collisions[start:end] = _log_collision(logits, logsumexps[start:end])
            if precompute_jacobian:
                probs = torch.exp(logits.sub_(logsumexps[start:end, None])).to(weight.dtype)
                jacobian[start:end] = (weight[targets[start:end]] - probs @ weight).to(hidden.dtype)
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexps, jacobian)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(collisions)
        return token_logps, collisions

    @staticmethod
    def backward(ctx, grad_token_logps, _grad_collisions=None):
        hidden, weight, bias, targets, logsumexps, jacobian = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if jacobian is not None and not (need_weight or need_bias):
            return grad_token_logps[:, None].to(jacobian.dtype) * jacobian, None, None, None, None, None, None
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            grad = grad_token_logps[start:end, None].float()
            logits = torch.nn.functional.linear(hidden[start:end], weight, bias).float()
            grad_logits = torch.exp(logits - logsumexps[start:end, None]) * -grad  # onehot(t) - softmax(x), scaled
            grad_logits.scatter_add_(1, targets[start:end, None], grad)
            if need_hidden:
                grad_hidden[start:end] = (grad_logits.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_weight:
                grad_weight += grad_logits.T @ hidden[start:end].float()
            if need_bias:
                grad_bias += grad_logits.sum(0)
        return (grad_hidden, grad_weight.to(weight.dtype) if need_weight else None,
                grad_bias.to(bias.dtype) if need_bias else None, None, None, None, None)


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head (a Linear over the vocabulary) of a causal LM, through DDP and PEFT wrappers."""
    model = getattr(model, "module", model)
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(f"packed scoring needs a Linear LM head, found {type(head).__name__}")
    return head


def head_is_sharded(head: torch.nn.Module, model: torch.nn.Module | None = None) -> bool:
    """Whether the LM head's weight lives in shards that only the model's forward gathers: DeepSpeed ZeRO-3 (a
    partitioned parameter, ``ds_id``) or FSDP2 (a ``DTensor``, or a head in or under a ``fully_shard``-ed module:
    a unit not resharded after its forward, as Accelerate's LM-head unit, holds the plain gathered weight from a
    forward without grad until the next backward)."""
    weight = head.weight
    if hasattr(weight, "ds_id"):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(weight, DTensor) or any(isinstance(m, FSDPModule) for m in (head, model) if m is not None)


def packed_token_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
    head_in_forward: bool | None = None, collision: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each scored token's log-prob in a :class:`dpo_dist.data.packing.PackedPairCollator` batch (pairs or groups),
    in the batch's order (``targets``, ``seq_index``), and (``collision=True``) its position's log sum_v p(v)^2,
    detached (else an empty tensor): one forward over the packed rows (through the model's own ``forward``, so DDP
    and hooks see it) with the mask its kernel and layer types take (:func:`dpo_dist.model.attention.packed_attention`:
    with the batch's ``attention_spans`` under sdpa, a segment at a time), the LM head on the scored positions only.

    Where the head is sharded (ZeRO-3, FSDP2: ``head_in_forward=None`` finds out) it must run inside the forward,
    which gathers it: the scored positions go in as ``logits_to_keep`` (a boolean (R, W) mask), the forward returns
    their logits ``(P, V)`` in the model's dtype, and the log-softmax is taken in fp32 a chunk at a time
    (:func:`sequence_logps`' function). Elsewhere the head runs here, from the final hidden states, and no
    ``(tokens, vocab)`` logits are held at all (:class:`_HeadLogps`).

    Shape: batch as the collator's -> (T,) float32, (T,) or (0,) float32 (T: scored tokens)."""
    head = output_head(model)
    if head_in_forward is None:
        head_in_forward = head_is_sharded(head, model)
    attention, every_layer_checked = packed_attention(model, batch)
    if head_in_forward:
        keep = torch.zeros(batch["input_ids"].numel(), dtype=torch.bool, device=batch["pred_rows"].device)
        keep[batch["pred_rows"]] = True
        with every_layer_checked:
            outputs = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                            logits_to_keep=keep.view_as(batch["input_ids"]), **attention)
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])  # (P, V): the kept positions, row-major
        rows = torch.searchsorted(keep.nonzero()[:, 0], batch["pred_rows"])  # each scored token's logits row
        return _TokenLogps.apply(logits, rows, batch["targets"], chunk_size, collision)
    with every_layer_checked:
        outputs = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                        output_hidden_states=True, logits_to_keep=1, **attention)
    hidden = outputs.hidden_states[-1].to(head.weight.dtype)  # accelerate's autocast hands back fp32 outputs
    hidden = hidden.reshape(-1, hidden.shape[-1])[batch["pred_rows"]]  # (T, H); a row scored k times: gathered k times
    frozen_head = not head.weight.requires_grad and (head.bias is None or not head.bias.requires_grad)
    precompute_jacobian = torch.is_grad_enabled() and hidden.requires_grad and frozen_head
    return _HeadLogps.apply(hidden, head.weight, head.bias, batch["targets"], chunk_size, precompute_jacobian,
                            collision)


def packed_forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
    head_in_forward: bool | None = None, shared: bool = False, aligned: bool = False,
) -> PairLogps:
    """Score a :class:`dpo_dist.data.packing.PackedPairCollator` batch of pairs (:func:`packed_token_logps`) and sum
    each side's tokens (with ``pair_sequences``, the pairs of one group sharing a segment: each sequence once, each
    pair's sides gathered from them, :func:`merged_pair_sums`)."""
    if "pair_tokens" not in batch:
        raise ValueError("this packed batch holds groups (responses_input_ids): score it with group_logps")
    token_logps, collisions = packed_token_logps(model, batch, chunk_size=chunk_size, head_in_forward=head_in_forward,
                                                 collision=aligned)
    # a response's tokens are predicted from increasing packed rows (with a shared prompt, the rejected response's
    # first token from the prompt's last row, before its own rows): pred_rows orders each response
    return pair_sums(token_logps, collisions, batch["seq_index"], batch["pred_rows"], batch["pair_tokens"].shape[0],
                     shared=shared, aligned=aligned, pair_sequences=batch.get("pair_sequences"))


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
               shared: bool = False, aligned: bool = False) -> PairLogps:
    """Both sides' log-probs of a batch from either collator: packed (prompt shared) or padded; ``shared`` and
    ``aligned`` add the fields of :class:`PairLogps` that LD-DPO and WPO need."""
    forward = packed_forward if "pred_rows" in batch else concatenated_forward
    return forward(model, batch, chunk_size=chunk_size, shared=shared, aligned=aligned)


@dataclass
class GroupLogps:
    """Log-probs of the k responses of G groups, K the largest k (a pair: k = 2, chosen then rejected).
    Shape: each (G, K).

    ``mask``: True where the group has that response (column j < k); elsewhere ``logps`` and ``tokens`` are 0.
    ``aligned_logps`` (asked for with ``aligned=True``, else None): ``sum_t [log p(y_t) - log sum_v p(v)^2]`` over the
    response, detached (WPO's weight, as :class:`PairLogps`' fields)."""

    logps: torch.Tensor
    tokens: torch.Tensor
    mask: torch.Tensor
    aligned_logps: torch.Tensor | None = None


def group_sums(token_logps: torch.Tensor, collisions: torch.Tensor, seq_index: torch.Tensor,
               response_mask: torch.Tensor, *, aligned: bool = False) -> GroupLogps:
    """A :class:`GroupLogps` from scored tokens: sequence ``j * G + g`` is group ``g``'s response ``j``
    (``PackedPairCollator``'s ``seq_index``); ``response_mask`` says which responses each group has.

    Shape: token_logps, seq_index (T,); collisions (T,) when ``aligned``; response_mask (G, K) bool -> each field
    (G, K)."""
    g, k = response_mask.shape

    def per_response(values: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        summed = torch.zeros(k * g, dtype=dtype, device=token_logps.device).index_add(0, seq_index, values)
        return summed.view(k, g).T.contiguous()  # sequence j * G + g -> [g, j]

    out = GroupLogps(per_response(token_logps), per_response(torch.ones_like(seq_index), torch.long), response_mask)
    if aligned:
        out.aligned_logps = per_response(token_logps.detach() - collisions)
    return out


def group_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
                aligned: bool = False, head_in_forward: bool | None = None) -> GroupLogps:
    """Every response's log-probs of a batch from either collator, groups or pairs: packed
    (:func:`packed_token_logps`; ``head_in_forward`` as there) or padded (:func:`padded_token_logps`, each row's
    sequence from ``row_sequence``). A batch of groups carries its ``response_mask`` (G, K); a batch of pairs is G
    groups of 2 (chosen, rejected), in the order :class:`PairLogps` has them (pairs of one group merged into a segment,
    ``pair_sequences``, too).

    Shape: -> each field of :class:`GroupLogps` (G, K)."""
    response_mask = batch.get("response_mask")
    if response_mask is None:
        response_mask = torch.ones(batch["pair_tokens"].shape[0], 2, dtype=torch.bool,
                                   device=batch["input_ids"].device)
    if "pred_rows" in batch:
        token_logps, collisions = packed_token_logps(model, batch, chunk_size=chunk_size,
                                                     head_in_forward=head_in_forward, collision=aligned)
        seq_index = batch["seq_index"]
    else:
        token_logps, collisions, row, _ = padded_token_logps(model, batch, chunk_size=chunk_size, collision=aligned)
        # a batch of pairs has a row per sequence (chosen rows, then rejected); one of groups says each row's
        seq_index = batch["row_sequence"][row] if "row_sequence" in batch else row
    if "pair_sequences" in batch:  # a sequence may be a side of several pairs: sum each once, then gather
        pairs = merged_pair_sums(token_logps, collisions, seq_index, batch["pred_rows"], batch["pair_sequences"],
                                 aligned=aligned)
        return GroupLogps(torch.stack([pairs.chosen_logps, pairs.rejected_logps], 1),
                          torch.stack([pairs.chosen_tokens, pairs.rejected_tokens], 1), response_mask,
                          torch.stack([pairs.chosen_aligned_logps, pairs.rejected_aligned_logps], 1) if aligned
                          else None)
    return group_sums(token_logps, collisions, seq_index, response_mask, aligned=aligned)
