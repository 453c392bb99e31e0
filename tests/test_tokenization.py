"""Token boundaries in token space: BOS once, EOS once, prompt keeps its end, responses keep their start."""

import json
import os

import datasets
import pytest

from dpo_dist.data.collate import IGNORE_INDEX, PreferenceCollator
from dpo_dist.data.load import DataError, load_pairs
from dpo_dist.data.tokenization import TokenizationError, Truncation, tokenize_pair, tokenize_pairs, uses_bos
from faults import USER_ASSISTANT_ONLY
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


def test_pair_that_cannot_fit_is_dropped_and_counted(caplog):
    """The warning counts the dropped pairs out of those tokenized (it said "dropped 1 of 1": the count after the
    drop), also when every pair is dropped ("of 0")."""
    tok = make_tokenizer("nobos")
    long = dict(TEXT_PAIR, prompt="Human: What is the capital of France? " * 10)
    pairs = dataset_of([TEXT_PAIR, long])
    with caplog.at_level("WARNING", logger="dpo_dist.data.tokenization"):
        tokenized, dropped = tokenize_pairs(pairs, tok, Truncation(max_length=32, max_prompt_length=None))
        assert dropped == 1 and tokenized["row"] == [0]
        assert "dropped 1 of 2 pairs whose prompt leaves no room" in caplog.text
        caplog.clear()
        tokenized, dropped = tokenize_pairs(dataset_of([long, long, long]), tok, Truncation(max_length=32,
                                                                                             max_prompt_length=None))
        assert dropped == 3 and len(tokenized) == 0 and "dropped 3 of 3 pairs" in caplog.text
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


@pytest.mark.slow
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


# Conversational rows: what the prompt is, and rows that are bad only as conversations. Every case is loaded from a
# file (so errors name the file and row) and checked down to the token ids.

def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


def load_rows(tmp_path, rows, **kwargs):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return load_pairs(str(path), **kwargs)


def expected_ids(tok, prompt_messages, response):
    """What a conversational pair must become: the template's rendering of ``prompt_messages`` with the generation
    prompt (BOS once in front if the tokenizer uses one), and the response text followed by one EOS."""
    prompt = encode(tok, tok.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True))
    if uses_bos(tok) and prompt[:1] != [tok.bos_token_id]:
        prompt = [tok.bos_token_id] + prompt
    return prompt, encode(tok, response) + [tok.eos_token_id]


def check_pair_ids(tok, ids, prompt_messages, chosen, rejected):
    check_invariants(tok, ids)
    prompt, chosen_ids = expected_ids(tok, prompt_messages, chosen)
    assert ids["prompt_input_ids"] == prompt
    assert ids["chosen_input_ids"] == chosen_ids
    assert ids["rejected_input_ids"] == expected_ids(tok, prompt_messages, rejected)[1]


