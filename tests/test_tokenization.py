"""Token boundaries in token space: BOS once, EOS once, prompt keeps its end, responses keep their start."""

import os

import datasets
import pytest

from dpo_dist.data.collate import IGNORE_INDEX, PreferenceCollator
from dpo_dist.data.load import load_pairs
from dpo_dist.data.tokenization import TokenizationError, Truncation, tokenize_pair, tokenize_pairs, uses_bos
from tiny import make_tokenizer

TOKENIZERS = ("bos", "nobos", "chatml", "zephyr")
WIDE = Truncation(max_length=4096, max_prompt_length=2048)
TEXT_PAIR = {"prompt": "\n\nHuman: Can you help me bake bread?\n\nAssistant:", "chosen": " Sure! Mix flour.", "rejected": " No."}
CONV_PAIR = {
    "prompt": [{"role": "user", "content": "Can you help me bake bread?"}],
    "chosen": [{"role": "assistant", "content": "Sure! Mix flour."}],
    "rejected": [{"role": "assistant", "content": "No."}],
}


def encode(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def check_invariants(tok, ids, truncation=WIDE):
    """The invariants every tokenized pair satisfies, whatever the tokenizer's conventions."""
    prompt = ids["prompt_input_ids"]
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if uses_bos(tok):
        assert prompt[0] == bos and prompt[1:2] != [bos], "BOS exactly once, in front"
        assert bos not in prompt[1:]
    elif bos is not None:
        assert bos not in prompt
    for side in ("chosen", "rejected"):
        response = ids[f"{side}_input_ids"]
        assert response, "never an empty response"
        assert len(prompt) + len(response) <= truncation.max_length
        assert eos not in response[:-1], "EOS only at the end"
        if bos is not None:
            assert bos not in response
    if truncation.max_prompt_length is not None:
        assert len(prompt) <= truncation.max_prompt_length


@pytest.mark.parametrize("kind", ("bos", "nobos"))
def test_text_pair_in_token_space(kind):
    tok = make_tokenizer(kind)
    ids = tokenize_pair(TEXT_PAIR, tok, WIDE, add_bos=uses_bos(tok))
    check_invariants(tok, ids)
    lead = [tok.bos_token_id] if kind == "bos" else []
    assert ids["prompt_input_ids"] == lead + encode(tok, TEXT_PAIR["prompt"])
    assert ids["chosen_input_ids"] == encode(tok, " Sure! Mix flour.") + [tok.eos_token_id]
    assert ids["rejected_input_ids"] == encode(tok, " No.") + [tok.eos_token_id]


def test_joined_text_is_never_retokenized():
    """A prompt ending mid-word: tokenizing the joined text would merge across the boundary; token space doesn't."""
    tok = make_tokenizer("nobos")
    pair = {"prompt": "The capi", "chosen": "tal of France", "rejected": "tol"}
    ids = tokenize_pair(pair, tok, WIDE, add_bos=False)
    joined = encode(tok, "The capital of France")
    separate = encode(tok, "The capi") + encode(tok, "tal of France")
    assert joined != separate, "the example must cross a merge boundary to mean anything"
    assert ids["prompt_input_ids"] + ids["chosen_input_ids"][:-1] == separate
    assert tok.decode(ids["prompt_input_ids"] + ids["chosen_input_ids"][:-1]) == "The capital of France"


@pytest.mark.parametrize("kind", ("chatml", "zephyr"))
def test_chat_template_pair(kind):
    tok = make_tokenizer(kind)
    ids = tokenize_pair(CONV_PAIR, tok, WIDE, add_bos=uses_bos(tok))
    check_invariants(tok, ids)
    rendered = tok.apply_chat_template(CONV_PAIR["prompt"], tokenize=False, add_generation_prompt=True)
    if kind == "zephyr":  # the template renders BOS and the tokenizer adds one: still exactly one
        assert rendered.startswith("<s>")
    assert tok.decode(ids["prompt_input_ids"]) == rendered
    # The template ends the assistant turn with EOS + newline: cut after EOS, never doubled.
    assert tok.decode(ids["chosen_input_ids"]) == "Sure! Mix flour." + tok.eos_token
    assert ids["chosen_input_ids"].count(tok.eos_token_id) == 1


def test_conversational_needs_a_chat_template():
    with pytest.raises(TokenizationError, match="chat_template"):
        tokenize_pair(CONV_PAIR, make_tokenizer("bos"), WIDE, add_bos=True)


def test_tokenizer_without_eos_is_an_error():
    tok = make_tokenizer("nobos")
    tok.eos_token = None
    pairs = dataset_of([TEXT_PAIR])
    with pytest.raises(TokenizationError, match="no eos_token"):
        tokenize_pairs(pairs, tok, WIDE)


def dataset_of(rows):
    return datasets.Dataset.from_list([dict(r, row=i) for i, r in enumerate(rows)])


@pytest.mark.parametrize("kind", ("bos", "nobos"))
def test_truncation_keeps_prompt_end_and_response_start(kind):
    tok = make_tokenizer(kind)
    long_prompt = "Human: What is the capital of France? " * 6 + "Assistant:"
    pair = {"prompt": long_prompt, "chosen": " The capital of France is Paris. " * 4, "rejected": " No."}
    truncation = Truncation(max_length=40, max_prompt_length=16)
    ids = tokenize_pair(pair, tok, truncation, add_bos=uses_bos(tok))
    check_invariants(tok, ids, truncation)
    full_prompt = encode(tok, long_prompt)
    if kind == "bos":
        assert ids["prompt_input_ids"] == [tok.bos_token_id] + full_prompt[-15:]
    else:
        assert ids["prompt_input_ids"] == full_prompt[-16:]
    room = 40 - 16
    full_chosen = encode(tok, pair["chosen"]) + [tok.eos_token_id]
    assert ids["chosen_input_ids"] == full_chosen[:room] and tok.eos_token_id not in ids["chosen_input_ids"]
    assert ids["rejected_input_ids"] == encode(tok, " No.") + [tok.eos_token_id], "short response untouched"


def test_pair_that_cannot_fit_is_dropped_and_counted():
    tok = make_tokenizer("nobos")
    rows = [TEXT_PAIR, dict(TEXT_PAIR, prompt="Human: What is the capital of France? " * 10)]
    pairs = dataset_of(rows)
    tokenized, dropped = tokenize_pairs(pairs, tok, Truncation(max_length=32, max_prompt_length=None))
    assert dropped == 1 and tokenized["row"] == [0]
    tokenized, dropped = tokenize_pairs(pairs, tok, Truncation(max_length=32, max_prompt_length=16))
    assert dropped == 0 and len(tokenized) == 2
    for ids in tokenized:
        check_invariants(tok, ids, Truncation(max_length=32, max_prompt_length=16))


@pytest.mark.parametrize("bad", [dict(max_length=1), dict(max_length=10, max_prompt_length=10), dict(max_prompt_length=0)])
def test_truncation_settings_are_validated(bad):
    with pytest.raises(TokenizationError, match="max_"):
        Truncation(**bad)


@pytest.mark.parametrize("side", ("right", "left"))
def test_collator_labels_mask_prompt_and_padding(side):
    tok = make_tokenizer("bos")
    ids = [tokenize_pair(p, tok, WIDE, add_bos=True) for p in (TEXT_PAIR, dict(TEXT_PAIR, prompt="Hi", chosen=" ok"))]
    batch = PreferenceCollator(pad_token_id=2, padding_side=side)(ids)
    assert batch["input_ids"].shape[0] == 4
    for row, (example, response) in enumerate(
        [(ids[0], "chosen"), (ids[1], "chosen"), (ids[0], "rejected"), (ids[1], "rejected")]
    ):
        mask = batch["attention_mask"][row].bool()
        tokens = example["prompt_input_ids"] + example[f"{response}_input_ids"]
        assert batch["input_ids"][row][mask].tolist() == tokens
        labels = batch["labels"][row]
        assert (labels[~mask] == IGNORE_INDEX).all(), "padding is masked"
        real = labels[mask].tolist()
        assert real == [IGNORE_INDEX] * len(example["prompt_input_ids"]) + example[f"{response}_input_ids"]
        assert batch["position_ids"][row][mask].tolist() == list(range(len(tokens)))


@pytest.mark.hh_rlhf
@pytest.mark.parametrize("kind", TOKENIZERS)
def test_real_hh_pairs_keep_every_invariant(hh_dir, kind):
    tok = make_tokenizer(kind)
    chat = kind in ("chatml", "zephyr")
    pairs, report = load_pairs(
        os.path.join(hh_dir, "helpful-base-test.jsonl.gz"), on_bad_row="skip", hh_as_messages=chat
    )
    assert report.rows_read == 2354 and report.rows_kept == len(pairs) > 2300
    truncation = Truncation(max_length=512, max_prompt_length=384)
    tokenized, dropped = tokenize_pairs(pairs, tok, truncation)
    assert dropped == 0 and len(tokenized) == len(pairs)
    cut_prompts = cut_responses = 0
    for ids, pair in zip(tokenized, pairs):
        check_invariants(tok, ids, truncation)
        assert ids["row"] == pair["row"]
        if chat:
            continue
        prompt_ids = encode(tok, pair["prompt"])
        lead = [tok.bos_token_id] if kind == "bos" else []
        if len(lead + prompt_ids) <= 384:
            assert ids["prompt_input_ids"] == lead + prompt_ids
        else:
            cut_prompts += 1
            assert ids["prompt_input_ids"] == lead + prompt_ids[-(384 - len(lead)):]
        for side in ("chosen", "rejected"):
            full = encode(tok, pair[side]) + [tok.eos_token_id]
            got = ids[f"{side}_input_ids"]
            cut_responses += got != full
            assert got == full[: 512 - len(ids["prompt_input_ids"])]
    if not chat:
        assert cut_prompts > 0 and cut_responses > 0, "the real data must exercise both truncations"
