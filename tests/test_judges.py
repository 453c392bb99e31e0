"""The judges (``dpo_dist/eval/judges.py``): evaluation's pairwise judges and the score judges iterative rounds use,
the one parser of judge specs, and ``checked_scores``, the one check of what a score judge returned.

Model judges are tiny models built here from a config (nothing from the Hub); each is checked against a plain forward
of the same model. Function judges come from ``tests/judge_functions.py``.
"""

import importlib.util
import math

import pytest
import torch

from tiny import make_llama, make_tokenizer

CPU = torch.device("cpu")
PROMPTS = ["the film", "Human: Can you help me bake bread?\nAssistant:", "the movie was"]
COMPLETIONS = [" was great", " Sure! Mix flour, water, salt and yeast, then knead.", " no"]


def spec(function: str) -> str:
    return f"python:tests.judge_functions:{function}"


# --- specs ---------------------------------------------------------------------------------------------------------

def test_the_judge_kinds_are_the_configs_and_each_has_one_score_judge():
    """rounds.judge is checked against config.JUDGE_KINDS; each kind there has one record in SCORE_JUDGES."""
    from dpo_dist.config import JUDGE_KINDS
    from dpo_dist.config import JUDGE_FORMS as FORMS
    from dpo_dist.eval.judges import SCORE_JUDGES

    assert set(SCORE_JUDGES) == set(FORMS) == {form.split(":")[0] for form in JUDGE_KINDS}


def test_parse_judge_reads_every_form_and_refuses_the_rest():
    from dpo_dist.eval.judges import JudgeError, parse_judge

    assert parse_judge("sentiment") == ("sentiment", "")
    assert parse_judge("reward_model:models/rm") == ("reward_model", "models/rm")
    assert parse_judge("llm:/data/judge:v2") == ("llm", "/data/judge:v2"), "a path may hold a colon"
    assert parse_judge("python:my.judges:score") == ("python", "my.judges:score")
    with pytest.raises(JudgeError, match=r"^unknown judge 'vibes': use sentiment, reward_model:PATH, "
                                         r"python:MODULE:FUNCTION or llm:PATH$"):
        parse_judge("vibes")
    for bad, form in (("python:my.judges", "python:MODULE:FUNCTION"), ("python:m:f:g", "python:MODULE:FUNCTION"),
                      ("python::f", "python:MODULE:FUNCTION"), ("llm:", "llm:PATH"),
                      ("reward_model", "reward_model:PATH"), ("sentiment:vader", "sentiment")):
        with pytest.raises(JudgeError, match=f"^judge '{bad}': write it as {form}$"):
            parse_judge(bad)
    assert issubclass(JudgeError, ValueError), "evaluate's CLI reports ValueErrors as one line"


def test_build_score_judge_refuses_options_the_judge_would_not_read():
    from dpo_dist.eval.judges import JudgeError, build_score_judge

    with pytest.raises(JudgeError, match="a judge template is read by llm:PATH judges only"):
        build_score_judge("sentiment", CPU, template="Is {response} good?")
    with pytest.raises(JudgeError, match=r"quantization 4bit applies to model judges only"):
        build_score_judge(spec("length_score"), CPU, quantization="4bit")
    with pytest.raises(JudgeError, match="batch size must be positive"):
        build_score_judge("sentiment", CPU, batch_size=0)


# --- checked_scores ------------------------------------------------------------------------------------------------

def test_checked_scores_returns_plain_floats_in_order():
    from dpo_dist.eval.judges import build_score_judge, checked_scores

    for function in ("length_score", "tensor_score"):
        scores = checked_scores(build_score_judge(spec(function), CPU), PROMPTS, COMPLETIONS)
        assert scores == [10.0, 52.0, 3.0] and all(type(s) is float for s in scores)
    assert checked_scores(build_score_judge(spec("raises"), CPU), [], []) == [], "nothing to score: not called"


REFUSALS = [
    ("nan_score", "scored a completion nan, not a finite number: prompt 'the movie was', completion ' no'"),
    ("inf_score", "scored a completion inf, not a finite number: prompt 'the movie was', completion ' no'"),
    ("text_score", "scored a completion a str, '3.0', not a number: prompt 'the movie was', completion ' no'"),
    ("bool_score", "scored a completion a bool, 'True', not a number: prompt 'the film', completion ' was great'"),
    ("wrong_count", "returned 2 scores for 3 completions (the first of prompt 'the film')"),
    ("one_number", "returned a float, not a list of one score per completion (scoring 3 completions, the first of "
                   "prompt 'the film')"),
    ("raises", "raised RuntimeError: the scoring service is down retry later (scoring 3 completions, the first of "
               "prompt 'the film')"),
]