@pytest.mark.parametrize("kind", ("chatml", "zephyr"))
def test_prompt_string_beside_assistant_only_lists_is_the_user_turn(tmp_path, kind):
    """A string prompt beside assistant-only chosen/rejected was read as an empty prompt (the text lost); with a
    system message first the prompt was only the system message. The string is the user turn, after any system."""
    tok = make_tokenizer(kind)
    rows = [
        {"prompt": "2+2?", "chosen": [assistant("4")], "rejected": [assistant("5")]},
        {"prompt": "2+2?", "chosen": [system("Be brief."), assistant("4")],
         "rejected": [system("Be brief."), assistant("5")]},
    ]
    pairs, report = load_rows(tmp_path, rows, tokenizer=tok)
    assert report.rows_kept == 2
    assert pairs[0]["prompt"] == [user("2+2?")]
    assert pairs[1]["prompt"] == [system("Be brief."), user("2+2?")]
    tokenized, _ = tokenize_pairs(pairs, tok, WIDE)
    check_pair_ids(tok, tokenized[0], [user("2+2?")], "4", "5")
    check_pair_ids(tok, tokenized[1], [system("Be brief."), user("2+2?")], "4", "5")
    if kind == "chatml":
        assert tok.decode(tokenized[1]["prompt_input_ids"]) == (
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
        assert tok.decode(tokenized[1]["chosen_input_ids"]) == "4<|im_end|>"
    # the same ids as the explicit layout (prompt message list beside the responses)
    explicit, _ = load_rows(tmp_path, [{"prompt": [user("2+2?")], "chosen": [assistant("4")],
                                        "rejected": [assistant("5")]}])
    assert tokenize_pairs(explicit, tok, WIDE)[0][0] == tokenized[0]


def test_conversation_with_no_prompt_at_all_is_a_bad_row(tmp_path):
    """No prompt field and no message before the response (it crashed in the chat template, naming no row)."""
    tok = make_tokenizer("chatml")
    good = {"prompt": "2+2?", "chosen": [assistant("4")], "rejected": [assistant("5")]}
    no_prompt = {"chosen": [assistant("4")], "rejected": [assistant("5")]}
    empty_string = dict(good, prompt=" ")
    with pytest.raises(DataError, match=r"chat\.jsonl: row 1: no message before the response"):
        load_rows(tmp_path, [good, no_prompt])
    pairs, report = load_rows(tmp_path, [good, no_prompt, empty_string, good], on_bad_row="skip")
    assert dict(report.skipped) == {"no_prompt": 2} and pairs["row"] == [0, 3]
    for ids in tokenize_pairs(pairs, tok, WIDE)[0]:
        check_pair_ids(tok, ids, [user("2+2?")], "4", "5")


def test_prompt_string_beside_whole_conversations_must_be_one_of_their_user_turns(tmp_path):
    """UltraFeedback-binarized: the string repeats the conversations' user turn. One that matches none would be lost."""
    tok = make_tokenizer("chatml")
    convo = {"prompt": "2+2?", "chosen": [user("2+2?"), assistant("4")], "rejected": [user("2+2?"), assistant("5")]}
    other = dict(convo, prompt="3+3?")
    with pytest.raises(DataError, match=r"row 1: the prompt string '3\+3\?' is not the content of any user message"):
        load_rows(tmp_path, [convo, other])
    pairs, report = load_rows(tmp_path, [convo, other, dict(convo, prompt=" 2+2?\n")], on_bad_row="skip")
    assert dict(report.skipped) == {"prompts_differ": 1} and pairs["row"] == [0, 2]
    for ids in tokenize_pairs(pairs, tok, WIDE)[0]:
        check_pair_ids(tok, ids, [user("2+2?")], "4", "5")


def test_prompt_list_that_is_not_a_prefix_is_a_bad_row(tmp_path):
    """It passed validation, then tokenization failed naming no row, and skip could not leave it out."""
    tok = make_tokenizer("chatml")
    prompt = [system("Be brief."), user("2+2?")]
    whole = {"prompt": prompt, "chosen": prompt + [assistant("4")], "rejected": prompt + [assistant("5")]}
    not_prefix = dict(whole, chosen=[user("3+3?"), assistant("6")])
    past_prompt = dict(whole, rejected=prompt + [assistant("5"), user("sure?"), assistant("yes")])
    with pytest.raises(DataError, match=r"row 1: the prompt messages are not a prefix of the chosen conversation"):
        load_rows(tmp_path, [whole, not_prefix])
    with pytest.raises(DataError, match=r"row 1: rejected has a user message after the prompt"):
        load_rows(tmp_path, [whole, past_prompt])
    pairs, report = load_rows(tmp_path, [whole, not_prefix, past_prompt, whole], on_bad_row="skip")
    assert dict(report.skipped) == {"prompt_not_prefix": 2} and pairs["row"] == [0, 3]
    assert pairs[0]["chosen"] == [assistant("4")], "the repeated prompt messages are dropped from the response"
    for ids in tokenize_pairs(pairs, tok, WIDE)[0]:
        check_pair_ids(tok, ids, prompt, "4", "5")
    # a multi-message response (a tool result between assistant turns) stays whole
    tool = dict(whole, chosen=[assistant("calc(2+2)"), {"role": "tool", "content": "4"}, assistant("4")])
    pairs, _ = load_rows(tmp_path, [tool], tokenizer=tok)
    ids = tokenize_pairs(pairs, tok, WIDE)[0][0]
    assert tok.decode(ids["chosen_input_ids"]) == (
        "calc(2+2)<|im_end|>\n<|im_start|>tool\n4<|im_end|>\n<|im_start|>assistant\n4<|im_end|>")
    assert ids["prompt_input_ids"] == expected_ids(tok, prompt, "")[0]


def test_unknown_role_is_a_bad_row(tmp_path):
    """``wizard`` was kept and trained as ``<|im_start|>wizard``."""
    tok = make_tokenizer("chatml")
    good = {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}
    wizard = dict(good, prompt=[{"role": "wizard", "content": "2+2?"}])
    with pytest.raises(DataError, match=r"row 1: prompt\[0\] has role 'wizard'; roles: system, user, assistant, tool"):
        load_rows(tmp_path, [good, wizard])
    pairs, report = load_rows(tmp_path, [wizard, good], on_bad_row="skip")
    assert dict(report.skipped) == {"unknown_role": 1} and pairs["row"] == [1]
    ids = tokenize_pairs(pairs, tok, WIDE)[0][0]
    check_pair_ids(tok, ids, [user("2+2?")], "4", "5")
    assert "wizard" not in tok.decode(ids["prompt_input_ids"])




def test_row_the_chat_template_rejects_is_named_and_skippable(tmp_path):
    """A template that raises on a row's role: named by file and row while loading with the tokenizer (or by row when
    tokenizing), skipped and counted with on_bad_row=skip; before, a jinja2 traceback naming no row."""
    tok = make_tokenizer("chatml")
    tok.chat_template = USER_ASSISTANT_ONLY
    good = {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}
    with_system = dict(good, prompt=[system("Be brief."), user("2+2?")])
    with pytest.raises(DataError, match=r"chat\.jsonl: row 1: the chat template cannot render this row "
                                        r"\(roles assistant, system, user\): TemplateError: system role not supported"):
        load_rows(tmp_path, [good, with_system], tokenizer=tok)
    pairs, _ = load_rows(tmp_path, [good, with_system])  # without the tokenizer, tokenizing names the row
    with pytest.raises(TokenizationError, match=r"^row 1: the chat template cannot render this row"):
        tokenize_pairs(pairs, tok, WIDE)
    pairs, report = load_rows(tmp_path, [good, with_system, good], tokenizer=tok, on_bad_row="skip")
    assert dict(report.skipped) == {"template_error": 1} and pairs["row"] == [0, 2]
    for ids in tokenize_pairs(pairs, tok, WIDE)[0]:
        check_pair_ids(tok, ids, [user("2+2?")], "4", "5")
    # the ChatML template accepts the system message: the same rows all load, system rendered in the prompt
    pairs, report = load_rows(tmp_path, [good, with_system], tokenizer=make_tokenizer("chatml"))
    ids = tokenize_pairs(pairs, make_tokenizer("chatml"), WIDE)[0][1]
    check_pair_ids(make_tokenizer("chatml"), ids, [system("Be brief."), user("2+2?")], "4", "5")
    with pytest.raises(TokenizationError, match="chat_template"):
        load_rows(tmp_path, [good], tokenizer=make_tokenizer("bos"))
