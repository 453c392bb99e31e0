"""Per-sequence log-probabilities of response tokens, computed in chunks.

``sequence_logps`` never materializes a full fp32 log-softmax over the vocabulary: it scores only the labelled
positions, a chunk of rows at a time, and its backward recomputes each chunk's softmax instead of storing it. Peak
extra memory is ``chunk_size x vocab`` fp32 however long the batch is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo_dist.data.collate import IGNORE_INDEX
from dpo_dist.model.attention import packed_attention_mask

DEFAULT_CHUNK_SIZE = 1024


class _TokenLogps(torch.autograd.Function):
    """log softmax(logits[rows])[targets], chunked. logits: (M, V) any float dtype; rows, targets: (K,) int64 (a row
    may be scored more than once)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
        token_logps = torch.empty(rows.numel(), dtype=torch.float32, device=logits.device)
        logsumexps = torch.empty_like(token_logps)
        for start in range(0, rows.numel(), chunk_size):
            end = start + chunk_size
            chunk = logits[rows[start:end]].float()  # (c, V)
            logsumexp = torch.logsumexp(chunk, dim=-1)
            token_logps[start:end] = chunk.gather(1, targets[start:end, None]).squeeze(1) - logsumexp
            logsumexps[start:end] = logsumexp
        ctx.save_for_backward(logits, rows, targets, logsumexps)
        ctx.chunk_size = chunk_size
        return token_logps

    @staticmethod
    def backward(ctx, grad_token_logps: torch.Tensor):
        logits, rows, targets, logsumexps = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        for start in range(0, rows.numel(), ctx.chunk_size):
            end = start + ctx.chunk_size
            grad = grad_token_logps[start:end, None].float()  # (c, 1)
            # d/dx [x_t - logsumexp(x)] = onehot(t) - softmax(x)
            chunk_grad = torch.exp(logits[rows[start:end]].float() - logsumexps[start:end, None]) * -grad
            chunk_grad.scatter_add_(1, targets[start:end, None], grad)
            # index_add, not assignment: a row scored twice (packed, the prompt's last position predicts both
            # responses' first tokens) gets both gradients
            grad_logits.index_add_(0, rows[start:end], chunk_grad.to(grad_logits.dtype))
        return grad_logits, None, None, None


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's labelled tokens, and how many tokens were labelled.

    Position ``t`` of ``logits`` predicts ``labels[:, t + 1]``; labels equal to ``-100`` (prompt, padding) are not
    scored.

    Shape: logits (N, T, V); labels (N, T) -> logps (N,) float32, token_counts (N,) int64.
    """
    n, t, v = logits.shape
    targets = labels[:, 1:]
    scored = targets != IGNORE_INDEX  # (N, T-1)
    seq_index, pos_index = scored.nonzero(as_tuple=True)
    rows = seq_index * t + pos_index  # flat row of logits[n, pos] in a (N*T, V) view
    token_logps = _TokenLogps.apply(logits.reshape(n * t, v), rows, targets[scored], chunk_size)
    logps = torch.zeros(n, dtype=torch.float32, device=logits.device).index_add(0, seq_index, token_logps)
    return logps, scored.sum(-1)


@dataclass
class PairLogps:
    """Log-probs of both sides of B pairs. Shape: each (B,)."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


def concatenated_forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> PairLogps:
    """Score chosen and rejected in one forward over the collator's ``2B`` rows (chosen first)."""
    outputs = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=False,
    )
    logps, tokens = sequence_logps(outputs.logits, batch["labels"], chunk_size=chunk_size)
    b = logps.shape[0] // 2
    return PairLogps(logps[:b], logps[b:], tokens[:b], tokens[b:])


