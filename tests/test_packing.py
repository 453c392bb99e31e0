"""Prompt sharing and packing: the same log-probs and gradients as scoring each response (chosen and rejected, or a
group's k) as a separate row."""

import random

import pytest
import torch

from dpo_dist.data.collate import REFERENCE_COLUMNS
from tiny import make_gpt2, make_llama


def random_pairs(n, seed, vocab=90, bos=None):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        prompt = ([bos] if bos is not None else []) + [rng.randrange(5, vocab) for _ in range(rng.randint(1, 12))]
        pairs.append({"prompt_input_ids": prompt,
                      "chosen_input_ids": [rng.randrange(5, vocab) for _ in range(rng.randint(1, 9))],
                      "rejected_input_ids": [rng.randrange(5, vocab) for _ in range(rng.randint(1, 9))],
                      "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5})
    return pairs


def test_rows_are_planned_first_fit_decreasing():
    from dpo_dist.data.packing import plan_rows

    assert plan_rows([5, 3, 2, 4, 1], 5) == [[0], [3, 4], [1, 2]]
    assert sorted(i for row in plan_rows([7, 1, 1, 6, 2, 3], 7) for i in row) == list(range(6))
    assert all(sum([7, 1, 1, 6, 2, 3][i] for i in row) <= 7 for row in plan_rows([7, 1, 1, 6, 2, 3], 7))


@pytest.mark.parametrize("head_in_forward", [False, True], ids=["head-after-forward", "head-in-forward"])
@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared-prompt", "packed-only"])
@pytest.mark.parametrize("frozen_head", [False, True], ids=["trainable-head", "frozen-head"])
@pytest.mark.parametrize("make_model", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_packed_logps_and_gradients_equal_the_padded_form(make_model, frozen_head, share_prompt, head_in_forward):
    """Both backward paths of the packed LM head run after the forward: a trainable head (full fine-tuning)
    recomputes the logits; a frozen one (LoRA) scales the gradients its forward kept. A sharded head (ZeRO-3, FSDP2)
    runs inside the forward on the scored positions (``logits_to_keep``), here forced on an unsharded model."""
    import functools

    from dpo_dist.data.collate import PreferenceCollator
    from dpo_dist.train.logprobs import concatenated_forward, packed_forward
    from dpo_dist.data.packing import PackedPairCollator

    model = make_model(100, seed=3) if make_model is make_gpt2 else make_model(100, seed=3, tie_word_embeddings=True)
    model.config._attn_implementation = "sdpa"
    if frozen_head:
        model.get_output_embeddings().weight.requires_grad_(False)
    pairs = random_pairs(7, seed=1, bos=1)
    packed = PackedPairCollator(pad_token_id=0, share_prompt=share_prompt)(pairs)
    assert packed["input_ids"].shape[0] < (7 if share_prompt else 14), "several segments share a row"
    padded = PreferenceCollator(pad_token_id=0)(pairs)
    weights = torch.randn(14)  # a loss that weighs every sequence differently checks each one's gradient

    def grads(forward, batch):
        model.zero_grad()
        out = forward(model, batch, chunk_size=5)  # chunks smaller than the batch's scored tokens
        logps = torch.cat([out.chosen_logps, out.rejected_logps])
        (logps * weights).sum().backward()
        return logps.detach(), torch.cat([out.chosen_tokens, out.rejected_tokens]), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logps_packed, tokens_packed, grads_packed = grads(
        functools.partial(packed_forward, head_in_forward=head_in_forward), packed)
    logps_padded, tokens_padded, grads_padded = grads(concatenated_forward, padded)
    torch.testing.assert_close(logps_packed, logps_padded, atol=1e-5, rtol=1e-5)
    assert tokens_packed.tolist() == tokens_padded.tolist()
    assert grads_packed.keys() == grads_padded.keys() and len(grads_packed) > 5
    for name in grads_padded:
        torch.testing.assert_close(grads_packed[name], grads_padded[name], atol=1e-5, rtol=1e-4, msg=name)
    assert packed["pair_tokens"].tolist() == padded["pair_tokens"].tolist() == padded["attention_mask"].view(2, 7, -1).sum((0, 2)).tolist()
    assert packed["ref_chosen_logps"].tolist() == [-1.5] * 7


def test_packed_forward_without_bos_skips_nothing_the_padded_form_scores():
    """No BOS and a one-token prompt: the prompt's only token predicts both responses' first tokens."""
    from dpo_dist.data.collate import PreferenceCollator
    from dpo_dist.train.logprobs import concatenated_forward, packed_forward
    from dpo_dist.data.packing import PackedPairCollator

    model = make_llama(100, seed=5)
    pairs = [{"prompt_input_ids": [7], "chosen_input_ids": [8, 9], "rejected_input_ids": [10]},
             *random_pairs(3, seed=2)]
    with torch.no_grad():
        a = packed_forward(model, PackedPairCollator(0)(pairs))
        b = concatenated_forward(model, PreferenceCollator(0)(pairs))
    torch.testing.assert_close(a.chosen_logps, b.chosen_logps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.rejected_logps, b.rejected_logps, atol=1e-5, rtol=1e-5)


def test_packing_is_refused_where_it_cannot_work():
    from dpo_dist.model.attention import choose_packing

    model = make_llama(100)
    model.config._attn_implementation = "sdpa"
    assert choose_packing("auto", model)[0] is True
    assert choose_packing("off", model) == (False, "packing: off (train.packing=off)")
    model.config._attn_implementation = "flash_attention_2"
    assert "takes no 4D attention mask" in choose_packing("auto", model)[1]
    with pytest.raises(ValueError, match="train.packing=on"):
        choose_packing("on", model)


def test_training_with_and_without_packing_follows_the_same_trajectory(tiny_model_dir, data_file, tmp_path):
    from training import assert_same_trajectory, read_jsonl, reset_accelerate_state, run

    for mode, share in (("on", True), ("on", False), ("off", True)):
        reset_accelerate_state()
        name = f"{mode}-{share}"
        run(tiny_model_dir, data_file, tmp_path / name, **{"train.packing": mode, "train.share_prompt": share,
                                                          "train.eval_every": 2,
                                                          "reference.cache_dir": str(tmp_path / f"cache-{name}")})
    reset_accelerate_state()
    on, off = read_jsonl(tmp_path / "on-True" / "metrics.jsonl"), read_jsonl(tmp_path / "off-True" / "metrics.jsonl")
    assert_same_trajectory(on, off, atol=1e-5)
    assert_same_trajectory(read_jsonl(tmp_path / "on-False" / "metrics.jsonl"), off, atol=1e-5)
    assert all(r["tokens/s"] > 0 and r["step_time_s"] > 0 for r in on)


def test_row_choice_trades_padding_against_row_width():
    from dpo_dist.data.packing import choose_rows

    # Capacity = the longest (544) would take 3 rows (1632 positions); one row of 668 beside it wastes far less.
    rows = choose_rows([221, 185, 544, 262])
    assert sorted(map(sorted, rows)) == [[0, 1, 3], [2]]
    # Segments that pack without padding do; very long ones are not forced into one quadratic row.
    rows = choose_rows([40, 30, 20, 10])
    assert len(rows) * max(sum([40, 30, 20, 10][i] for i in row) for row in rows) == 100
    assert len(choose_rows([2000, 1990, 1980, 1970])) == 4


@pytest.mark.parametrize("head_in_forward", [False, True], ids=["head-after-forward", "head-in-forward"])
@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared-prompt", "packed-only"])
def test_ld_and_wpo_quantities_equal_the_padded_form_and_a_direct_computation(share_prompt, head_in_forward):
    """LD-DPO's shared-prefix sums and WPO's aligned log-probs, packed (both head paths) and padded, against a
    direct computation from full logits: the shared sum is the sum over the first min(n_c, n_r) response tokens; the
    aligned sum adds log p(y_t) - log sum_v p(v)^2 over the response."""
    from dpo_dist.data.collate import IGNORE_INDEX, PreferenceCollator
    from dpo_dist.data.packing import PackedPairCollator
    from dpo_dist.train.logprobs import concatenated_forward, packed_forward

    model = make_llama(100, seed=3, tie_word_embeddings=True)
    model.config._attn_implementation = "sdpa"
    pairs = random_pairs(7, seed=2, bos=1)
    padded = PreferenceCollator(pad_token_id=0)(pairs)
    packed = PackedPairCollator(pad_token_id=0, share_prompt=share_prompt)(pairs)
    with torch.no_grad():
        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                       position_ids=padded["position_ids"]).logits.double()
    targets = padded["labels"][:, 1:]
    scored = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1], -1)
    token_logps = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * scored
    collision = torch.logsumexp(2 * logp, -1)  # log sum_v p(v)^2
    n = scored.sum(1)
    shared_len = torch.minimum(n[:7], n[7:]).repeat(2)
    first = (torch.cumsum(scored, 1) <= shared_len[:, None]) & scored
    want_shared = (token_logps * first).sum(1)
    want_aligned = ((token_logps - collision) * scored).sum(1)
    assert (n[:7] != n[7:]).any(), "some pair has responses of different lengths"

    with torch.no_grad():
        outs = [concatenated_forward(model, padded, chunk_size=5, shared=True, aligned=True),
                packed_forward(model, packed, chunk_size=5, shared=True, aligned=True, head_in_forward=head_in_forward)]
    for out in outs:
        torch.testing.assert_close(torch.cat([out.chosen_shared_logps, out.rejected_shared_logps]).double(),
                                   want_shared, atol=2e-5, rtol=0)
        torch.testing.assert_close(torch.cat([out.chosen_aligned_logps, out.rejected_aligned_logps]).double(),
                                   want_aligned, atol=2e-5, rtol=0)
        full = torch.cat([out.chosen_logps, out.rejected_logps]).double()
        longer = n > shared_len
        assert ((full - want_shared).abs()[longer] > 1e-3).all() and ((full - want_shared).abs()[~longer] < 1e-5).all()