@pytest.mark.parametrize("function, said", REFUSALS, ids=[function for function, _ in REFUSALS])
def test_checked_scores_refuses_in_one_line_naming_the_judge_and_the_prompt(function, said):
    from dpo_dist.eval.judges import JudgeError, build_score_judge, checked_scores

    judge = build_score_judge(spec(function), CPU)
    assert judge.name == spec(function)
    with pytest.raises(JudgeError) as caught:
        checked_scores(judge, PROMPTS, COMPLETIONS)
    assert str(caught.value) == f"judge {spec(function)} {said}"
    # Through a comparison too (evaluation): a NaN would otherwise lose every comparison silently.
    with pytest.raises(JudgeError, match=spec(function)):
        judge.compare(PROMPTS, COMPLETIONS, COMPLETIONS)


def test_a_long_prompt_is_cut_and_stays_on_one_line():
    from dpo_dist.eval.judges import JudgeError, build_score_judge, checked_scores

    prompt = "Human: " + "tell me more\n" * 20
    with pytest.raises(JudgeError) as caught:
        checked_scores(build_score_judge(spec("nan_score"), CPU), [prompt], ["ok"])
    line = str(caught.value)
    assert "\n" not in line and repr(prompt[:80]) + "..." in line and len(line) < 250


def test_checked_scores_refuses_prompts_and_completions_of_other_counts():
    from dpo_dist.eval.judges import JudgeError, SentimentJudge, checked_scores

    with pytest.raises(JudgeError, match="asked to score 3 completions of 2 prompts"):
        checked_scores(SentimentJudge(), PROMPTS[:2], COMPLETIONS)


# --- function judges -----------------------------------------------------------------------------------------------

def test_a_function_judge_through_build_judge_and_build_score_judge():
    from dpo_dist.eval.judges import FunctionJudge, ScoreJudge, build_judge, build_score_judge

    judge = build_judge(spec("length_score"), CPU)  # evaluation: a score judge, the higher score wins
    assert isinstance(judge, FunctionJudge) and isinstance(judge, ScoreJudge)
    outcomes, details = judge.compare(PROMPTS, COMPLETIONS, [" was good", " Sure!", " no"])
    assert outcomes == [1.0, 1.0, 0.5]
    assert details == {"scores": [10.0, 52.0, 3.0], "baseline_scores": [9.0, 6.0, 3.0]}
    rounds = build_score_judge(spec("length_score"), CPU)
    assert isinstance(rounds, FunctionJudge) and rounds.scores(PROMPTS, COMPLETIONS) == [10.0, 52.0, 3.0]


def test_a_function_judge_that_cannot_be_found_says_which_and_why():
    from dpo_dist.eval.judges import JudgeError, build_score_judge

    with pytest.raises(JudgeError, match=r"^judge python:tests\.no_such_module:f: cannot import module "
                                         r"'tests\.no_such_module' \(ModuleNotFoundError: "):
        build_score_judge("python:tests.no_such_module:f", CPU)
    for name in ("no_such_function", "not_a_function"):
        with pytest.raises(JudgeError, match=rf"^judge {spec(name)}: module tests\.judge_functions \(.*"
                                             rf"judge_functions\.py\) has no function '{name}'$"):
            build_score_judge(spec(name), CPU)


# --- sentiment -----------------------------------------------------------------------------------------------------

def test_sentiment_judge_prefers_the_more_positive_response():
    from dpo_dist.eval.judges import SentimentJudge, build_score_judge

    outcomes, details = SentimentJudge().compare(
        ["p", "p", "p"], ["a wonderful, delightful film", "it was a film", "awful and boring"],
        ["a terrible film", "it was a movie", "great fun"])
    assert outcomes == [1.0, 0.5, 0.0]
    assert details["scores"][0] > 0 > details["baseline_scores"][0]
    assert isinstance(build_score_judge("sentiment", CPU), SentimentJudge)


# --- the LLM judges ------------------------------------------------------------------------------------------------

