"""Ranked rows (more than two responses per prompt) in the data stage: the layouts, their bad rows, the pair rules
with data.min_score_gap, groups kept whole by subsets and the eval split, data.columns on UltraFeedback's own
records, and a tiny training run on 4-completion rows.

The 4-completion example every rule is checked on, responses A, B, C, D with scores 6.5, 9, 4, 7 (B best, C worst):

- best_vs_worst: (B, C), gap 5;
- best_vs_rest: (B, A) 2.5, (B, C) 5, (B, D) 2;
- all_pairs, taken as listed (i < j), the higher score chosen: (B, A) 2.5, (A, C) 2.5, (D, A) 0.5, (B, C) 5, (B, D) 2,
  (D, C) 3.

With min_score_gap 2.5 (a gap of exactly 2.5 stays): best_vs_worst keeps (B, C); best_vs_rest drops (B, D);
all_pairs drops (D, A) and (B, D). With min_score_gap 6 every pair is dropped and the row has none.
"""

import json
import math

import pytest

from dpo_dist.config import load_config
from dpo_dist.data.formats import normalize_ranked, ranked_pairs, rename_columns
from dpo_dist.data.load import (DataError, Part, load_configured_pairs, load_pairs, load_train_eval, split_pairs,
                                take_subset)
from training import WORDS, run  # with torch and transformers, imported once at collection, as test_train.py does

A, B, C, D = " a fine answer", " the best answer", " a wrong answer", " a good answer"
SCORED = {"prompt": "Q: say something", "completions": [A, B, C, D], "scores": [6.5, 9, 4, 7]}
EXPECTED = {  # rule -> (chosen, rejected) pairs, in order, at min_score_gap 0
    "best_vs_worst": [(B, C)],
    "best_vs_rest": [(B, A), (B, C), (B, D)],
    "all_pairs": [(B, A), (A, C), (D, A), (B, C), (B, D), (D, C)],
}
AT_GAP_2_5 = {"best_vs_worst": [(B, C)], "best_vs_rest": [(B, A), (B, C)],
              "all_pairs": [(B, A), (A, C), (B, C), (D, C)]}
MESSAGES = {
    "prompt": [{"role": "user", "content": "say something"}],
    "completions": [[{"role": "assistant", "content": text.strip()}] for text in (A, B, C, D)],
    "ranking": [1, 3, 0, 2],
}
CHOSEN_REJECTED = {"prompt": "Q: say something", "chosen": B, "rejected": [A, C, D]}
CHOSEN_REJECTED_MESSAGES = {  # whole conversations, as UltraFeedback-binarized writes them
    "prompt": "say something",
    "chosen": [{"role": "user", "content": "say something"}, {"role": "assistant", "content": "B"}],
    "rejected": [[{"role": "user", "content": "say something"}, {"role": "assistant", "content": text}]
                 for text in ("A", "C")],
}
# UltraFeedback's own layout (openbmb/UltraFeedback), cut short: the prompt in instruction, rated completion records
ULTRAFEEDBACK = {
    "source": "evol_instruct", "instruction": "Name a prime number.", "models": ["m1", "m2", "m3", "m4"],
    "completions": [
        {"model": "m1", "response": "4", "overall_score": 2.0, "fine-grained_score": 1.5, "critique": "wrong",
         "annotations": {"helpfulness": {"Rating": "1"}}},
        {"model": "m2", "response": "7", "overall_score": 8.5, "fine-grained_score": 4.75, "critique": "right",
         "annotations": {"helpfulness": {"Rating": "5"}}},
        {"model": "m3", "response": "9", "overall_score": 3.0, "fine-grained_score": 2.0, "critique": "wrong",
         "annotations": {"helpfulness": {"Rating": "2"}}},
        {"model": "m4", "response": "2", "overall_score": 7.0, "fine-grained_score": 4.5, "critique": "right",
         "annotations": {"helpfulness": {"Rating": "4"}}},
    ],
}
UF_COLUMNS = {"prompt": "instruction", "score": "overall_score"}


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


def pairs_of(dataset):
    return list(zip(dataset["chosen"], dataset["rejected"]))


# --- formats


