"""Every accepted scoring path gives the log-probs of an unpadded per-sequence forward; every refused one says why.

The matrix: each model type packing accepts (with and without a sliding window where the architecture has one) x
each attention kernel packing accepts x packed with the prompt shared, packed without sharing, and padded; for pairs,
and for groups (one prompt, k responses: k = 3, k = 4, and k from 2 to 4 in one batch). The reference is the plain
forward of ``prompt + response`` alone, with the model building its own mask (causal, and its sliding window), so
whatever the packed or padded path does differently shows.
"""

from __future__ import annotations

import functools
import math
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from dpo_dist.data.collate import PreferenceCollator
from dpo_dist.data.packing import PackedPairCollator
from dpo_dist.model.attention import FLEX_BLOCK, PACKING_KERNELS, PACKING_MODEL_TYPES, choose_packing, layer_windows
from dpo_dist.train.logprobs import concatenated_forward, group_logps, packed_forward

VOCAB = 96
WINDOW = 6  # shorter than most sequences below, so a window that is ignored or counted wrongly shows
# (model type, sliding window): every type on the packing list, with a window where the architecture has one.
MODELS = [("llama", None), ("mistral", None), ("mistral", WINDOW), ("qwen2", None), ("qwen2", WINDOW),
          ("qwen3", None), ("qwen3", WINDOW), ("gpt2", None)]
LAYOUTS = ("packed-shared-prompt", "packed", "segmented-shared-prompt", "segmented", "padded")
EXACT = dict(rtol=1e-5, atol=1e-5)  # summed log-probs of about -40: fp32 noise is ~1e-6
# FlexAttention on this CPU with torch 2.13: the packed rows of a model without a window compile and are exact; for
# these two cases the compiler fails (the same code path trains on GPUs, where no GPU was lent to check it):
FLEX_CPU_COMPILE_ERROR = (
    "torch 2.13's inductor cannot compile FlexAttention's CPU kernel for {what}: CppCompileError: "
    "'cur_kvSplitSize0' was not declared in this scope (flex does not train on CPU anyway: no backward there)"
)
FLEX_GPT2 = ("transformers 5.24 has no flex_attention for GPT-2 (ValueError at load: GPT2LMHeadModel does not support "
             "an attention implementation through torch's flex_attention); such a model never reaches packing")


def tiny_config(model_type: str, window: int | None):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    if model_type == "llama":
        return LlamaConfig(**common)
    if model_type == "mistral":
        return MistralConfig(**common, sliding_window=window)
    if model_type in ("qwen2", "qwen3"):
        # max_window_layers=1: layer 0 full attention, layer 1 sliding: both layer types in one model
        cls = Qwen2Config if model_type == "qwen2" else Qwen3Config
        extra = dict(head_dim=8) if model_type == "qwen3" else {}
        return cls(**common, **extra, use_sliding_window=window is not None, sliding_window=window or 4096,
                   max_window_layers=1)
    if model_type == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    raise ValueError(model_type)


@functools.lru_cache(maxsize=None)
def tiny_model(model_type: str, window: int | None, kernel: str):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, window), attn_implementation=kernel)
    return model.eval()


def random_pairs(n: int = 6, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_input_ids": [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 11))],
             "chosen_input_ids": [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 10))],
             "rejected_input_ids": [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 10))]} for _ in range(n)]


@torch.no_grad()
def unpadded_logps(model, prompt: list[int], response: list[int]) -> float:
    """Summed log-prob of ``response`` after ``prompt``: one sequence, no padding, no mask of ours."""
    ids = torch.tensor([prompt + response])
    logps = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    token_logps = logps.gather(1, targets[:, None])[:, 0]
    return float(token_logps[len(prompt) - 1 :].sum())


