"""The prompts of iterative rounds (dpo_dist/data/prompts.py): from the built-in set or any source the data stage reads,
deduplicated, subset and split into training and held-out prompts, bad rows named by file and row."""

import json

import datasets
import pytest

from dpo_dist.config import ConfigError, load_config
from dpo_dist.data.load import DataError
from dpo_dist.data.prompts import load_prompts
from dpo_dist.data.sentiment import chosen_prompts

USER = [{"role": "user", "content": "2+2?"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def prompts_of(*overrides):
    return load_prompts(load_config(None, list(overrides)))


def test_the_built_in_set_gives_its_own_split():
    cfg = load_config(None, [])
    prompts = load_prompts(cfg)
    assert (prompts.train, prompts.held_out) == chosen_prompts(cfg.data.sentiment)
    assert len(prompts.held_out) == 48 and "built-in sentiment" in prompts.lines[0]
    with pytest.raises(ConfigError, match=r"held-out prompts.*data.sentiment.eval_prompts"):
        prompts_of("data.sentiment.eval_prompts=0", "rounds.count=2")


def test_prompt_only_rows_text_and_messages(tmp_path):
    rows = [{"prompt": f"p{i}"} for i in range(6)] + [{"prompt": "p2"}, {"prompt": "p0"}]
    prompts = prompts_of(f"data.source={write_jsonl(tmp_path / 'a.jsonl', rows)}", "data.eval_ratio=0.2")
    assert sorted(prompts.train + prompts.held_out) == [f"p{i}" for i in range(6)]
    assert prompts.duplicates == 2 and len(prompts.held_out) == 1 and prompts.reports[0].data_format == "prompt"
    assert "8 of 8 rows kept (prompt format); 6 prompts (2 repeats dropped)" in prompts.lines[0]
    assert prompts.lines[-1] == ("round prompts: 5 training, 1 held out by data.eval_ratio=0.2 (seed 42); "
                                 "2 duplicates dropped")

    chats = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"q{i}"}],
              "extra": i} for i in range(4)]
    prompts = prompts_of(f"data.source={write_jsonl(tmp_path / 'm.jsonl', chats)}", "data.eval_ratio=0.25")
    assert sorted(prompts.train + prompts.held_out, key=json.dumps) == [c["prompt"] for c in chats]


def test_a_renamed_prompt_column(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"p{i}", "prompt": "ignored"} for i in range(4)])
    prompts = prompts_of(f"data.source={path}", "data.columns.prompt=instruction", "data.eval_ratio=0.25")
    assert sorted(prompts.train + prompts.held_out) == ["p0", "p1", "p2", "p3"]


