"""Sequence log-probs: exact against the plain log-softmax, and independent of padding and batch company."""

import pytest
import torch

from dpo_dist.data.collate import IGNORE_INDEX, PreferenceCollator
from dpo_dist.train.logprobs import concatenated_forward, sequence_logps
from dpo_dist.data.tokenization import Truncation, tokenize_pair
from tiny import make_gpt2, make_llama, make_tokenizer


def naive_logps(logits, labels):
    """The textbook form: the full log-softmax over the vocabulary, gathered at the labels."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    token = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (token * mask).sum(-1), mask.sum(-1)


@pytest.mark.parametrize("chunk_size", [1, 7, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_full_log_softmax_values_and_gradients(chunk_size, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 11, 50) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = IGNORE_INDEX
    labels[1, 8:] = IGNORE_INDEX
    labels[2, :] = IGNORE_INDEX  # a row with nothing to score
    weights = torch.tensor([0.5, -2.0, 1.0])

    logps, counts = sequence_logps(logits, labels, chunk_size=chunk_size)
    (logps * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    expected, expected_counts = naive_logps(logits.float(), labels)
    (expected * weights.double()).sum().backward()

    assert logps.dtype == torch.float32 and counts.tolist() == expected_counts.tolist() == [7, 7, 0]
    torch.testing.assert_close(logps.double(), expected, atol=1e-5, rtol=1e-6)
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.float(), logits.grad.float(), atol=atol, rtol=0)


def pair_ids(tok, n):
    texts = [
        ("Human: What is the capital of France? Assistant:", " The capital of France is Paris.", " I do not know."),
        ("Human: Can you help me bake bread?", " Sure! Mix flour, water, salt and yeast.", " No."),
        ("The movie was", " wonderful, a delight from start to finish.", " terrible and boring."),
        ("Hello", " great", " awful, I would not recommend it to anyone at all."),
    ]
    return [
        tokenize_pair({"prompt": p, "chosen": c, "rejected": r}, tok, Truncation(256, 128), add_bos=False)
        for p, c, r in texts[:n]
    ]


@pytest.fixture(params=["llama", "gpt2"])
def model_and_tok(request):
    tok = make_tokenizer("nobos")
    build = make_llama if request.param == "llama" else make_gpt2
    return build(len(tok)), tok


def score(model, examples, **collator_kwargs):
    batch = PreferenceCollator(pad_token_id=2, **collator_kwargs)(examples)
    out = concatenated_forward(model, batch)
    return torch.stack([out.chosen_logps, out.rejected_logps], -1), out


def test_concatenated_forward_equals_separate_forwards(model_and_tok):
    model, tok = model_and_tok
    examples = pair_ids(tok, 3)
    together, out = score(model, examples)
    for i, example in enumerate(examples):
        for side, column in (("chosen", 0), ("rejected", 1)):
            ids = torch.tensor([example["prompt_input_ids"] + example[f"{side}_input_ids"]])
            labels = ids.clone()
            labels[0, : len(example["prompt_input_ids"])] = IGNORE_INDEX
            expected, count = naive_logps(model(ids).logits, labels)
            assert abs(together[i, column].item() - expected.item()) < 1e-4
            tokens = out.chosen_tokens if side == "chosen" else out.rejected_tokens
            assert tokens[i].item() == count.item() == len(example[f"{side}_input_ids"])


def test_independent_of_padding_amount_side_and_batch_company(model_and_tok):
    model, tok = model_and_tok
    examples = pair_ids(tok, 4)
    reference, _ = score(model, examples)
    with torch.no_grad():
        left, _ = score(model, examples, padding_side="left")
        extra_padding, _ = score(model, examples, pad_to_multiple_of=64)
        extra_left, _ = score(model, examples, padding_side="left", pad_to_multiple_of=64)
        alone = torch.cat([score(model, [e])[0] for e in examples])
        reversed_order = score(model, examples[::-1])[0].flip(0)
    for name, other in [("left", left), ("padding", extra_padding), ("left+padding", extra_left),
                        ("alone", alone), ("reordered", reversed_order)]:
        torch.testing.assert_close(other, reference.detach(), atol=1e-5, rtol=0, msg=name)


def test_gradients_independent_of_padding_side(model_and_tok):
    model, tok = model_and_tok
    examples = pair_ids(tok, 3)
    grads = []
    for kwargs in ({}, {"padding_side": "left", "pad_to_multiple_of": 32}):
        model.zero_grad()
        logps, _ = score(model, examples, **kwargs)
        (logps[:, 0] - logps[:, 1]).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_wpo_collision_and_ld_ranks_by_hand():
    """logits [0, ln 2, ln 3]: p = (1/6, 2/6, 3/6), sum p^2 = 14/36; the token 2 scores log(1/2) and its aligned
    log-prob is log(1/2) - log(14/36) = log(9/7). Ranks: tokens of sequence 0 at predicting rows [7, 3, 5] rank
    [2, 0, 1]; LD's shared sum over min(3, 2) = 2 tokens of each side, by rank: chosen -2 - 3, rejected -0.5 - 0.25."""
    import math

    from dpo_dist.train.logprobs import pair_sums, response_ranks, scored_token_logps

    logits = torch.tensor([[[0.0, math.log(2), math.log(3)], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 2]])
    token_logps, collisions, _, _ = scored_token_logps(logits, labels, collision=True)
    assert token_logps.item() == pytest.approx(math.log(0.5), abs=1e-6)
    assert (token_logps - collisions).item() == pytest.approx(math.log(9 / 7), abs=1e-6)

    seq = torch.tensor([0, 0, 0, 1, 1])
    rows = torch.tensor([7, 3, 5, 12, 10])
    assert response_ranks(seq, rows, 2).tolist() == [2, 0, 1, 1, 0]
    values = torch.tensor([-1.0, -2.0, -3.0, -0.5, -0.25])
    out = pair_sums(values, torch.zeros(5), seq, rows, 1, shared=True, aligned=True)
    assert out.chosen_logps.item() == -6.0 and out.rejected_logps.item() == -0.75
    assert out.chosen_shared_logps.item() == -5.0 and out.rejected_shared_logps.item() == -0.75
    assert out.chosen_tokens.item() == 3 and out.rejected_tokens.item() == 2
    assert out.chosen_aligned_logps.item() == -6.0  # collisions 0 here