@torch.no_grad()
def scored(model, pairs: list[dict], layout: str):
    block = FLEX_BLOCK if model.config._attn_implementation == "flex_attention" else None
    if layout == "padded":
        out = concatenated_forward(model, PreferenceCollator(pad_token_id=0, pad_to_multiple_of=block)(pairs))
    else:
        # segmented: one row with attention_spans, computed a segment at a time (sdpa)
        collator = PackedPairCollator(0, share_prompt=layout.endswith("shared-prompt"), pad_to_multiple_of=block,
                                      attention_layout="segmented" if layout.startswith("segmented") else "dense")
        out = packed_forward(model, collator(pairs))
    return out.chosen_logps, out.rejected_logps


def expected(model, pairs: list[dict]):
    chosen = [unpadded_logps(model, p["prompt_input_ids"], p["chosen_input_ids"]) for p in pairs]
    rejected = [unpadded_logps(model, p["prompt_input_ids"], p["rejected_input_ids"]) for p in pairs]
    return torch.tensor(chosen), torch.tensor(rejected)


def test_the_matrix_covers_every_accepted_model_type_and_kernel():
    assert {m for m, _ in MODELS} == set(PACKING_MODEL_TYPES)
    assert PACKING_KERNELS == ("sdpa", "eager", "flex_attention")


# The segmented layout runs under sdpa only (train.attention_layout=segmented is refused with other kernels).
KERNEL_LAYOUTS = [(k, layout) for k in PACKING_KERNELS for layout in LAYOUTS
                  if k == "sdpa" or not layout.startswith("segmented")]


def skip_flex_cases(model_type, window, kernel, layout):
    """The FlexAttention cases CPU cannot run, pairs or groups, with the reason."""
    if kernel == "flex_attention":
        if model_type == "gpt2":
            pytest.skip(FLEX_GPT2)
        if window is not None:
            pytest.skip(FLEX_CPU_COMPILE_ERROR.format(what="a sliding-window mask_mod"))
        if layout == "padded":
            pytest.skip(FLEX_CPU_COMPILE_ERROR.format(what="transformers' own mask over padded rows"))


@pytest.mark.slow
@pytest.mark.parametrize("kernel,layout", KERNEL_LAYOUTS, ids=[f"{k}-{layout}" for k, layout in KERNEL_LAYOUTS])
@pytest.mark.parametrize("model_type,window", MODELS, ids=[f"{m}-window{w}" if w else m for m, w in MODELS])
def test_log_probs_equal_an_unpadded_forward(model_type, window, kernel, layout):
    """No-grad passes (the reference precompute, evaluation); FlexAttention is compiled on first use (a C++
    compiler; about 10 s a shape on CPU here) and has no backward on CPU, so it trains only on GPUs."""
    skip_flex_cases(model_type, window, kernel, layout)
    model = tiny_model(model_type, window, kernel)
    assert choose_packing("auto", model)[0], choose_packing("auto", model)[1]
    pairs = random_pairs()
    chosen, rejected = scored(model, pairs, layout)
    # FlexAttention compiles a kernel per shape, and on CPU torch 2.13's compiler fails on rows that are not whole
    # blocks (an unpadded sequence): the unpadded reference runs on the same weights with sdpa.
    want_chosen, want_rejected = expected(tiny_model(model_type, window, "sdpa") if kernel == "flex_attention" else model,
                                          pairs)
    torch.testing.assert_close(chosen, want_chosen, **EXACT)
    torch.testing.assert_close(rejected, want_rejected, **EXACT)


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_the_window_changes_the_answer(model_type):
    """The matrix can fail: with the same weights, the windowed model's log-probs differ from the unwindowed one's,
    and packing that ignored the window would be far off."""
    windowed, full = tiny_model(model_type, WINDOW, "sdpa"), tiny_model(model_type, None, "sdpa")
    pairs = random_pairs()
    with_window, without = expected(windowed, pairs), expected(full, pairs)
    assert (with_window[0] - without[0]).abs().max() > 1e-3
    assert layer_windows(windowed.config) != layer_windows(full.config)


def test_a_boolean_mask_under_eager_would_mask_nothing(monkeypatch):
    """Why eager gets an additive mask: eager *adds* the 4D mask to the scores, so a boolean one adds 0/1."""
    from dpo_dist.model import attention

    model = tiny_model("llama", None, "eager")
    pairs = random_pairs()
    monkeypatch.setattr(attention, "for_kernel", lambda mask, kernel, dtype: mask)
    chosen, _ = scored(model, pairs, "packed-shared-prompt")
    assert (chosen - expected(model, pairs)[0]).abs().max() > 1e-2