class _HeadLogps(torch.autograd.Function):
    """log softmax(hidden @ weight.T + bias)[targets], chunked, from hidden states: the LM head runs only on the
    scored positions, and no (tokens, vocab) logits are ever held.

    Backward, two ways. A frozen head (LoRA, or the reference) needs only the hidden states' gradient, and token k's
    log-prob depends on its own hidden state alone, with gradient ``J_k = weight[t_k] - softmax_k @ weight``: the
    forward computes J (K, H) from each chunk's softmax while it has it, and the backward just scales it (no logits
    recomputed). A trainable head recomputes each chunk's logits in the backward for the weight's gradient.

    hidden: (K, H); weight: (V, H); bias: (V,) or None; targets: (K,) int64 -> (K,) float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, precompute_jacobian):
        token_logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        logsumexps = torch.empty_like(token_logps)
        jacobian = torch.empty_like(hidden) if precompute_jacobian else None
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = torch.nn.functional.linear(hidden[start:end], weight, bias).float()  # (c, V)
            logsumexps[start:end] = torch.logsumexp(logits, dim=-1)
            token_logps[start:end] = logits.gather(1, targets[start:end, None]).squeeze(1) - logsumexps[start:end]
            if precompute_jacobian:
                probs = torch.exp(logits.sub_(logsumexps[start:end, None])).to(weight.dtype)
                jacobian[start:end] = (weight[targets[start:end]] - probs @ weight).to(hidden.dtype)
        ctx.save_for_backward(hidden, weight, bias, targets, logsumexps, jacobian)
        ctx.chunk_size = chunk_size
        return token_logps

    @staticmethod
    def backward(ctx, grad_token_logps):
        hidden, weight, bias, targets, logsumexps, jacobian = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if jacobian is not None and not (need_weight or need_bias):
            return grad_token_logps[:, None].to(jacobian.dtype) * jacobian, None, None, None, None, None
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
                grad_bias.to(bias.dtype) if need_bias else None, None, None, None)


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


def packed_forward(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = DEFAULT_CHUNK_SIZE,
    head_in_forward: bool | None = None,
) -> PairLogps:
    """Score a :class:`dpo_dist.data.packing.PackedPairCollator` batch: one forward over the packed rows (through the
    model's own ``forward``, so DDP and hooks see it) with the mask its kernel and layer types take
    (:func:`dpo_dist.model.attention.packed_attention_mask`), the LM head on the scored positions only.

    Where the head is sharded (ZeRO-3, FSDP2: ``head_in_forward=None`` finds out) it must run inside the forward,
    which gathers it: the scored positions go in as ``logits_to_keep`` (a boolean (R, W) mask), the forward returns
    their logits ``(P, V)`` in the model's dtype, and the log-softmax is taken in fp32 a chunk at a time
    (:func:`sequence_logps`' function). Elsewhere the head runs here, from the final hidden states, and no
    ``(tokens, vocab)`` logits are held at all (:class:`_HeadLogps`)."""
    head = output_head(model)
    if head_in_forward is None:
        head_in_forward = head_is_sharded(head, model)
    mask = packed_attention_mask(model, batch)
    if head_in_forward:
        keep = torch.zeros(batch["input_ids"].numel(), dtype=torch.bool, device=batch["pred_rows"].device)
        keep[batch["pred_rows"]] = True
        outputs = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                        use_cache=False, logits_to_keep=keep.view_as(batch["input_ids"]))
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])  # (P, V): the kept positions, row-major
        rows = torch.searchsorted(keep.nonzero()[:, 0], batch["pred_rows"])  # each scored token's logits row
        token_logps = _TokenLogps.apply(logits, rows, batch["targets"], chunk_size)
    else:
        outputs = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                        use_cache=False, output_hidden_states=True, logits_to_keep=1)
        hidden = outputs.hidden_states[-1].to(head.weight.dtype)  # accelerate's autocast hands back fp32 outputs
        hidden = hidden.reshape(-1, hidden.shape[-1])[batch["pred_rows"]]  # (K, H); a row scored twice: gathered twice
        frozen_head = not head.weight.requires_grad and (head.bias is None or not head.bias.requires_grad)
        precompute_jacobian = torch.is_grad_enabled() and hidden.requires_grad and frozen_head
        token_logps = _HeadLogps.apply(hidden, head.weight, head.bias, batch["targets"], chunk_size,
                                       precompute_jacobian)
    b = batch["pair_tokens"].shape[0]
    seq = batch["seq_index"]
    logps = torch.zeros(2 * b, dtype=torch.float32, device=token_logps.device).index_add(0, seq, token_logps)
    tokens = torch.zeros(2 * b, dtype=torch.long, device=seq.device).index_add(0, seq, torch.ones_like(seq))
    return PairLogps(logps[:b], logps[b:], tokens[:b], tokens[b:])


def pair_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, chunk_size: int = DEFAULT_CHUNK_SIZE) -> PairLogps:
    """Both sides' log-probs of a batch from either collator: packed (prompt shared) or padded."""
    forward = packed_forward if "pred_rows" in batch else concatenated_forward
    return forward(model, batch, chunk_size=chunk_size)