def test_aligned_logps_need_no_gradient_and_leave_the_logps_gradient_alone():
    from dpo_dist.data.packing import PackedPairCollator
    from dpo_dist.train.logprobs import packed_forward

    model = make_llama(100, seed=3, tie_word_embeddings=True)
    model.config._attn_implementation = "sdpa"
    batch = PackedPairCollator(pad_token_id=0, share_prompt=True)(random_pairs(3, seed=4, bos=1))
    grads = []
    for aligned in (False, True):
        model.zero_grad()
        out = packed_forward(model, batch, chunk_size=5, aligned=aligned)
        if aligned:
            assert not out.chosen_aligned_logps.requires_grad
        (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
        grads.append(model.get_output_embeddings().weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=0, rtol=0)


def random_groups(sizes, seed, vocab=90, bos=None, references=False):
    """A group per entry of ``sizes``, with that many responses (k >= 2)."""
    rng = random.Random(seed)
    groups = []
    for k in sizes:
        prompt = ([bos] if bos is not None else []) + [rng.randrange(5, vocab) for _ in range(rng.randint(1, 12))]
        group = {"prompt_input_ids": prompt,
                 "responses_input_ids": [[rng.randrange(5, vocab) for _ in range(rng.randint(1, 9))] for _ in range(k)]}
        if references:
            group["ref_responses_logps"] = [-1.0 - j / 4 for j in range(k)]
        groups.append(group)
    return groups


def pairs_for_digest():
    """Pairs with an empty prompt (pair 2) and an empty rejected response (pair 4), and reference log-probs."""
    rng = random.Random(11)
    out = []
    for i in range(9):
        out.append({"prompt_input_ids": [rng.randrange(3, 90) for _ in range(rng.randint(0 if i == 2 else 1, 12))],
                    "chosen_input_ids": [rng.randrange(3, 90) for _ in range(rng.randint(1, 9))],
                    "rejected_input_ids": [rng.randrange(3, 90) for _ in range(rng.randint(0 if i == 4 else 1, 9))],
                    "ref_chosen_logps": -1.0 - i, "ref_rejected_logps": -2.0 - i / 4})
    return out


def batch_digest(batch):
    """sha256 over every key's name, dtype, shape and bytes, in key order (16 hex digits)."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(batch):
        t = batch[key]
        h.update(f"{key} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def spans_as_before_groups(batch):
    """The batch with its ``attention_spans`` in the pair-only format they had before groups, ``row, start, prompt,
    first, second, padding``: the one key of a pair batch whose layout groups changed (now ``row, start, padding,
    prompt, response lengths...``)."""
    if "attention_spans" not in batch:
        return batch
    spans = []
    for row, start, padding, prompt, *responses in batch["attention_spans"].tolist():
        first, second = (responses + [0, 0])[:2]
        spans.append((row, start, prompt, first, second, padding))
    return {**batch, "attention_spans": torch.tensor(spans, dtype=torch.long)}


# batch_digest of pairs_for_digest() as both collators built it at 086abf7, before groups existed.
PAIR_BATCHES_BEFORE_GROUPS = {
    ("packed", True, "dense", None): "2f14d6187c1506ca", ("packed", True, "dense", 32): "af9f8cc96e2aad19",
    ("packed", True, "segmented", None): "03cfdc1565b7b77a", ("packed", True, "segmented", 32): "303390fc70e3efcd",
    ("packed", False, "dense", None): "955944d5b4cba076", ("packed", False, "dense", 32): "feb7c98225b2e136",
    ("packed", False, "segmented", None): "fe5e6cab907b913f", ("packed", False, "segmented", 32): "f61f9197ad9372f8",
    ("padded", "left", None): "1c4ac2d24767e59a", ("padded", "left", 32): "690041a2dede3757",
    ("padded", "right", None): "32f28bed3fbe0a5a", ("padded", "right", 32): "2870436c6569cc11",
}


def test_pairs_collate_exactly_as_before_groups():
    """Groups added no key to a batch of pairs and changed no value: every tensor, bit for bit, as before (the spans
    compared in their old column order)."""
    from dpo_dist.data.collate import PreferenceCollator
    from dpo_dist.data.packing import PackedPairCollator

    pairs = pairs_for_digest()
    for key, want in PAIR_BATCHES_BEFORE_GROUPS.items():
        if key[0] == "packed":
            _, share, layout, multiple = key
            collate = PackedPairCollator(0, share_prompt=share, attention_layout=layout, pad_to_multiple_of=multiple)
            batch = collate(pairs)
        else:
            _, side, multiple = key
            batch = PreferenceCollator(0, padding_side=side, pad_to_multiple_of=multiple)(pairs)
        assert batch_digest(spans_as_before_groups(batch)) == want, key


@pytest.mark.parametrize("layout", ["packed-dense", "packed-segmented", "packed-only", "padded"])
def test_a_pair_as_a_group_of_two_collates_and_scores_the_same(layout):
    """Pairs written as groups of two give the same tokens, masks and scored positions, and the same log-probs
    (bit for bit) from group_logps as from the pair functions; group_logps takes a batch of pairs too."""
    from dpo_dist.data.collate import PreferenceCollator
    from dpo_dist.data.packing import PackedPairCollator
    from dpo_dist.train.logprobs import group_logps, pair_logps

    pairs = pairs_for_digest()
    groups = [{"prompt_input_ids": p["prompt_input_ids"],
               "responses_input_ids": [p["chosen_input_ids"], p["rejected_input_ids"]],
               "ref_responses_logps": [p["ref_chosen_logps"], p["ref_rejected_logps"]]} for p in pairs]
    if layout == "padded":
        collate = PreferenceCollator(0)
    else:
        collate = PackedPairCollator(0, share_prompt=layout != "packed-only",
                                     attention_layout="segmented" if layout == "packed-segmented" else "dense")
    as_pairs, as_groups = collate(pairs), collate(groups)
    pair_only, group_only = {"pair_tokens", *REFERENCE_COLUMNS}, {"group_tokens", "response_mask",
                                                                 "ref_responses_logps", "row_sequence"}
    assert set(as_pairs) - pair_only == set(as_groups) - group_only
    for key in set(as_pairs) - pair_only:
        assert torch.equal(as_pairs[key], as_groups[key]), key
    assert torch.equal(as_groups["group_tokens"], as_pairs["pair_tokens"])
    assert as_groups["response_mask"].shape == (9, 2) and as_groups["response_mask"].all()
    assert torch.equal(as_groups["ref_responses_logps"],
                       torch.stack([as_pairs["ref_chosen_logps"], as_pairs["ref_rejected_logps"]], 1))
    if layout == "padded":
        assert as_groups["row_sequence"].tolist() == list(range(18))

    model = make_llama(100, seed=3)
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        pair = pair_logps(model, as_pairs, aligned=True)
        from_pairs, from_groups = (group_logps(model, batch, aligned=True) for batch in (as_pairs, as_groups))
    for out in (from_pairs, from_groups):
        assert torch.equal(out.logps, torch.stack([pair.chosen_logps, pair.rejected_logps], 1))
        assert torch.equal(out.tokens, torch.stack([pair.chosen_tokens, pair.rejected_tokens], 1))
        assert torch.equal(out.aligned_logps, torch.stack([pair.chosen_aligned_logps, pair.rejected_aligned_logps], 1))
        assert out.mask.all()


@pytest.mark.parametrize("head_in_forward", [False, True], ids=["head-after-forward", "head-in-forward"])
@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared-prompt", "packed-only"])
@pytest.mark.parametrize("make_model", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_group_logps_and_gradients_equal_the_padded_form(make_model, share_prompt, head_in_forward):
    """Groups of 2 to 4 responses in one batch, packed with the prompt computed once for all k: the log-probs, token
    counts and every parameter's gradient of the padded form (a row per response)."""
    from dpo_dist.data.collate import PreferenceCollator
    from dpo_dist.data.packing import PackedPairCollator
    from dpo_dist.train.logprobs import group_logps

    model = make_model(100, seed=3) if make_model is make_gpt2 else make_model(100, seed=3, tie_word_embeddings=True)
    model.config._attn_implementation = "sdpa"
    sizes = [3, 4, 2, 3, 4, 3]
    groups = random_groups(sizes, seed=1, bos=1)
    packed = PackedPairCollator(pad_token_id=0, share_prompt=share_prompt)(groups)
    assert packed["input_ids"].shape[0] < (len(sizes) if share_prompt else sum(sizes)), "segments share a row"
    padded = PreferenceCollator(pad_token_id=0)(groups)
    assert padded["input_ids"].shape[0] == sum(sizes)
    weights = torch.randn(len(sizes), 4)  # a loss that weighs every response differently checks each one's gradient

    def grads(batch, **kwargs):
        model.zero_grad()
        out = group_logps(model, batch, chunk_size=5, **kwargs)
        (out.logps * weights).sum().backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    out_packed, grads_packed = grads(packed, head_in_forward=head_in_forward)
    out_padded, grads_padded = grads(padded)
    mask = torch.arange(4)[None, :] < torch.tensor(sizes)[:, None]
    want_tokens = [[len(r) for r in g["responses_input_ids"]] + [0] * (4 - len(g["responses_input_ids"]))
                   for g in groups]
    for out in (out_packed, out_padded):
        assert torch.equal(out.mask, mask) and out.tokens.tolist() == want_tokens
        assert (out.logps[~mask] == 0).all() and (out.logps[mask] < 0).all()
    torch.testing.assert_close(out_packed.logps, out_padded.logps.detach(), atol=1e-5, rtol=1e-5)
    assert grads_packed.keys() == grads_padded.keys() and len(grads_packed) > 5
    for name in grads_padded:
        torch.testing.assert_close(grads_packed[name], grads_padded[name], atol=1e-5, rtol=1e-4, msg=name)


def test_group_batches_say_which_responses_each_group_has():
    """Branch ids CHOSEN + j, sequences j * G + g, the mask and the padded reference columns; a pair in a batch of
    groups is the group [chosen, rejected]; what cannot be a group is refused."""
    from dpo_dist.data.collate import PreferenceCollator
    from dpo_dist.data.packing import CHOSEN, PROMPT, PackedPairCollator
    from dpo_dist.train.logprobs import concatenated_forward, packed_forward

    groups = random_groups([3, 4], seed=2, references=True)
    pair = {"prompt_input_ids": [7, 8], "chosen_input_ids": [9], "rejected_input_ids": [10, 11],
            "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5}
    examples = [*groups, pair]
    batch = PackedPairCollator(0, attention_layout="segmented")(examples)
    assert batch["response_mask"].tolist() == [[True] * 3 + [False], [True] * 4, [True] * 2 + [False] * 2]
    assert batch["ref_responses_logps"].tolist() == [[-1.0, -1.25, -1.5, 0.0], [-1.0, -1.25, -1.5, -1.75],
                                                     [-1.5, -2.5, 0.0, 0.0]]
    assert batch["group_tokens"].tolist() == [3 * len(groups[0]["prompt_input_ids"])
                                              + sum(map(len, groups[0]["responses_input_ids"])),
                                              4 * len(groups[1]["prompt_input_ids"])
                                              + sum(map(len, groups[1]["responses_input_ids"])), 2 * 2 + 3]
    assert "pair_tokens" not in batch and "ref_chosen_logps" not in batch
    # the group of 4, in its own segment: prompt on PROMPT, response j on CHOSEN + j, scored as sequence j * 3 + 1
    segment = batch["segment_ids"][0] == 1
    branches = batch["branch_ids"][0][segment].tolist()
    want = [PROMPT] * len(groups[1]["prompt_input_ids"])
    for j, response in enumerate(groups[1]["responses_input_ids"]):
        want += [CHOSEN + j] * len(response)
    assert branches == want
    assert sorted(set(batch["seq_index"].tolist())) == [0, 1, 2, 3, 4, 5, 6, 7, 10]  # G = 3: no 8 (j=2 of the pair)
    # spans: row, start, padding, prompt, then 4 response columns, zero past a group's own
    spans = batch["attention_spans"].tolist()
    assert [s[3:] for s in spans] == [[len(g["prompt_input_ids"]), *map(len, g["responses_input_ids"]),
                                       *[0] * (4 - len(g["responses_input_ids"]))] for g in groups] + [[2, 1, 2, 0, 0]]

    with pytest.raises(ValueError, match="at least 2 responses"):
        PackedPairCollator(0)([{"prompt_input_ids": [5], "responses_input_ids": [[6]]}])
    with pytest.raises(ValueError, match="reference log-probs, one per response, or none"):
        PackedPairCollator(0)([groups[0], {**groups[1], "ref_responses_logps": [-1.0]}])
    model = make_llama(100)
    with pytest.raises(ValueError, match="holds groups .*group_logps"):
        packed_forward(model, batch)
    with pytest.raises(ValueError, match="holds groups .*group_logps"):
        concatenated_forward(model, PreferenceCollator(0)(examples))