def test_pair_rows_give_their_prompts_once(tmp_path):
    rows = [{"prompt": f"Q{i % 3}", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(9)]
    prompts = prompts_of(f"data.source={write_jsonl(tmp_path / 'pairs.jsonl', rows)}", "data.eval_ratio=0.3")
    assert sorted(prompts.train + prompts.held_out) == ["Q0", "Q1", "Q2"]
    assert prompts.duplicates == 6 and prompts.reports[0].data_format == "text"


def test_hh_transcripts_give_the_text_before_the_last_assistant_turn(tmp_path):
    def hh(i):
        head = f"\n\nHuman: hi {i}\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant:"
        return {"chosen": head + " 4", "rejected": head + " 5"}

    path = write_jsonl(tmp_path / "hh.jsonl", [hh(i) for i in range(4)])
    prompts = prompts_of(f"data.source={path}", "data.eval_ratio=0.25")
    assert sorted(prompts.train + prompts.held_out) == [hh(i)["chosen"][:-2] for i in range(4)]
    messages = prompts_of(f"data.source={path}", "data.eval_ratio=0.25", "data.hh_as_messages=true")
    assert {m[0]["content"] for m in messages.train + messages.held_out} == {f"hi {i}" for i in range(4)}
    assert messages.train[0][-1] == {"role": "user", "content": "2+2?"}


def test_conversations_and_ranked_rows_give_the_prompt_training_would_see(tmp_path):
    whole = [{"prompt": f"q{i}", "chosen": [{"role": "system", "content": "S"}, {"role": "user", "content": f"q{i}"},
                                            {"role": "assistant", "content": "a"}],
              "rejected": [{"role": "system", "content": "S"}, {"role": "user", "content": f"q{i}"},
                           {"role": "assistant", "content": "b"}]} for i in range(3)]
    prompts = prompts_of(f"data.source={write_jsonl(tmp_path / 'conv.jsonl', whole)}", "data.eval_ratio=0.3")
    assert sorted(prompts.train + prompts.held_out, key=json.dumps) == [row["chosen"][:2] for row in whole]
    ranked = [{"prompt": f"r{i}", "completions": ["x", "y", "z"], "scores": [1, 2, 3]} for i in range(3)]
    prompts = prompts_of(f"data.source={write_jsonl(tmp_path / 'ranked.jsonl', ranked)}", "data.eval_ratio=0.3")
    assert sorted(prompts.train + prompts.held_out) == ["r0", "r1", "r2"]
    assert prompts.reports[0].data_format == "ranked"


def test_a_folder_of_parquet_shards_and_its_eval_split(tmp_path):
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    datasets.Dataset.from_list([{"prompt": f"t{i}"} for i in range(5)]).to_parquet(str(folder / "data/train.parquet"))
    datasets.Dataset.from_list([{"prompt": "t0"}, {"prompt": "e1"}]).to_parquet(str(folder / "data/test.parquet"))
    prompts = prompts_of(f"data.source={folder}", "data.eval_split=test")
    assert prompts.train == ["t1", "t2", "t3", "t4"] and prompts.held_out == ["t0", "e1"]
    assert prompts.overlaps == 1
    assert prompts.lines[-1] == ("round prompts: 4 training, 2 held out from data.eval_split; "
                                 "1 training prompts also held out removed")
    with pytest.raises(DataError, match=r"a.jsonl is a file, which has no splits"):
        prompts_of(f"data.source={write_jsonl(tmp_path / 'a.jsonl', [{'prompt': 'p'}])}", "data.eval_split=test")


def test_a_mixture_concatenates_its_entries_each_subset(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(10)] + [{"prompt": "shared"}])
    b = str(tmp_path / "b.parquet")
    datasets.Dataset.from_list([{"prompt": "shared", "chosen": "x", "rejected": "y"}]
                               + [{"prompt": f"b{i}", "chosen": "x", "rejected": "y"} for i in range(4)]).to_parquet(b)
    sources = f"data.sources=[{{source: {a}, num_samples: 5}}, {{source: {b}}}]"
    prompts = prompts_of(sources, "data.eval_ratio=0.2")
    every = prompts.train + prompts.held_out
    assert len([p for p in every if p.startswith("a") or p == "shared"]) == 5 and {"b0", "b1", "b2", "b3"} <= set(every)
    assert prompts.left_out == 6 and len(every) == len(set(every))
    assert prompts == prompts_of(sources, "data.eval_ratio=0.2")  # seeded
    assert prompts.lines[0].startswith("data.sources[0] ") and "5 in its subset" in prompts.lines[0]
    assert prompts_of(f"data.sources=[{{source: {b}}}]").lines[0].startswith(f"data.sources[0] {b}: 5 of 5 rows")
    whole = prompts_of(f"data.sources=[{{source: {a}}}, {{source: {b}}}]", "data.eval_ratio=0.2")
    assert whole.duplicates == 1 and "1 given by an earlier entry" in whole.lines[1]

    with pytest.raises(ConfigError, match=r"data.sources\[0\].weight: rounds sample every training prompt.*"
                                          "num_samples or fraction"):
        prompts_of(f"data.sources=[{{source: {a}, weight: 1}}, {{source: {b}, weight: 2}}]", "rounds.count=2")
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": USER}])
    with pytest.raises(DataError, match=r"data.sources\[1\] \(.*chat.jsonl\) gives message-list prompts but the "
                                        "entries before it give text"):
        prompts_of(f"data.sources=[{{source: {a}}}, {{source: {chat}}}]")


def test_held_out_by_ratio_is_seeded_disjoint_and_at_least_one(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}"} for i in range(40)])
    first = prompts_of(f"data.source={path}", "data.eval_ratio=0.25", "train.seed=1")
    assert len(first.held_out) == 10 and len(first.train) == 30 and not set(first.train) & set(first.held_out)
    assert first == prompts_of(f"data.source={path}", "data.eval_ratio=0.25", "train.seed=1")
    assert first.held_out != prompts_of(f"data.source={path}", "data.eval_ratio=0.25", "train.seed=2").held_out
    assert len(prompts_of(f"data.source={path}", "data.eval_ratio=0.001").held_out) == 1
    with pytest.raises(ConfigError, match=r"rounds.count > 1 evaluates each round on held-out prompts.*"
                                          r"data.eval_ratio.*data.eval_source"):
        prompts_of(f"data.source={path}", "data.eval_ratio=0", "rounds.count=2")
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "p"}])
    with pytest.raises(DataError, match=r"data.eval_ratio=0.1 of 1 distinct prompts leaves no training prompt"):
        prompts_of(f"data.source={one}")


def test_held_out_from_an_eval_source_never_in_training(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"p{i}"} for i in range(6)])
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "p1"}, {"prompt": "h"}, {"prompt": "p4"}])
    prompts = prompts_of(f"data.source={train}", f"data.eval_source={held}")
    assert prompts.held_out == ["p1", "h", "p4"] and prompts.train == ["p0", "p2", "p3", "p5"]
    assert prompts.overlaps == 2 and prompts.reports[1].entry == "data.eval_source"
    everything = write_jsonl(tmp_path / "all.jsonl", [{"prompt": f"p{i}"} for i in range(6)])
    with pytest.raises(DataError, match=r"every training prompt \(6\) is also a held-out prompt of data.eval_source"):
        prompts_of(f"data.source={train}", f"data.eval_source={everything}")