def test_llm_judge_randomizes_positions_and_reads_the_answer_logprobs(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from dpo_dist.eval.judges import LLMJudge, build_judge

    judge = build_judge(f"llm:{tiny_model_dir}", CPU, seed=1)
    assert isinstance(judge, LLMJudge), "evaluation's llm judge is pairwise"
    prompts, responses, baseline = ["the movie"] * 40, ["great music"] * 40, ["bad acting"] * 40
    # The answers' log-probs are the model's own: checked against a plain forward for one context.
    context = judge.context(prompts[0], responses[0], baseline[0])
    logp_a, logp_b = judge.answer_logps([context])
    ids = judge.tokenizer(context, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    for letter, got in (("A", logp_a), ("B", logp_b)):
        answer = judge.tokenizer(" " + letter, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logps = torch.log_softmax(model(torch.tensor([ids + answer])).logits[0], -1)
        expected = sum(logps[len(ids) - 1 + i, token].item() for i, token in enumerate(answer))
        assert got.item() == pytest.approx(expected, abs=1e-4)

    # A judge that always answers A: each side wins exactly where it was shown first.
    judge.answer_logps = lambda contexts: (torch.zeros(len(contexts)), torch.full((len(contexts),), -1.0))
    outcomes, details = judge.compare(prompts, responses, baseline)
    assert details["judge_picked_a"] == 1.0
    assert sum(outcomes) == details["responses_shown_as_a"]
    assert 10 < details["responses_shown_as_a"] < 30, "positions are drawn at random"

    # A judge that reads the content (prefers the response mentioning music) gives the same verdict in either position.
    def by_content(contexts):
        shown_as_a = [c.split("[Response A]")[1].split("[Response B]")[0] for c in contexts]
        a_music = torch.tensor([float("music" in a) for a in shown_as_a])
        return a_music, 1 - a_music

    judge.answer_logps = by_content
    assert judge.compare(prompts, responses, baseline)[0] == [1.0] * 40


def yes_minus_no(model, tokenizer, text: str) -> float:
    """log P(Yes) - log P(No) after ``text``, each answer's tokens scored by a plain forward of one row."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    lead = "" if getattr(tokenizer, "chat_template", None) else " "
    logp = {}
    for answer in ("Yes", "No"):
        tokens = tokenizer(lead + answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logps = torch.log_softmax(model(torch.tensor([ids + tokens])).logits[0].double(), -1)
        logp[answer] = sum(logps[len(ids) - 1 + i, token].item() for i, token in enumerate(tokens))
    return logp["Yes"] - logp["No"]


@pytest.mark.parametrize("kind", ["nobos", "chatml"])
def test_llm_score_judge_scores_log_p_yes_minus_log_p_no(kind, tmp_path):
    """Without a chat template the judge reads the template then ``Answer:`` and is scored on `` Yes``/`` No``; with
    one, the template is a user turn and the answer opens the assistant's. Batched (2 rows of different lengths a
    forward) it agrees with a plain forward of each row alone."""
    from transformers import AutoModelForCausalLM

    from dpo_dist.eval.judges import SCORE_TEMPLATE, LLMScoreJudge, build_score_judge, checked_scores

    tokenizer = make_tokenizer(kind)
    make_llama(len(tokenizer), seed=3).save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    judge = build_score_judge(f"llm:{tmp_path / 'judge'}", CPU, batch_size=2)
    assert isinstance(judge, LLMScoreJudge) and judge.template == SCORE_TEMPLATE
    scores = checked_scores(judge, PROMPTS, COMPLETIONS)
    assert len(scores) == 3 and all(math.isfinite(s) for s in scores) and len(set(scores)) == 3
    assert checked_scores(judge, PROMPTS, COMPLETIONS) == scores, "deterministic"
    assert judge.scores([], []) == []

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "judge").eval()
    for prompt, completion, score in zip(PROMPTS, COMPLETIONS, scores):
        question = SCORE_TEMPLATE.format(prompt=prompt, response=completion)
        if kind == "chatml":
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True)
            assert text.endswith("<|im_start|>assistant\n")
        else:
            text = question + "\nAnswer:"
        assert score == pytest.approx(yes_minus_no(model, tokenizer, text), abs=1e-4)


def test_llm_score_judge_reads_its_template(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpo_dist.eval.judges import JudgeError, build_score_judge

    template = "Is this reply to {{{prompt}}} kind? {response}"  # doubled braces are literal ones
    judge = build_score_judge(f"llm:{tiny_model_dir}", CPU, template=template)
    assert judge.context("hi", "hello") == "Is this reply to {hi} kind? hello\nAnswer:"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert judge.scores(["hi"], ["hello"])[0] == pytest.approx(
        yes_minus_no(model, tokenizer, "Is this reply to {hi} kind? hello\nAnswer:"), abs=1e-4)
    for bad, said in (("Is {prompt} good?", r"has the fields \['prompt'\]"),
                      ("{response} for {user}", r"has the fields \['response', 'user'\]"),
                      ("{response} {0}", r"has the fields \['0', 'response'\]"),
                      ("{response", "expected '}' before end of string")):
        with pytest.raises(JudgeError, match=said):
            build_score_judge(f"llm:{tiny_model_dir}", CPU, template=bad)


# --- reward models -------------------------------------------------------------------------------------------------

def save_reward_model(folder, num_labels=1, hidden_size=32):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = make_tokenizer("chatml")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_labels=num_labels,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def classifier(folder, **load):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(folder, **load).eval()


def classifier_scores(model, tokenizer, prompts, responses):
    """Each response's score from a plain forward of one row (no padding): one output, or the second's log-odds."""
    out = []
    for prompt, response in zip(prompts, responses):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        with torch.no_grad():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0].float()
        out.append(logits[0].item() if len(logits) == 1 else (logits[1] - logits[0]).item())
    return out


def test_reward_model_judge_scores_with_the_classifier(tmp_path):
    from dpo_dist.eval.judges import JudgeError, RewardModelJudge, build_judge, build_score_judge

    tokenizer = save_reward_model(tmp_path / "rm")
    judge = build_judge(f"reward_model:{tmp_path / 'rm'}", CPU)
    assert isinstance(judge, RewardModelJudge)
    prompts, first, second = ["the film", "bread"], ["was great", "flour water salt"], ["was bad", "yes"]
    outcomes, details = judge.compare(prompts, first, second)
    model = classifier(tmp_path / "rm")
    assert details["scores"] == pytest.approx(classifier_scores(model, tokenizer, prompts, first), abs=1e-4)
    assert outcomes == [1.0 if a > b else 0.0 for a, b in zip(details["scores"], details["baseline_scores"])]
    # Rounds' judge, in batches of 2 rows of different lengths (padded): each as scored alone.
    rounds = build_score_judge(f"reward_model:{tmp_path / 'rm'}", CPU, batch_size=2)
    assert rounds.scores(PROMPTS, COMPLETIONS) == pytest.approx(
        classifier_scores(model, tokenizer, PROMPTS, COMPLETIONS), abs=1e-4)
    save_reward_model(tmp_path / "three", num_labels=3)
    with pytest.raises(JudgeError, match="has 3 outputs: expected 1"):
        build_score_judge(f"reward_model:{tmp_path / 'three'}", CPU)


def test_a_two_label_reward_model_scores_the_second_labels_log_odds(tmp_path):
    from dpo_dist.eval.judges import build_score_judge

    tokenizer = save_reward_model(tmp_path / "rm", num_labels=2)
    judge = build_score_judge(f"reward_model:{tmp_path / 'rm'}", CPU, batch_size=2)
    assert judge.scores(PROMPTS, COMPLETIONS) == pytest.approx(
        classifier_scores(classifier(tmp_path / "rm"), tokenizer, PROMPTS, COMPLETIONS), abs=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs bitsandbytes: python3 -m pip install -e '.[qlora]' (the dev extra has it)")
def test_a_4bit_reward_model_judge(tmp_path):
    """``quantization=4bit``: the linear layers are bitsandbytes' 4-bit NF4 ones, as the trainer loads a QLoRA base
    (fp32 compute on CPU, one 4-bit path on any CPU); the scores are those of that model alone, row by row, and
    near the full-precision model's (4-bit weights of a random model move them a little)."""
    import bitsandbytes as bnb

    from dpo_dist.eval.judges import build_score_judge
    from dpo_dist.model.load import one_4bit_path, quantization_config

    tokenizer = save_reward_model(tmp_path / "rm", hidden_size=64)  # a 4-bit block is 64 weights
    judge = build_score_judge(f"reward_model:{tmp_path / 'rm'}", CPU, quantization="4bit", batch_size=2)
    layers = [m for m in judge.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14 and all(not m.support_avx512bf16_for_cpu for m in layers)
    assert judge.name.endswith("(4-bit)")
    scores = judge.scores(PROMPTS, COMPLETIONS)
    by_hand = classifier(tmp_path / "rm", dtype=torch.float32, device_map={"": CPU},
                         quantization_config=quantization_config("4bit", torch.float32))
    one_4bit_path(by_hand)
    assert scores == pytest.approx(classifier_scores(by_hand, tokenizer, PROMPTS, COMPLETIONS), abs=1e-4)
    full = classifier_scores(classifier(tmp_path / "rm"), tokenizer, PROMPTS, COMPLETIONS)
    assert scores != pytest.approx(full, abs=1e-6) and scores == pytest.approx(full, abs=0.1)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs bitsandbytes: python3 -m pip install -e '.[qlora]' (the dev extra has it)")
def test_a_4bit_llm_score_judge(tmp_path):
    """The LLM score judge loads its model as the reward-model judge does (``load_judge_model``): 4-bit linear layers,
    and scores near the full-precision model's."""
    import bitsandbytes as bnb
    from transformers import LlamaConfig, LlamaForCausalLM

    from dpo_dist.eval.judges import build_score_judge

    tokenizer = make_tokenizer("nobos")
    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)  # a 4-bit block is 64 weights
    LlamaForCausalLM(config).save_pretrained(tmp_path / "judge")
    tokenizer.save_pretrained(tmp_path / "judge")
    judge = build_score_judge(f"llm:{tmp_path / 'judge'}", CPU, quantization="4bit")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in judge.model.modules()) == 14
    full = build_score_judge(f"llm:{tmp_path / 'judge'}", CPU)
    assert judge.scores(PROMPTS, COMPLETIONS) == pytest.approx(full.scores(PROMPTS, COMPLETIONS), abs=0.1)
