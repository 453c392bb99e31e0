"""Loading, format detection, validation of every row, subsets and splits."""

import gzip
import json

import datasets
import pytest

from dpo_dist.data.load import DataError, load_pairs, split_pairs, take_subset
from dpo_dist.data.formats import hh_to_messages, normalize_row

TEXT = {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}
CONV_EXPLICIT = {
    "prompt": [{"role": "user", "content": "2+2?"}],
    "chosen": [{"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "5"}],
}
CONV_ULTRAFEEDBACK = {
    "prompt": "2+2?",
    "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
    "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
}
CONV_PROMPT_STRING = {  # a string prompt beside the responses alone: the string is the user turn
    "prompt": "2+2?",
    "chosen": [{"role": "assistant", "content": "4"}],
    "rejected": [{"role": "assistant", "content": "5"}],
}
HH = {
    "chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 4",
    "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant: 5",
}


def write_jsonl(path, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return str(path)


@pytest.mark.parametrize(
    "row, fmt, expected",
    [
        (TEXT, "text", {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"}),
        (CONV_EXPLICIT, "conversational", CONV_EXPLICIT),
        (
            CONV_ULTRAFEEDBACK,
            "conversational",
            {
                "prompt": [{"role": "user", "content": "2+2?"}],
                "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}],
            },
        ),
        (CONV_PROMPT_STRING, "conversational", CONV_EXPLICIT),
        (
            HH,
            "hh",
            {"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant:", "chosen": " 4", "rejected": " 5"},
        ),
    ],
)
def test_each_format_is_detected_and_normalized(tmp_path, row, fmt, expected):
    pairs, report = load_pairs(write_jsonl(tmp_path / "d.jsonl", [row, row]))
    assert report.data_format == fmt
    assert report.rows_read == report.rows_kept == 2
    got = pairs[1]
    assert got["row"] == 1
    assert {k: got[k] for k in ("prompt", "chosen", "rejected")} == expected


def test_hh_as_messages_splits_turns():
    pair = normalize_row(HH, "hh", hh_as_messages=True)
    assert pair["prompt"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
    ]
    assert pair["chosen"] == [{"role": "assistant", "content": "4"}]
    assert hh_to_messages(normalize_row(HH, "hh"))["rejected"] == [{"role": "assistant", "content": "5"}]


def test_format_can_be_forced(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [HH])
    with pytest.raises(DataError, match=r"row 0: missing field 'prompt'"):
        load_pairs(path, data_format="text")
    with pytest.raises(DataError, match="data_format 'chat' is not one of"):
        load_pairs(path, data_format="chat")


# Bad rows of every format, named or skipped by reason: tests/faults.py (BAD_ROWS), run by tests/test_faults.py.


def test_file_types(tmp_path):
    rows = [dict(TEXT, chosen=f" c{i}") for i in range(5)]
    jsonl_gz = write_jsonl(tmp_path / "d.jsonl.gz", rows, gz=True)
    array = tmp_path / "d.json"
    array.write_text(json.dumps(rows))
    parquet = str(tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).to_parquet(parquet)
    for path in (jsonl_gz, str(array), parquet):
        pairs, _ = load_pairs(path)
        assert pairs["chosen"] == [f" c{i}" for i in range(5)], path


def test_unreadable_inputs_name_the_file_and_line(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(TEXT) + "\n{not json\n")
    with pytest.raises(DataError, match=r"broken\.jsonl: line 2: invalid JSON"):
        load_pairs(str(broken))
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        load_pairs(str(tmp_path / "missing.jsonl"))
    other = tmp_path / "d.csv"
    other.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        load_pairs(str(other))
    not_object = write_jsonl(tmp_path / "list.jsonl", [TEXT, [1, 2]])
    with pytest.raises(DataError, match="row 1: row should be a JSON object, got list"):
        load_pairs(not_object)


def test_local_dataset_folder_with_split(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [TEXT] * 3)
    write_jsonl(folder / "test.jsonl", [TEXT])
    assert len(load_pairs(str(folder), split="train")[0]) == 3
    assert len(load_pairs(str(folder), split="test")[0]) == 1


def test_subset_and_split_are_seeded_and_disjoint(tmp_path):
    rows = [dict(TEXT, chosen=f" c{i}") for i in range(100)]
    pairs, _ = load_pairs(write_jsonl(tmp_path / "d.jsonl", rows))
    subset = take_subset(pairs, 40, seed=1)
    assert len(subset) == 40 and subset["row"] == take_subset(pairs, 40, seed=1)["row"]
    assert subset["row"] != take_subset(pairs, 40, seed=2)["row"]
    assert take_subset(pairs, None, seed=1) is pairs and len(take_subset(pairs, 500, seed=1)) == 100
    train, eval_ = split_pairs(subset, eval_ratio=0.25, seed=3)
    assert len(train) == 30 and len(eval_) == 10
    assert not set(train["row"]) & set(eval_["row"])
    assert eval_["row"] == split_pairs(subset, eval_ratio=0.25, seed=3)[1]["row"]
    assert split_pairs(subset, eval_ratio=0.0, seed=3) == (subset, None)
    with pytest.raises(DataError, match="eval_ratio"):
        split_pairs(subset, eval_ratio=1.0, seed=3)


def test_train_eval_from_files_or_ratio(tmp_path):
    from dpo_dist.data.load import load_train_eval

    train_path = write_jsonl(tmp_path / "train.jsonl", [dict(TEXT, chosen=f" c{i}") for i in range(20)])
    eval_path = write_jsonl(tmp_path / "eval.jsonl", [dict(TEXT, chosen=f" e{i}") for i in range(3)])
    train, eval_, reports = load_train_eval(train_path, eval_source=eval_path, num_samples=10, seed=0)
    assert len(train) == 10 and eval_["chosen"] == [" e0", " e1", " e2"] and len(reports) == 2
    train, eval_, _ = load_train_eval(train_path, eval_ratio=0.5, num_samples=10, seed=0)
    assert len(train) == len(eval_) == 5
    assert set(train["row"]) | set(eval_["row"]) == set(take_subset(load_pairs(train_path)[0], 10, 0)["row"])
    with pytest.raises(DataError, match="either eval_ratio or an eval file"):
        load_train_eval(train_path, eval_source=eval_path, eval_ratio=0.1)
    # a file has no splits: asking for an eval split of one would evaluate on the training pairs
    with pytest.raises(DataError, match=r"train.jsonl is a file, which has no splits.*data.eval_source"):
        load_train_eval(train_path, eval_split="test")
