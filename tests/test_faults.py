"""The fault cases of tests/faults.py: each bad config value, model path and row gives its error, naming the key, path
or row; launch/train.py turns config and model errors into one line and exit status 2."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import typing
from collections import Counter

import pytest

from dpo_dist.config import Config, ConfigError, load_config
from dpo_dist.data.formats import REASONS
from dpo_dist.data.load import DataError, load_pairs
from dpo_dist.model.load import ModelError, resolve_source
from faults import BAD_CONFIG, BAD_MODEL_PATHS, BAD_ROWS, GOOD_ROWS, RANKING_BAD_ROWS, USER_ASSISTANT_ONLY
from training import ROOT


@pytest.mark.parametrize("override, message", BAD_CONFIG, ids=[case[0] for case in BAD_CONFIG])
def test_bad_config_value_names_the_key(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def float_options(node, prefix=""):
    """Every float option of the config tree (by its type, not its value), and whether it is a list of floats."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        key, kind = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(getattr(node, f.name)):
            yield from float_options(getattr(node, f.name), f"{key}.")
        elif typing.get_origin(kind) is list:
            if typing.get_args(kind) == (float,):
                yield key, True
        elif kind is float or float in typing.get_args(kind):
            yield key, False


def test_every_float_option_refuses_nan_and_inf():
    """A NaN beta or learning rate passed validation and failed at the first step as a 'non-finite loss'."""
    options = list(float_options(Config()))
    assert ("loss.beta", False) in options and ("train.adam_betas", True) in options and len(options) >= 10
    for key, is_list in options:
        for value in (".nan", ".inf", "-.inf"):
            override = f"{key}=[0.5, {value}]" if is_list else f"{key}={value}"
            with pytest.raises(ConfigError, match=re.escape(key) + r"(\[1\])? must be a finite number"):
                load_config(None, [override])