@pytest.mark.parametrize("kernel,message", [
    ("flash_attention_2", "attention 'flash_attention_2' takes no 4D attention mask of ours"),
    ("flash_attention_3", "attention 'flash_attention_3' takes no 4D attention mask of ours"),
])
def test_other_kernels_are_refused_with_the_way_out(kernel, message):
    model = tiny_model("llama", None, "sdpa")
    model.config._attn_implementation = kernel
    try:
        on, said = choose_packing("auto", model)
        assert not on and message in said and "model.attn_implementation=sdpa, or train.packing=off" in said
        with pytest.raises(ValueError, match="train.packing=on, but " + message):
            choose_packing("on", model)
    finally:
        model.config._attn_implementation = "sdpa"


def test_other_model_types_and_layer_types_are_refused():
    from transformers import GPTNeoXConfig

    neox = AutoModelForCausalLM.from_config(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                          num_attention_heads=4, intermediate_size=64),
                                            attn_implementation="sdpa")
    assert choose_packing("auto", neox) == (False, "packing: off (model type 'gpt_neox' is not one packing is "
                                               f"verified on ({', '.join(PACKING_MODEL_TYPES)}))")
    qwen = AutoModelForCausalLM.from_config(tiny_config("qwen2", WINDOW), attn_implementation="sdpa")
    qwen.config.layer_types = ["full_attention", "chunked_attention"]
    assert "layer types ['chunked_attention']" in choose_packing("auto", qwen)[1]


def test_eager_with_packing_trains_from_ln2(tmp_path):
    """The reported failure, through the trainer: eager attention with packing starts at ln 2 with the log-probs
    of sdpa (it started at 3.63 when eager got a boolean mask)."""
    from training import run, save_tiny_model, synthetic_pairs

    model_dir = save_tiny_model(str(tmp_path / "model"))
    data = synthetic_pairs(tmp_path / "pairs.jsonl", 24)
    first = {}
    for kernel in ("sdpa", "eager"):
        result = run(model_dir, data, tmp_path / kernel, **{"model.attn_implementation": kernel, "train.packing": "on",
                                                            "train.max_steps": 1, "lora.enabled": True})
        first[kernel] = result["records"][0]
        assert first[kernel]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["eager"]["logps/chosen"] == pytest.approx(first["sdpa"]["logps/chosen"], rel=1e-5)
    assert first["eager"]["logps/rejected"] == pytest.approx(first["sdpa"]["logps/rejected"], rel=1e-5)


def test_flex_attention_training_is_refused_on_cpu(tmp_path):
    """torch's FlexAttention has no backward on CPU: a training run says so before loading anything, with the way
    out; it is exact in no-grad passes there (the matrix above)."""
    from training import run, save_tiny_model, synthetic_pairs

    from dpo_dist.train.checks import TrainingError

    model_dir = save_tiny_model(str(tmp_path / "model"))
    with pytest.raises(TrainingError, match=r"flex_attention cannot train on CPU: .*NotImplementedError: FlexAttention "
                                            r"does not support backward on CPU.*model.attn_implementation=sdpa"):
        run(model_dir, synthetic_pairs(tmp_path / "pairs.jsonl", 8), tmp_path / "out",
            **{"model.attn_implementation": "flex_attention"})



# Groups: responses per group, for the batches the group matrix scores. Each batch packs into rows one FlexAttention
# block wide: on this CPU torch 2.13's inductor compiles the kernel for the first row width and fails on another one
# in the same process (CppCompileError: 'cur_qSplitSize4' was not declared in this scope; pairs as well: a 256-wide
# row after a 128-wide one, measured).
GROUP_SIZES = {"k3": [3] * 5, "k4": [4] * 4, "mixed-k": [2, 4, 3, 2, 4]}