def test_num_samples_takes_a_seeded_subset_of_the_prompts(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}"} for i in range(20)] + [{"prompt": "p0"}] * 5)
    prompts = prompts_of(f"data.source={path}", "data.num_samples=10", "data.eval_ratio=0.2")
    assert len(prompts.train) == 8 and len(prompts.held_out) == 2 and prompts.left_out == 10
    assert prompts.duplicates == 5 and "10 left out by num_samples / fraction" in prompts.lines[-1]
    assert prompts == prompts_of(f"data.source={path}", "data.num_samples=10", "data.eval_ratio=0.2")
    other = prompts_of(f"data.source={path}", "data.num_samples=10", "data.eval_ratio=0.2", "train.seed=7")
    assert set(other.train + other.held_out) != set(prompts.train + prompts.held_out)
    assert prompts_of(f"data.source={path}", "data.num_samples=100").left_out == 0


def pair(prompt):
    return {"prompt": prompt, "chosen": " a", "rejected": " b"}


@pytest.mark.parametrize("rows, reason, message", [
    ([{"prompt": None}], "missing_field", r"missing field 'prompt'"),
    ([{"question": "q"}], "missing_field", r"missing field 'prompt'"),
    ([{"prompt": "  "}], "no_prompt", r"the prompt is empty"),
    ([{"prompt": []}], "no_prompt", r"the prompt message list is empty"),
    ([{"prompt": 7}], "wrong_type", r"field 'prompt' should be str or list, got int"),
    ([{"prompt": [{"role": "wizard", "content": "hi"}]}], "unknown_role", r"prompt\[0\] has role 'wizard'"),
    ([{"prompt": [{"role": "user"}]}], "wrong_type", r"prompt\[0\] should be a \{role, content\} message"),
    ([{"prompt": USER}], "wrong_type", r"the prompt is message-list, but this source's first prompt is text"),
    ([["not", "an", "object"]], "wrong_type", r"row should be a JSON object, got list"),
    # a pairs file (its first row says so, as the pair loader detects it): a row is bad where training finds it bad
    ([pair(""), pair("x")], "no_prompt", r"the prompt is empty"),
    ([dict(pair("q"), rejected=" a"), pair("x")], "identical_responses", r"chosen is identical to rejected"),
    ([{"prompt": "q"}, pair("x")], "missing_field", r"missing field 'chosen'"),
])
def test_each_bad_row_is_named_by_file_and_row_or_skipped_and_counted(tmp_path, rows, reason, message):
    head = [pair("first"), pair("second")] if len(rows) == 2 else [{"prompt": "first"}, {"prompt": "second"}]
    path = write_jsonl(tmp_path / "bad.jsonl", head + rows + [head[0] | {"prompt": "last"}])
    with pytest.raises(DataError, match=rf"bad.jsonl: row 2: {message}.*data.on_bad_row=skip"):
        prompts_of(f"data.source={path}")
    prompts = prompts_of(f"data.source={path}", "data.on_bad_row=skip", "data.eval_ratio=0.3")
    assert sorted(prompts.train + prompts.held_out) == ["first", "last", "second"] + ["x"] * (len(rows) == 2)
    assert prompts.skipped == {reason: 1} and f"skipped 1 {reason}" in prompts.lines[0]


def test_a_row_before_any_prompt_or_pair_says_which_fields_it_needs(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q"}, {"prompt": "p0"}, {"prompt": "p1"}])
    with pytest.raises(DataError, match=r"a.jsonl: row 0: no 'prompt' field, nor a pair's 'chosen' or a ranked row's "
                                        r"'completions' \(fields: \['question'\]; data.columns.prompt names"):
        prompts_of(f"data.source={path}")
    assert prompts_of(f"data.source={path}", "data.on_bad_row=skip").skipped == {"missing_field": 1}


def test_a_bad_row_of_the_eval_source_names_it_and_invalid_json_stops(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p0"}, {"prompt": "p1"}])
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "h0"}, {"prompt": 3}])
    with pytest.raises(DataError, match=r"held.jsonl: row 1: field 'prompt' should be str or list"):
        prompts_of(f"data.source={train}", f"data.eval_source={held}")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "p0"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken.jsonl: line 2: invalid JSON"):
        prompts_of(f"data.source={tmp_path / 'broken.jsonl'}", "data.on_bad_row=skip")
    (tmp_path / "empty.jsonl").write_text('{"prompt": ""}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"empty.jsonl: no usable rows"):
        prompts_of(f"data.source={tmp_path / 'empty.jsonl'}", "data.on_bad_row=skip")