def test_attention_kernels_are_transformers_training_kernels():
    """model.attn_implementation takes what transformers accepts, less paged|eager (a paged KV cache, generation)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from dpo_dist.config import AttnImplementation

    transformers_kernels = {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()}
    assert set(typing.get_args(AttnImplementation)) == transformers_kernels - {"paged|eager"}
    for kernel in typing.get_args(AttnImplementation):
        assert load_config(None, [f"model.attn_implementation={kernel}"]).model.attn_implementation == kernel


def make_paths(tmp_path, paths):
    for path in paths:
        target = tmp_path / path
        if path.endswith("/"):
            target.mkdir(parents=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("{}")


@pytest.mark.parametrize("paths, name, message", BAD_MODEL_PATHS, ids=[case[1] for case in BAD_MODEL_PATHS])
def test_bad_model_path_says_what_is_there(tmp_path, paths, name, message):
    """A missing local path was 'Repo id must be in the form 'repo_name' or 'namespace/repo_name''; a folder with no
    model, a traceback about sentencepiece."""
    make_paths(tmp_path, paths)
    with pytest.raises(ModelError) as error:
        resolve_source(name.format(tmp=tmp_path))
    assert message.format(tmp=tmp_path) in str(error.value)
    assert "\n" not in str(error.value)


def test_model_folders_and_hub_ids_pass(tiny_model_dir):
    assert resolve_source(tiny_model_dir) == tiny_model_dir
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"  # not fetched


def test_attention_kernel_that_is_not_installed_names_the_key(tiny_model_dir):
    import importlib.util

    import torch

    from dpo_dist.model.load import load_base

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed here: flash_attention_2 loads")
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.attn_implementation=flash_attention_2"])
    with pytest.raises(ModelError, match=r"^model.attn_implementation=flash_attention_2: FlashAttention2 .*"
                                         r" installed; set model.attn_implementation=sdpa \(or null\)"):
        load_base(tiny_model_dir, cfg, torch.float32, torch.device("cpu"))


def test_hub_model_that_cannot_be_fetched_is_one_line(monkeypatch):
    """What transformers raises for a Hub id offline (measured here: after 46 s of retries), as one line naming it."""
    import transformers

    from dpo_dist.model.load import load_tokenizer

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files, and couldn't find them in the "
                      "cached files.\nCheck your internet connection or see how to run the library in offline mode.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelError) as error:
        load_tokenizer("nosuchorg/nosuchmodel", load_config())
    assert str(error.value).startswith("model.name_or_path=nosuchorg/nosuchmodel (not a local folder either): cannot "
                                       "load the tokenizer: We couldn't connect to 'https://huggingface.co'")
    assert "\n" not in str(error.value)


LAUNCHED = [
    (["train.learning_rate=-1"], "config error: train.learning_rate must not be negative, got -1.0"),
    (["model.attn_implementation=flash"], "config error: model.attn_implementation: 'flash' is not one of eager, sdpa"),
    (["model.name_or_path={tmp}/no-such-model"], "model error: model.name_or_path: {tmp}/no-such-model does not exist"),
    (["model.name_or_path={tmp}"], "model error: model.name_or_path: no model in {tmp} (no config.json or "
                                   "adapter_config.json)"),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, message", LAUNCHED, ids=[case[0][0] for case in LAUNCHED])
def test_launch_prints_one_line_and_exits_2(tmp_path, overrides, message):
    """A setting that cannot work is one line naming the key and status 2, because otherwise it surfaces deep in a
    library: a ValueError traceback from torch's AdamW or from transformers (attention; a folder with no model), or
    transformers calling a missing local folder a malformed Hub id ('Repo id must be in the form ...'), status 1."""
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"train.output_dir={out}",
         *(o.format(tmp=tmp_path) for o in overrides)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith(("config error:", "model error:"))]
    assert len(errors) == 1 and done.stderr.rstrip().endswith(errors[0]), done.stderr[-3000:]
    assert errors[0].startswith(message.format(tmp=tmp_path)), errors[0]
    assert not os.path.exists(out / "metrics.jsonl")


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def row_loader():
    from tiny import make_tokenizer

    tokenizer = make_tokenizer("chatml")
    tokenizer.chat_template = USER_ASSISTANT_ONLY
    return lambda path, fmt, **kwargs: load_pairs(path, tokenizer=tokenizer if fmt == "conversational" else None,
                                                  **kwargs)


@pytest.mark.parametrize("fmt, bad, message, reason", BAD_ROWS, ids=[f"{c[0]}-{c[3]}" for c in BAD_ROWS])
def test_bad_row_is_named_or_skipped(tmp_path, fmt, bad, message, reason):
    good = GOOD_ROWS[fmt]
    path = write_rows(tmp_path / "d.jsonl", [good, good, bad, good])
    load = row_loader()
    with pytest.raises(DataError) as error:
        load(path, fmt)
    assert f"d.jsonl: row 2: {message}" in str(error.value)
    pairs, report = load(path, fmt, on_bad_row="skip")
    assert report.data_format == fmt and pairs["row"] == [0, 1, 3]
    assert dict(report.skipped) == {reason: 1}


@pytest.mark.parametrize("fmt", sorted(GOOD_ROWS))
def test_skip_counts_every_bad_row_of_a_format_by_reason(tmp_path, fmt):
    bad = [row for f, row, _, _ in BAD_ROWS if f == fmt]
    rows = [GOOD_ROWS[fmt], *bad, GOOD_ROWS[fmt], bad[-1]]
    pairs, report = row_loader()(write_rows(tmp_path / "d.jsonl", rows), fmt, on_bad_row="skip")
    expected = Counter(reason for f, _, _, reason in BAD_ROWS if f == fmt)
    expected[[reason for f, _, _, reason in BAD_ROWS if f == fmt][-1]] += 1
    assert report.skipped == expected and pairs["row"] == [0, len(bad) + 1]
    assert f"2 of {len(rows)} rows kept ({fmt} format); skipped " in report.summary()


@pytest.mark.parametrize("fmt, bad, message, reason", RANKING_BAD_ROWS, ids=[c[2][:20] for c in RANKING_BAD_ROWS])
def test_bad_row_in_ranking_mode_is_named_or_skipped(tmp_path, fmt, bad, message, reason):
    path = write_rows(tmp_path / "d.jsonl", [GOOD_ROWS[fmt], bad, GOOD_ROWS[fmt]])
    with pytest.raises(DataError) as error:
        load_pairs(path, responses="ranking")
    assert f"d.jsonl: row 1: {message}" in str(error.value)
    pairs, report = load_pairs(path, responses="ranking", on_bad_row="skip")
    assert pairs["row"] == [0, 2] and dict(report.skipped) == {reason: 1}
    assert len(load_pairs(path)[0]) > 2  # pairs mode takes the row


def test_every_bad_row_reason_has_a_case():
    assert {reason for _, _, _, reason in BAD_ROWS + RANKING_BAD_ROWS} == set(REASONS)
    assert set(GOOD_ROWS) == {fmt for fmt, _, _, _ in BAD_ROWS}
