"""The pairs of one ranked row, met in a micro-batch, packed as one segment: the prompt and each distinct response
computed once, every pair's log-probs (LD-DPO's and WPO's sums too), token counts and gradients those of a segment per
pair and of the padded form; pair data collates bit for bit as before; a training run follows the same trajectory.

A row of 4 completions under all_pairs gives 6 pairs: a segment per pair puts the prompt through the model 6 times
and each response 3 times; merged, the prompt goes once and each response once."""

import functools
import itertools
import math
import random

import pytest
import torch

from dpo_dist.data.collate import PreferenceCollator
from dpo_dist.data.packing import CHOSEN, PROMPT, PackedPairCollator, tokens_through_model
from dpo_dist.data.tokenization import PAIR_COLUMNS
from dpo_dist.train.logprobs import group_logps, pair_logps
from test_packing import PAIR_BATCHES_BEFORE_GROUPS, batch_digest, pairs_for_digest, spans_as_before_groups
from tiny import make_gpt2, make_llama

RULES = {"all_pairs": list(itertools.combinations(range(4), 2)), "best_vs_rest": [(0, 1), (0, 2), (0, 3)]}
FIELDS = ("chosen_logps", "rejected_logps", "chosen_shared_logps", "rejected_shared_logps", "chosen_aligned_logps",
          "rejected_aligned_logps")


