"""Per-sequence log-probabilities of response tokens, computed in chunks.

``sequence_logps`` never materializes a full fp32 log-softmax over the vocabulary: it scores only the labelled
positions, a chunk of rows at a time, and its backward recomputes each chunk's softmax instead of storing it. Peak
extra memory is ``chunk_size x vocab`` fp32 however long the batch is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dpo_dist.collate import IGNORE_INDEX

DEFAULT_CHUNK_SIZE = 1024


class _TokenLogps(torch.autograd.Function):
    """log softmax(logits[rows])[targets], chunked. logits: (M, V) any float dtype; rows, targets: (K,) int64."""

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
            grad_logits[rows[start:end]] = chunk_grad.to(grad_logits.dtype)
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