@pytest.mark.parametrize("row, kind, order, scores", [
    (SCORED, "text", "scores", [6.5, 9.0, 4.0, 7.0]),
    ({"prompt": "Q", "completions": [A, B, C, D], "ranking": [1, 3, 0, 2]}, "text", "ranking", [1.0, 3.0, 0.0, 2.0]),
    ({"prompt": "Q", "completions": [{"response": A, "score": 1}, {"response": B, "score": 2}]}, "text", "scores",
     [1.0, 2.0]),
    (MESSAGES, "conversational", "ranking", [1.0, 3.0, 0.0, 2.0]),
    (CHOSEN_REJECTED, "text", "chosen", [1.0, 0.0, 0.0, 0.0]),
    (CHOSEN_REJECTED_MESSAGES, "conversational", "chosen", [1.0, 0.0, 0.0]),
])
def test_each_ranked_layout_is_detected_and_normalized(tmp_path, row, kind, order, scores):
    pairs, report = load_pairs(write_jsonl(tmp_path / "r.jsonl", [row, row]))
    assert report.data_format == "ranked" and report.rows_read == report.rows_kept == 2
    ranked = normalize_ranked(row, kind)
    assert ranked["order"] == order and ranked["scores"] == scores
    assert len(pairs) == report.pairs == 2 * len(ranked_pairs(ranked, "best_vs_worst")[0])
    assert pairs["row"] == [0] * (len(pairs) // 2) + [1] * (len(pairs) // 2)
    assert pairs["group"] == pairs["row"]
    if kind == "conversational":
        assert ranked["prompt"] == [{"role": "user", "content": "say something"}]
        assert all(r[-1]["role"] == "assistant" and len(r) == 1 for r in ranked["responses"])
        assert pairs[0]["prompt"] == ranked["prompt"]


def test_forced_ranked_format_and_the_pair_formats_unchanged(tmp_path):
    pairs, report = load_pairs(write_jsonl(tmp_path / "r.jsonl", [SCORED]), data_format="ranked")
    assert report.data_format == "ranked" and pairs_of(pairs) == [(B, C)]
    pair_row = {"prompt": "Q", "chosen": " yes", "rejected": " no"}
    pairs, report = load_pairs(write_jsonl(tmp_path / "p.jsonl", [pair_row] * 3), pair_rule="all_pairs",
                               min_score_gap=5.0)  # no scores: the rules do not touch a pair row
    assert report.data_format == "text" and report.pair_rule is None and report.pairs == 3
    assert pairs["group"] == pairs["row"] == [0, 1, 2]
    assert report.summary() == f"{tmp_path / 'p.jsonl'}: 3 of 3 rows kept (text format)"


# --- bad rows: each ranked reason is a case of tests/faults.py's BAD_ROWS (named, and skipped and counted)


# --- pair rules and min_score_gap


@pytest.mark.parametrize("rule", EXPECTED)
def test_each_pair_rule_on_four_completions(tmp_path, rule):
    pairs, report = load_pairs(write_jsonl(tmp_path / "r.jsonl", [SCORED]), pair_rule=rule)
    assert pairs_of(pairs) == EXPECTED[rule]
    assert (report.pairs, report.pairs_below_gap, report.rows_without_pairs) == (len(EXPECTED[rule]), 0, 0)
    assert set(pairs["prompt"]) == {SCORED["prompt"]} and set(pairs["group"]) == {0}


@pytest.mark.parametrize("rule", EXPECTED)
def test_min_score_gap_on_both_sides(tmp_path, rule):
    """2.5 keeps a gap of exactly 2.5 and drops smaller ones; 6 drops every pair of the row, which is counted as a
    row left with no pair (the second row, scored 0 and 10, keeps one)."""
    kept = AT_GAP_2_5[rule]
    pairs, report = load_pairs(write_jsonl(tmp_path / "r.jsonl", [SCORED]), pair_rule=rule, min_score_gap=2.5)
    assert pairs_of(pairs) == kept
    assert (report.pairs, report.pairs_below_gap) == (len(kept), len(EXPECTED[rule]) - len(kept))
    far = {"prompt": "Q2", "completions": [" low", " high"], "scores": [0, 10]}
    pairs, report = load_pairs(write_jsonl(tmp_path / "r6.jsonl", [SCORED, far]), pair_rule=rule, min_score_gap=6)
    assert pairs_of(pairs) == [(" high", " low")] and pairs["row"] == [1]
    assert (report.rows_read, report.rows_kept, report.rows_without_pairs) == (2, 1, 1)
    assert report.pairs_below_gap == len(EXPECTED[rule])
    assert f"1 of 2 rows kept (ranked format); 1 left with no pair; 1 pairs by {rule}, {len(EXPECTED[rule])} dropped " \
           "(tied or a gap below data.min_score_gap=6)" in report.summary()


def test_ties_go_to_the_first_listed_and_tied_pairs_are_counted():
    """Scores 7, 9, 4, 9: responses 1 and 3 tie for best (1 is listed first); 5, 9, 1, 1: 2 and 3 tie for worst."""
    tied_best = {"scores": [7.0, 9.0, 4.0, 9.0], "order": "scores"}
    assert ranked_pairs(tied_best, "best_vs_worst") == ([(1, 2)], 0)
    assert ranked_pairs(tied_best, "best_vs_rest") == ([(1, 0), (1, 2)], 1)
    assert ranked_pairs(tied_best, "all_pairs") == ([(1, 0), (0, 2), (3, 0), (1, 2), (3, 2)], 1)
    tied_worst = {"scores": [5.0, 9.0, 1.0, 1.0], "order": "scores"}
    assert ranked_pairs(tied_worst, "best_vs_worst") == ([(1, 2)], 0)


def test_a_ranking_orders_by_rank_and_its_gaps_are_rank_differences():
    """Ranking 2, 0, 3, 1 (best first): ranks 3, 2, 1, 0 as scores of responses 2, 0, 3, 1."""
    ranked = normalize_ranked({"prompt": "Q", "completions": [A, B, C, D], "ranking": [2, 0, 3, 1]}, "text")
    assert ranked["scores"] == [2.0, 0.0, 3.0, 1.0]
    assert ranked_pairs(ranked, "best_vs_worst") == ([(2, 1)], 0)
    assert ranked_pairs(ranked, "best_vs_rest") == ([(2, 0), (2, 1), (2, 3)], 0)
    assert ranked_pairs(ranked, "all_pairs", 2) == ([(0, 1), (2, 1), (2, 3)], 3)


@pytest.mark.parametrize("rule", EXPECTED)
def test_chosen_beside_a_rejected_list_gives_chosen_vs_each_under_every_rule(tmp_path, rule):
    path = write_jsonl(tmp_path / "r.jsonl", [CHOSEN_REJECTED])
    pairs, report = load_pairs(path, pair_rule=rule, min_score_gap=1)  # each gap is 1
    assert pairs_of(pairs) == [(B, A), (B, C), (B, D)] and report.pairs_below_gap == 0
    ranked = normalize_ranked(CHOSEN_REJECTED, "text")
    assert ranked_pairs(ranked, rule, 1.5) == ([], 3)


# --- groups: the split, subsets, mixtures


def ranked_rows(n, k=4):
    return [{"prompt": f"Q{i}", "completions": [f" r{i}-{j}" for j in range(k)], "scores": list(range(k))}
            for i in range(n)]


def test_the_split_and_num_samples_keep_a_rows_pairs_together(tmp_path):
    """20 rows x 6 pairs (all_pairs of 4): eval_ratio 0.25 holds out 5 rows, 30 pairs; num_samples 8 takes 8 rows."""
    pairs, report = load_pairs(write_jsonl(tmp_path / "r.jsonl", ranked_rows(20)), pair_rule="all_pairs")
    assert len(pairs) == report.pairs == 120
    train, eval_ = split_pairs(pairs, eval_ratio=0.25, seed=3)
    assert (len(train), len(eval_)) == (90, 30)
    assert len(set(eval_["group"])) == 5 and not set(train["group"]) & set(eval_["group"])
    for part in (train, eval_):  # each group whole, its pairs together
        groups = part["group"]
        assert all(groups.count(g) == 6 for g in set(groups))
        assert [g for i, g in enumerate(groups) if i == 0 or groups[i - 1] != g] == list(dict.fromkeys(groups))
    assert split_pairs(pairs, eval_ratio=0.25, seed=3)[1]["group"] == eval_["group"]  # seeded
    subset = take_subset(pairs, 8, seed=0)
    assert len(subset) == 48 and len(set(subset["group"])) == 8
    train, eval_, _ = load_train_eval(str(tmp_path / "r.jsonl"), num_samples=8, eval_ratio=0.25, seed=0,
                                      pair_rule="all_pairs")
    assert (len(set(train["group"])), len(set(eval_["group"])), len(train), len(eval_)) == (6, 2, 36, 12)
    with pytest.raises(DataError, match="leaves no training rows out of 2 rows"):
        split_pairs(take_subset(pairs, 2, seed=0), eval_ratio=0.9, seed=0)


def test_groups_are_unique_across_a_mixture_and_its_eval_source(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", ranked_rows(3))
    second = write_jsonl(tmp_path / "b.jsonl", ranked_rows(2))
    train, eval_, reports = load_train_eval([Part(first), Part(second)], eval_source=second, seed=0,
                                            pair_rule="best_vs_rest")
    assert sorted(set(train["group"])) == [0, 1, 2, 3, 4]  # b's rows 0 and 1 follow a's 3
    assert sorted(set(eval_["group"])) == [5, 6]
    assert [r.pairs for r in reports] == [9, 6, 6]


# --- data.columns


def test_ultrafeedback_records_through_data_columns(tmp_path):
    """7 (8.5) > 2 (7) > 9 (3) > 4 (2): best_vs_rest gives 7 against each; UltraFeedback's own fields are ignored."""
    path = write_jsonl(tmp_path / "uf.jsonl", [ULTRAFEEDBACK])
    pairs, report = load_pairs(path, columns=UF_COLUMNS, pair_rule="best_vs_rest")
    assert report.data_format == "ranked"
    assert pairs_of(pairs) == [("7", "4"), ("7", "9"), ("7", "2")]
    assert set(pairs["prompt"]) == {"Name a prime number."}
    pairs, _ = load_pairs(path, columns={"prompt": "instruction", "score": "fine-grained_score"})
    assert pairs_of(pairs) == [("7", "4")]
    with pytest.raises(DataError, match=r"row 0: .*the completions are records with the fields \['annotations', "
                                        r".*data\.columns\.score names the one holding the score"):
        load_pairs(path, columns={"prompt": "instruction"})  # score not mapped: the records have none


def test_data_columns_from_the_config(tmp_path):
    path = write_jsonl(tmp_path / "uf.jsonl", [ULTRAFEEDBACK] * 10)
    cfg = load_config(None, [f"data.source={path}", "data.columns.prompt=instruction",
                             "data.columns.score=overall_score", "data.pair_rule=all_pairs", "data.min_score_gap=1.5",
                             "data.eval_ratio=0.2"])
    train, eval_, [report] = load_configured_pairs(cfg, None)
    # all_pairs of scores 2, 8.5, 3, 7 (responses 4, 7, 9, 2): six gaps, 9 over 4 (1) below 1.5: 5 pairs a row
    assert (report.pairs, report.pairs_below_gap, len(train), len(eval_)) == (50, 10, 40, 10)
    assert not set(train["group"]) & set(eval_["group"])


def test_rename_columns_swaps_and_shadows():
    row = {"question": "Q", "prompt": "not the prompt", "a": "x", "b": "y"}
    assert rename_columns(row, {"prompt": "question", "chosen": "b", "rejected": "a"}) == {
        "prompt": "Q", "rejected": "x", "chosen": "y"}
    assert rename_columns(row, None) is row
    nested = {"completions": [{"text": "x", "r": 1}, "plain"]}
    assert rename_columns(nested, {"response": "text", "score": "r"}) == {
        "completions": [{"response": "x", "score": 1}, "plain"]}


# --- config: the refusals are cases of tests/faults.py's BAD_CONFIG


def test_conversational_ranked_rows_render_and_tokenize_with_their_group(tmp_path):
    """Rendered with a ChatML template while loading, tokenized as any pairs, ``row`` and ``group`` carried."""
    from tiny import make_tokenizer

    from dpo_dist.data.tokenization import Truncation, tokenize_pairs

    tokenizer = make_tokenizer("chatml")
    rows = [MESSAGES, CHOSEN_REJECTED_MESSAGES]
    pairs, report = load_pairs(write_jsonl(tmp_path / "m.jsonl", rows), tokenizer=tokenizer, pair_rule="all_pairs")
    assert report.pairs == 6 + 2 and pairs["group"] == [0] * 6 + [1] * 2
    tokenized, dropped = tokenize_pairs(pairs, tokenizer, Truncation(64, 32))
    assert dropped == 0 and tokenized["group"] == pairs["group"] and tokenized["row"] == pairs["row"]
    prompts = {tuple(ids) for ids, group in zip(tokenized["prompt_input_ids"], tokenized["group"]) if group == 0}
    assert len(prompts) == 1  # one prompt for all the pairs of a row


# --- training on ranked rows


def four_completion_rows(path, n, seed=0):
    """A learnable order: after the same words, ' yes' scores 9, ' sure' 7, ' maybe' 4 and ' no' 1."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(3, 8)))
        middle = " ".join(rng.choices(WORDS, k=rng.randint(1, 4)))
        ends = [(" maybe", 4), (" yes", 9), (" no", 1), (" sure", 7)]
        rng.shuffle(ends)
        rows.append({"prompt": prompt, "completions": [f" {middle}{end}" for end, _ in ends],
                     "scores": [score for _, score in ends]})
    return write_jsonl(path, rows)


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("rule, per_row", [("best_vs_worst", 1), ("all_pairs", 6)])
def test_training_on_four_completion_rows(tiny_model_dir, tmp_path, capsys, rule, per_row):
    """10 rows, 2 held out (data.eval_ratio 0.2): step 1 is ln 2 (policy = reference), and the counts are pairs."""
    data = four_completion_rows(tmp_path / "ranked.jsonl", 10)
    result = run(tiny_model_dir, data, tmp_path / "out", **{"train.max_steps": 1, "data.pair_rule": rule})
    first = result["records"][0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    counts = {k: v for k, v in result["counts"].items() if k != "sources"}
    assert counts == {"train_pairs": 8 * per_row, "eval_pairs": 2 * per_row, "dropped_too_long": 0}
    [source] = result["counts"]["sources"]
    assert (source["kept"], source["pairs"], source["used"], source["pairs_below_gap"]) == (10, 10 * per_row,
                                                                                           10 * per_row, 0)
    log = capsys.readouterr().out
    assert f"10 of 10 rows kept (ranked format); {10 * per_row} pairs by {rule}" in log
    assert f"'train_pairs': {8 * per_row}" in log


def test_the_docs_example():
    """docs/data.md: scores 9, 2, 8.5, 1 for ' 4', ' 5', ' four', ' 22'."""
    ranked = normalize_ranked({"prompt": "2+2?", "completions": [" 4", " 5", " four", " 22"],
                               "scores": [9, 2, 8.5, 1]}, "text")
    named = lambda made: [(ranked["responses"][i], ranked["responses"][j]) for i, j in made]  # noqa: E731
    assert named(ranked_pairs(ranked, "best_vs_worst")[0]) == [(" 4", " 22")]
    assert named(ranked_pairs(ranked, "best_vs_rest")[0]) == [(" 4", " 5"), (" 4", " four"), (" 4", " 22")]
    assert named(ranked_pairs(ranked, "all_pairs")[0]) == [(" 4", " 5"), (" 4", " four"), (" 4", " 22"),
                                                          (" four", " 5"), (" 5", " 22"), (" four", " 22")]
    assert ranked_pairs(ranked, "all_pairs", 1) == ([(0, 1), (0, 3), (2, 1), (1, 3), (2, 3)], 1)
    assert ranked_pairs(ranked, "best_vs_rest", 1) == ([(0, 1), (0, 3)], 1)
    by_ranking = normalize_ranked({"prompt": "2+2?", "completions": [" 4", " 5", " four", " 22"],
                                   "ranking": [0, 2, 1, 3]}, "text")
    assert ranked_pairs(by_ranking, "all_pairs")[0] == ranked_pairs(ranked, "all_pairs")[0]