def ranked_row_pairs(rule, rows=3, seed=0, bos=1):
    """Pairs made by ``rule`` from ``rows`` rows of 4 completions (best first), each with its row's ``group``, then a
    pair of its own group. Row 1's completions 1 and 3 are the same tokens (two completions cut alike), so one of its
    all_pairs pairs has chosen = rejected."""
    rng = random.Random(seed)
    pairs = []
    for group in range(rows):
        prompt = [bos] + [rng.randrange(5, 90) for _ in range(rng.randint(2, 12))]
        responses = [[rng.randrange(5, 90) for _ in range(rng.randint(1, 9))] for _ in range(4)]
        if group == 1:
            responses[3] = list(responses[1])
        for i, j in RULES[rule]:
            pairs.append({"prompt_input_ids": prompt, "chosen_input_ids": responses[i],
                          "rejected_input_ids": responses[j], "group": group, "row": group,
                          "ref_chosen_logps": -1.0 - i, "ref_rejected_logps": -2.0 - j})
    pairs.append({"prompt_input_ids": [bos, 7, 8], "chosen_input_ids": [9, 10], "rejected_input_ids": [11],
                  "group": 99, "row": 99, "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5})
    return pairs


def test_pair_data_collates_exactly_as_before():
    """Every pair its own group (pair data): the digests of the batches before merging existed, and no
    ``pair_sequences``; a batch of ranked pairs whose groups each appear once is the unmerged batch, tensor for
    tensor."""
    pairs = [{**pair, "group": i} for i, pair in enumerate(pairs_for_digest())]
    for key, want in PAIR_BATCHES_BEFORE_GROUPS.items():
        if key[0] == "packed":
            _, share, layout, multiple = key
            batch = PackedPairCollator(0, share_prompt=share, attention_layout=layout,
                                       pad_to_multiple_of=multiple)(pairs)
            assert "pair_sequences" not in batch
            assert batch_digest(spans_as_before_groups(batch)) == want, key
    one_per_group = [ranked_row_pairs("all_pairs")[i] for i in (0, 6, 12, 18)]
    for layout in ("dense", "segmented"):
        merged = PackedPairCollator(0, attention_layout=layout)(one_per_group)
        unmerged = PackedPairCollator(0, attention_layout=layout, merge_groups=False)(one_per_group)
        assert merged.keys() == unmerged.keys() and "pair_sequences" not in merged
        assert all(torch.equal(merged[key], unmerged[key]) for key in merged)


def test_a_rows_pairs_become_one_segment():
    """3 rows under all_pairs (6 pairs each) and a pair of its own: 4 segments. Each row's: its prompt once, then its
    distinct responses in the order the pairs name them (row 1 has 3: two completions are the same tokens); the lone
    pair's: prompt | chosen | rejected. ``pair_sequences`` names each pair's two sequences; the rest of the pair
    columns are as without merging."""
    pairs = ranked_row_pairs("all_pairs")
    batch = PackedPairCollator(0, attention_layout="segmented")(pairs)
    unmerged = PackedPairCollator(0, attention_layout="segmented", merge_groups=False)(pairs)
    for key in ("pair_tokens", "ref_chosen_logps", "ref_rejected_logps"):
        assert torch.equal(batch[key], unmerged[key]), key
    spans = batch["attention_spans"].tolist()
    row0 = pairs[0]
    responses0 = [row0["chosen_input_ids"], *[p["rejected_input_ids"] for p in pairs[:3]]]
    assert [s[3:] for s in spans] == [
        [len(row0["prompt_input_ids"]), *map(len, responses0)],
        [len(pairs[6]["prompt_input_ids"]), len(pairs[6]["chosen_input_ids"]), len(pairs[6]["rejected_input_ids"]),
         len(pairs[7]["rejected_input_ids"]), 0],
        [len(pairs[12]["prompt_input_ids"]), *map(len, [pairs[12]["chosen_input_ids"],
                                                       *[p["rejected_input_ids"] for p in pairs[12:15]]])],
        [3, 2, 1, 0, 0]]
    # S = 4 segments: response j of segment s is sequence 4 j + s; all_pairs over (0..3) names (i, j) as i, j
    assert batch["pair_sequences"][:6].tolist() == [[4 * i, 4 * j] for i, j in RULES["all_pairs"]]
    # row 1: completion 3 is completion 1's tokens, so sequence j=1 serves both; (1, 3) is that sequence twice
    assert batch["pair_sequences"][6:12].tolist() == [[1, 5], [1, 9], [1, 5], [5, 9], [5, 5], [9, 5]]
    assert batch["pair_sequences"][18].tolist() == [3, 7]
    # segment 0: its prompt on PROMPT, response j on CHOSEN + j
    segment = batch["segment_ids"][0] == 0
    want = [PROMPT] * len(row0["prompt_input_ids"])
    for j, response in enumerate(responses0):
        want += [CHOSEN + j] * len(response)
    assert batch["branch_ids"][0][segment].tolist() == want
    assert sorted(set(batch["seq_index"].tolist())) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 14]


def test_what_a_four_completion_row_costs_through_the_model():
    """One row of 4 completions: the positions put through the model, a segment per pair against merged. all_pairs:
    the prompt 6 times and each response 3 times, against each once; best_vs_rest: the prompt 3 times and the best
    response 3 times, against each once. ``pair_tokens`` (the throughput figure) counts each pair as two sequences
    (the prompt twice) either way, as the padded form computes them."""
    for rule, per_row, uses in (("all_pairs", 6, [3, 3, 3, 3]), ("best_vs_rest", 3, [3, 1, 1, 1])):  # per response
        pairs = ranked_row_pairs(rule, rows=1)[:-1]
        assert len(pairs) == per_row
        prompt = len(pairs[0]["prompt_input_ids"])
        lengths = [len(p["chosen_input_ids"]) for p in pairs[:1]] + [len(p["rejected_input_ids"]) for p in pairs[:3]]
        merged, unmerged = PackedPairCollator(0)(pairs), PackedPairCollator(0, merge_groups=False)(pairs)
        assert tokens_through_model(merged) == prompt + sum(lengths)
        assert tokens_through_model(unmerged) == per_row * prompt + sum(u * n for u, n in zip(uses, lengths))
        assert int(merged["pair_tokens"].sum()) == int(unmerged["pair_tokens"].sum()) == tokens_through_model(
            PreferenceCollator(0)(pairs)) == tokens_through_model(unmerged) + per_row * prompt


def test_merged_pair_sums_by_hand():
    """Three sequences, tokens out of order (ranked by their predicting rows): 0 = [-1, -2, -3], 1 = [-0.5], 2 = [-4,
    -1]. Pairs (0, 1), (0, 2), (2, 1): sums -6 / -0.5, -6 / -5, -5 / -0.5; LD's shared prefix is the pair's min length:
    1 token (-1 / -0.5), 2 (-3 / -5), 1 (-4 / -0.5), so sequence 0 is cut at 1 token for one pair and 2 for another.
    Each sequence's gradient sums its pairs': sequence 0 is chosen twice."""
    from dpo_dist.train.logprobs import merged_pair_sums

    values = torch.tensor([-3.0, -1.0, -0.5, -2.0, -1.0, -4.0], requires_grad=True)
    seq = torch.tensor([0, 0, 1, 0, 2, 2])
    rows = torch.tensor([9, 2, 20, 4, 31, 30])
    pairs = torch.tensor([[0, 1], [0, 2], [2, 1]])
    out = merged_pair_sums(values, torch.zeros(6), seq, rows, pairs, shared=True, aligned=True)
    assert out.chosen_logps.tolist() == [-6.0, -6.0, -5.0] and out.rejected_logps.tolist() == [-0.5, -5.0, -0.5]
    assert out.chosen_tokens.tolist() == [3, 3, 2] and out.rejected_tokens.tolist() == [1, 2, 1]
    assert out.chosen_shared_logps.tolist() == [-1.0, -3.0, -4.0]
    assert out.rejected_shared_logps.tolist() == [-0.5, -5.0, -0.5]
    assert out.rejected_aligned_logps.tolist() == [-0.5, -5.0, -0.5] and not out.chosen_aligned_logps.requires_grad
    out.chosen_logps.sum().backward()
    assert values.grad.tolist() == [2.0, 2.0, 0.0, 2.0, 1.0, 1.0]


def scored(model, forward, batch, weights):
    """Every field of ``forward``'s PairLogps (LD-DPO's and WPO's too) and the token counts, and every parameter's
    gradient of a loss that weighs each differentiable field of each pair differently."""
    model.zero_grad()
    out = forward(model, batch, chunk_size=16, shared=True, aligned=True)  # chunks fewer than the scored tokens
    sum((getattr(out, name) * w).sum() for name, w in zip(FIELDS[:4], weights)).backward()
    fields = {name: getattr(out, name).detach() for name in FIELDS}
    fields["tokens"] = torch.cat([out.chosen_tokens, out.rejected_tokens])
    return fields, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


HEADS = {"head-after-forward": dict(frozen=False, in_forward=False),
         "frozen-head": dict(frozen=True, in_forward=False),
         "head-in-forward": dict(frozen=False, in_forward=True)}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("layout", ["dense", "segmented"])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("make_model", [make_llama, make_gpt2], ids=["llama", "gpt2"])
def test_merged_pairs_equal_a_segment_per_pair_and_the_padded_form(make_model, rule, layout, head):
    """3 rows' pairs and a lone pair, in micro-batches of 8 (a row cut across each boundary; the last micro-batch a
    row's tail and the lone pair), and all of them shuffled (a row's pairs apart): merged, a segment per pair, and
    padded give every pair the same log-probs, LD-DPO shared-prefix and WPO aligned sums, token counts, and every
    parameter the same gradient. The LM head trainable or frozen after the forward (LoRA's path), or in it (a
    sharded head's)."""
    from dpo_dist.train.logprobs import concatenated_forward, packed_forward

    model = make_model(100, seed=3) if make_model is make_gpt2 else make_model(100, seed=3, tie_word_embeddings=True)
    model.config._attn_implementation = "sdpa"
    if HEADS[head]["frozen"]:
        model.get_output_embeddings().weight.requires_grad_(False)
    packed = functools.partial(packed_forward, head_in_forward=HEADS[head]["in_forward"])
    pairs = ranked_row_pairs(rule, seed=1)
    shuffled = random.Random(0).sample(pairs, len(pairs))
    for examples in [pairs[i : i + 8] for i in range(0, len(pairs), 8)] + [shuffled]:
        merged = PackedPairCollator(0, attention_layout=layout)(examples)
        unmerged = PackedPairCollator(0, attention_layout=layout, merge_groups=False)(examples)
        repeated = len({e["group"] for e in examples}) < len(examples)
        assert ("pair_sequences" in merged) == repeated and "pair_sequences" not in unmerged
        assert (tokens_through_model(merged) < tokens_through_model(unmerged)) == repeated
        weights = [torch.randn(len(examples)) for _ in range(4)]
        want, want_grads = scored(model, packed, merged, weights)
        for forward, batch in ((packed, unmerged), (concatenated_forward, PreferenceCollator(0)(examples))):
            fields, grads = scored(model, forward, batch, weights)
            assert torch.equal(fields["tokens"], want["tokens"])
            for name in FIELDS:
                torch.testing.assert_close(fields[name], want[name], atol=1e-5, rtol=1e-5, msg=name)
            assert grads.keys() == want_grads.keys() and len(grads) > 5
            for name in grads:
                torch.testing.assert_close(grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


EXACTNESS_CASES = [(kernel, layout) for kernel in ("sdpa", "eager") for layout in ("dense", "segmented")
                   if kernel == "sdpa" or layout == "dense"]


@pytest.mark.slow
@pytest.mark.parametrize("kernel,layout", EXACTNESS_CASES, ids=[f"{k}-{layout}" for k, layout in EXACTNESS_CASES])
@pytest.mark.parametrize("model", range(8), ids=["llama", "mistral", "mistral-window6", "qwen2", "qwen2-window6",
                                                 "qwen3", "qwen3-window6", "gpt2"])
def test_merged_pairs_equal_an_unpadded_forward(model, kernel, layout):
    """tests/test_exactness.py's matrix for merged pairs: every model type on the packing list (a sliding window where
    it has one) under sdpa and eager, dense and segmented: each pair's chosen and rejected, from rows of 4 completions
    under all_pairs merged in micro-batches of 8, equal a forward of ``prompt + response`` alone."""
    from test_exactness import EXACT, MODELS, VOCAB, tiny_model, unpadded_logps

    model_type, window = MODELS[model]
    model = tiny_model(model_type, window, kernel)
    pairs = ranked_row_pairs("all_pairs", seed=2, bos=2)
    assert max(t for p in pairs for key in PAIR_COLUMNS for t in p[key]) < VOCAB
    for examples in (pairs[i : i + 8] for i in range(0, len(pairs), 8)):
        batch = PackedPairCollator(0, attention_layout=layout)(examples)
        assert "pair_sequences" in batch
        with torch.no_grad():
            out = pair_logps(model, batch)
        for side in ("chosen", "rejected"):
            want = torch.tensor([unpadded_logps(model, p["prompt_input_ids"], p[f"{side}_input_ids"])
                                 for p in examples])
            torch.testing.assert_close(getattr(out, f"{side}_logps"), want, **EXACT)


def test_group_logps_and_pair_logps_agree_on_a_merged_batch():
    """group_logps takes a merged batch of pairs as groups of two (chosen, rejected), as pair_logps gives them."""
    model = make_llama(100, seed=3)
    model.config._attn_implementation = "sdpa"
    batch = PackedPairCollator(0)(ranked_row_pairs("all_pairs"))
    with torch.no_grad():
        pairs, groups = pair_logps(model, batch, aligned=True), group_logps(model, batch, aligned=True)
    assert torch.equal(groups.logps, torch.stack([pairs.chosen_logps, pairs.rejected_logps], 1))
    assert torch.equal(groups.tokens, torch.stack([pairs.chosen_tokens, pairs.rejected_tokens], 1))
    assert torch.equal(groups.aligned_logps, torch.stack([pairs.chosen_aligned_logps, pairs.rejected_aligned_logps], 1))
    assert groups.mask.all() and groups.mask.shape == (19, 2)


def test_the_reference_precompute_merges_a_rows_pairs_and_gives_the_same_values():
    """compute_reference_logps hands the collator each pair's ``group``: a row's pairs in a batch are merged, and the
    log-probs are those of a segment per pair (to float rounding)."""
    import datasets

    from dpo_dist.distributed import build_accelerator
    from dpo_dist.train.reference import ReferenceScorer, compute_reference_logps

    model = make_llama(100, seed=3)
    model.config._attn_implementation = "sdpa"
    tokenized = datasets.Dataset.from_list([{k: v for k, v in p.items() if not k.startswith("ref_")}
                                            for p in ranked_row_pairs("all_pairs")])
    seen = []

    class Recording(PackedPairCollator):
        def __call__(self, examples):
            batch = super().__call__(examples)
            seen.append("pair_sequences" in batch)
            return batch

    accelerator = build_accelerator(cpu=True)
    merged, unmerged = (compute_reference_logps(
        ReferenceScorer(model, collator, accelerator, batch_size=8, show_progress=False), tokenized)
        for collator in (Recording(0), PackedPairCollator(0, merge_groups=False)))
    assert seen == [True, True, True]
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-6)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("loss", [pytest.param({}, id="dpo"), pytest.param(
    {"loss.ld_alpha": 0.5, "loss.use_weighting": True}, id="ld-wpo", marks=pytest.mark.slow)])
def test_training_merged_follows_a_segment_per_pair(tiny_model_dir, tmp_path, monkeypatch, loss):
    """10 rows of 4 completions under all_pairs (48 training pairs, micro-batches of 8: rows cut across them): 4 steps
    with an eval, the reference precomputed, merged and with a segment per pair (``merge_groups=False``, what
    ``train.share_prompt=true`` packed before), the same trajectory to 1e-6 (summed log-probs to a part in 1e7); with
    LD-DPO and WPO too. Every training
    batch of the merged run merged a row's pairs."""
    from dpo_dist.train import trainer
    from test_rankings_data import four_completion_rows
    from training import COMPARED, read_jsonl, reset_accelerate_state, run

    data = four_completion_rows(tmp_path / "ranked.jsonl", 10)
    merged_batches = []

    class Recording(PackedPairCollator):
        def __call__(self, examples):
            batch = super().__call__(examples)
            merged_batches.append("pair_sequences" in batch)
            return batch

    settings = {"data.pair_rule": "all_pairs", "train.eval_every": 2, "train.packing": "on", **loss}
    for name, collator in (("merged", Recording), ("unmerged", functools.partial(PackedPairCollator,
                                                                                  merge_groups=False))):
        monkeypatch.setattr(trainer, "PackedPairCollator", collator)
        reset_accelerate_state()
        run(tiny_model_dir, data, tmp_path / name, **settings)
    assert merged_batches and all(merged_batches)
    merged, unmerged = (read_jsonl(tmp_path / name / "metrics.jsonl") for name in ("merged", "unmerged"))
    assert len(merged) == len(unmerged) == 4
    for a, b in zip(merged, unmerged):
        for key in COMPARED + tuple(k for k in a if k.startswith("eval/")):
            if a["step"] == 1 and key.endswith("accuracies"):  # policy = reference: rewards are float noise
                continue
            # summed log-probs are about -50, where float32 steps by 3.8e-6: equal to a part in 1e7 (below a step)
            tolerance = dict(rel=1e-7) if "logps" in key else dict(abs=1e-6)
            assert b[key] == pytest.approx(a[key], **tolerance), (a["step"], key)
    if not loss:
        assert merged[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