def random_groups(sizes: list[int], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_input_ids": [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 11))],
             "responses_input_ids": [[rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 10))] for _ in range(k)]}
            for k in sizes]


@torch.no_grad()
def scored_groups(model, groups: list[dict], layout: str):
    """group_logps of ``groups`` collated as ``layout`` (one of LAYOUTS). Shape: -> (G, K), (G, K) bool."""
    block = FLEX_BLOCK if model.config._attn_implementation == "flex_attention" else None
    if layout == "padded":
        collator = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=block)
    else:
        collator = PackedPairCollator(0, share_prompt=layout.endswith("shared-prompt"), pad_to_multiple_of=block,
                                      attention_layout="segmented" if layout.startswith("segmented") else "dense")
    out = group_logps(model, collator(groups))
    return out.logps, out.mask


def expected_groups(model, groups: list[dict]) -> torch.Tensor:
    """Each response's unpadded log-prob, 0 past a group's k. Shape: (G, K)."""
    width = max(len(g["responses_input_ids"]) for g in groups)
    return torch.tensor([[unpadded_logps(model, g["prompt_input_ids"], r) for r in g["responses_input_ids"]]
                         + [0.0] * (width - len(g["responses_input_ids"])) for g in groups])


# Every model type takes the mixed batch (2 to 4 responses a group: k = 3 and 4 among them); llama also the batches of
# k = 3 and k = 4 alone.
GROUP_CASES = [(m, w, sizes) for m, w in MODELS for sizes in GROUP_SIZES if sizes == "mixed-k" or m == "llama"]


@pytest.mark.slow
@pytest.mark.parametrize("kernel,layout", KERNEL_LAYOUTS, ids=[f"{k}-{layout}" for k, layout in KERNEL_LAYOUTS])
@pytest.mark.parametrize("model_type,window,sizes", GROUP_CASES,
                         ids=[f"{m}-window{w}-{s}" if w else f"{m}-{s}" for m, w, s in GROUP_CASES])
def test_group_log_probs_equal_an_unpadded_forward(model_type, window, kernel, layout, sizes):
    """The pair matrix above for groups: each response of each group scored as a sequence of its own; the same
    FlexAttention cases skipped, for the same reasons."""
    skip_flex_cases(model_type, window, kernel, layout)
    model = tiny_model(model_type, window, kernel)
    groups = random_groups(GROUP_SIZES[sizes], seed=1)
    if kernel == "flex_attention":
        rows = PackedPairCollator(0, share_prompt=layout.endswith("shared-prompt"), pad_to_multiple_of=FLEX_BLOCK)
        assert rows(groups)["input_ids"].shape[1] == FLEX_BLOCK, "one block wide (GROUP_SIZES says why)"
    logps, mask = scored_groups(model, groups, layout)
    want = expected_groups(tiny_model(model_type, window, "sdpa") if kernel == "flex_attention" else model, groups)
    assert mask.tolist() == [[j < len(g["responses_input_ids"]) for j in range(want.shape[1])] for g in groups]
    torch.testing.assert_close(logps, want, **EXACT)


def test_the_group_matrix_can_fail(monkeypatch):
    """A later response that saw the responses before it (branch ids all CHOSEN, so the mask lets every response see
    the others) is far from the unpadded forward: the group matrix checks the rule, not just the plumbing."""
    from dpo_dist.data.packing import CHOSEN

    model = tiny_model("llama", None, "sdpa")
    groups = random_groups(GROUP_SIZES["k4"], seed=1)
    original = PackedPairCollator.__call__

    def one_branch(self, examples):
        batch = original(self, examples)
        batch["branch_ids"] = batch["branch_ids"].clamp(max=CHOSEN)
        return batch

    monkeypatch.setattr(PackedPairCollator, "__call__", one_branch)
    logps, _ = scored_groups(model, groups, "packed-shared-prompt")
    want = expected_groups(model, groups)
    assert (logps[:, 0] - want[:, 0]).abs().max() < 1e-4  # the first response sees only the prompt either way
    assert (logps[:, 1:] - want[:, 1:]).abs().max() > 1e-2
