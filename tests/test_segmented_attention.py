"""The segmented attention layout: each segment's blocks alone, equal to the dense mask; chosen by a cost model.

Its log-probs against an unpadded forward, for every model type and window, are in tests/test_exactness.py; its
training trajectories under DDP, ZeRO-3 and FSDP2 against one process in test_train, test_deepspeed and test_fsdp.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpo_dist.attention_cost import segmented_pays
from dpo_dist.data.packing import PackedPairCollator
from dpo_dist.model.attention import packed_mask
from dpo_dist.model import segmented_attention
from dpo_dist.model.attention import choose_attention_layout, packed_attention
from dpo_dist.train.logprobs import packed_forward
from test_exactness import MODELS, WINDOW, random_pairs, tiny_model

HEADS, KV_HEADS, DIM = 4, 2, 8


def batch_of(pairs, **collator):
    return PackedPairCollator(0, attention_layout="segmented", **collator)(pairs)


def qkv(rows, width, seed=0):
    """Random q, k, v laid out as transformers' projections leave them: (R, W, H, D) in memory, (R, H, W, D) seen."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, width, heads, DIM, generator=g).transpose(1, 2).requires_grad_()
            for heads in (HEADS, KV_HEADS, KV_HEADS)]


def dense_attention(q, k, v, mask):
    groups = HEADS // KV_HEADS
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1),
                                         attn_mask=mask)
    return out.transpose(1, 2)  # (R, W, H, D)


def edge_pairs() -> list[dict]:
    """Random pairs, one with an empty prompt and one with a one-token response beside an empty one."""
    pairs = random_pairs(5, seed=1)
    pairs[1]["prompt_input_ids"] = []
    pairs[3]["chosen_input_ids"], pairs[3]["rejected_input_ids"] = [7], []
    return pairs


def groups_of(pairs: list[dict], sizes: list[int], seed: int = 0) -> list[dict]:
    """Each pair's prompt with ``k`` responses: its chosen and rejected, then random ones of 1 to 9 tokens."""
    import random

    rng = random.Random(seed)
    return [{"prompt_input_ids": p["prompt_input_ids"],
             "responses_input_ids": [p["chosen_input_ids"], p["rejected_input_ids"]]
             + [[rng.randrange(3, 90) for _ in range(rng.randint(1, 9))] for _ in range(k - 2)]}
            for p, k in zip(pairs, sizes)]


def edge_groups() -> list[dict]:
    """Groups of 2 to 4 responses: an empty prompt, an empty response between two others, a one-token response."""
    groups = groups_of(edge_pairs(), [3, 4, 2, 4, 3], seed=2)
    groups[2]["responses_input_ids"][0] = []
    groups[4]["responses_input_ids"][1] = []
    return groups


@pytest.mark.parametrize("examples", [edge_pairs, edge_groups], ids=["pairs", "groups"])
@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared", "not-shared"])
@pytest.mark.parametrize("window", [None, 1, 5, 1000], ids=["no-window", "window1", "window5", "window-past-rows"])
def test_equals_the_dense_mask_with_padding_and_windows(share_prompt, window, examples):
    """Every position, padding included (rows padded to a multiple of 32: a padding span), an empty prompt and an
    empty response included (in a group: the first, and one between two others), outputs and the gradients of q, k
    and v."""
    batch = batch_of(examples(), share_prompt=share_prompt, pad_to_multiple_of=32)
    spans = tuple(map(tuple, batch["attention_spans"].tolist()))
    assert spans[-1][2] > 0, "the test needs a padding span"
    rows, width = batch["input_ids"].shape
    mask = packed_mask(batch["segment_ids"], batch["branch_ids"], batch["position_ids"], sliding_window=window)
    q, k, v = qkv(rows, width)
    grad = torch.randn(rows, width, HEADS, DIM)
    want = dense_attention(q, k, v, mask)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    got = segmented_attention.segmented_attention(q, k, v, spans, window=window)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    assert got.shape == (rows, width, HEADS, DIM) and got.is_contiguous()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_the_window_changes_the_segmented_answer():
    """So the test above can fail: a window that cuts the blocks gives other outputs than none."""
    batch = batch_of(random_pairs(5, seed=1))
    spans = tuple(map(tuple, batch["attention_spans"].tolist()))
    q, k, v = qkv(*batch["input_ids"].shape)
    windowed = segmented_attention.segmented_attention(q, k, v, spans, window=5)
    full = segmented_attention.segmented_attention(q, k, v, spans)
    assert (windowed - full).abs().max() > 1e-2


def test_spans_that_do_not_cover_the_batch_are_refused():
    batch = batch_of(random_pairs(3))
    spans = tuple(map(tuple, batch["attention_spans"].tolist()))[:-1]
    q, k, v = qkv(*batch["input_ids"].shape)
    with pytest.raises(ValueError, match="attention_spans cover"):
        segmented_attention.segmented_attention(q, k, v, spans)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
@pytest.mark.parametrize("model_type,window", MODELS, ids=[f"{m}-window{w}" if w else m for m, w in MODELS])
def test_model_gradients_equal_the_dense_layout(model_type, window, checkpointing, monkeypatch):
    """Through the model (every parameter's gradient), and with gradient checkpointing, whose backward replays the
    forward with the same spans."""
    model = tiny_model(model_type, window, "sdpa")
    pairs = random_pairs(8, seed=3)
    dropouts = {m: m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    if checkpointing:  # transformers checkpoints in training mode only: dropout off, so the two layouts can agree
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        for module in dropouts:
            module.p = 0.0
    calls = []
    original = segmented_attention.segmented_attention
    monkeypatch.setattr(segmented_attention, "segmented_attention",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    try:
        grads = {}
        for layout in ("dense", "segmented"):
            model.zero_grad()
            with torch.enable_grad():
                out = packed_forward(model, PackedPairCollator(0, attention_layout=layout)(pairs))
                (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
            grads[layout] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
        for module, p in dropouts.items():
            module.p = p
        model.zero_grad(set_to_none=True)
    layers = model.config.num_hidden_layers
    assert len(calls) == layers * (2 if checkpointing else 1)  # the segmented forward ran (and was replayed)
    assert grads["dense"].keys() == grads["segmented"].keys() and len(grads["dense"]) > 5
    for name, want in grads["dense"].items():
        torch.testing.assert_close(grads["segmented"][name], want, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("model_type,window", MODELS, ids=[f"{m}-window{w}" if w else m for m, w in MODELS])
def test_group_model_gradients_equal_the_dense_layout(model_type, window):
    """Groups of 2 to 4 responses through the model: segmented and dense give every parameter the same gradient."""
    from dpo_dist.train.logprobs import group_logps

    model = tiny_model(model_type, window, "sdpa")
    groups = groups_of(random_pairs(6, seed=3), [3, 4, 2, 4, 3, 3], seed=4)
    weights = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    grads = {}
    try:
        for layout in ("dense", "segmented"):
            model.zero_grad()
            with torch.enable_grad():
                out = group_logps(model, PackedPairCollator(0, attention_layout=layout)(groups))
                (out.logps * weights).sum().backward()
            grads[layout] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        model.zero_grad(set_to_none=True)
    assert grads["dense"].keys() == grads["segmented"].keys() and len(grads["dense"]) > 5
    for name, want in grads["dense"].items():
        torch.testing.assert_close(grads["segmented"][name], want, atol=1e-5, rtol=1e-4, msg=name)


def test_group_spans_have_a_column_per_response_of_the_largest_group():
    """``row, start, padding, prompt, response_0..K-1``: zero past a segment's own responses; a piece per first block
    and per later response with tokens."""
    groups = groups_of(random_pairs(4, seed=6), [2, 4, 3, 2])
    batch = batch_of(groups, pad_to_multiple_of=64)
    spans = batch["attention_spans"].tolist()
    assert all(len(span) == 4 + 4 for span in spans)
    for span, group in zip(spans, groups):
        lengths = [len(r) for r in group["responses_input_ids"]]
        assert span[2:] == [0, len(group["prompt_input_ids"]), *lengths, *[0] * (4 - len(lengths))]
    assert spans[-1][2] > 0 and spans[-1][3:] == [0] * 5  # the row's padding
    sizes = segmented_attention.span_sizes(spans)
    assert sum(sizes) == batch["input_ids"].numel()
    assert len(sizes) == sum(len(g["responses_input_ids"]) for g in groups) + 1  # a call per response, one for padding


def test_calls_without_spans_run_transformers_sdpa_unchanged():
    """Installed, the registered sdpa function hands every call without spans to transformers' own, unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    segmented_attention.install()
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is segmented_attention._sdpa_or_segmented
    model = tiny_model("qwen2", WINDOW, "sdpa")
    layer = model.model.layers[1].self_attn
    q, k, v = qkv(1, 10)
    mask = torch.ones(1, 1, 10, 10, dtype=torch.bool).tril()
    kwargs = dict(dropout=0.0, scaling=0.3, sliding_window=WINDOW)
    got = ALL_ATTENTION_FUNCTIONS["sdpa"](layer, q, k, v, mask, **kwargs)[0]
    assert torch.equal(got, sdpa_attention_forward(layer, q, k, v, mask, **kwargs)[0])


def test_a_layer_the_spans_do_not_reach_raises_instead_of_passing_for_exact(monkeypatch):
    """The mask passed with the spans is a stand-in that masks every key (SDPA would return zeros, not an error):
    a layer that gets it without the spans raises, and a forward in which fewer layers ran segmented than the model
    has raises at the end."""
    model = tiny_model("llama", None, "sdpa")
    batch = batch_of(random_pairs(3))
    kwargs, _ = packed_attention(model, batch)
    mask = kwargs["attention_mask"]
    assert mask.shape == (1, 1, *batch["input_ids"].shape[1:] * 2) and not mask.any()
    assert mask.untyped_storage().nbytes() == 1  # an expanded view: no W x W memory
    qwen, _ = packed_attention(tiny_model("qwen2", WINDOW, "sdpa"), batch)
    assert set(qwen["attention_mask"]) == {"full_attention", "sliding_attention"}
    eager, check = packed_attention(tiny_model("llama", None, "eager"), batch)
    assert segmented_attention.SPANS_KWARG not in eager and eager["attention_mask"].dtype == torch.float32
    # a model that drops the kwarg on the way to its attention layers
    forward = type(model.model.layers[0].self_attn).forward

    def dropping_spans(self, *args, **kw):
        kw.pop(segmented_attention.SPANS_KWARG, None)
        return forward(self, *args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(type(model.model.layers[0].self_attn), "forward", dropping_spans)
        with pytest.raises(RuntimeError, match="without its spans"), torch.no_grad():
            packed_forward(model, batch)
    # a layer whose attention function is not the registered one never counts
    with pytest.raises(RuntimeError, match="ran in 1 of the model's 2 attention layers"):
        with segmented_attention.expect_every_layer(2):
            segmented_attention._CALLS[0] += 1


def test_what_segmented_attention_does_not_apply_is_refused():
    q, k, v = qkv(1, 4)
    spans = ((0, 0, 0, 2, 1, 1),)
    module = tiny_model("llama", None, "sdpa").model.layers[0].self_attn
    for extra, named in (({"softcap": 30.0}, "softcap"), ({"is_causal": False}, "is_causal=False")):
        with pytest.raises(ValueError, match=f"does not apply {named}"):
            segmented_attention._sdpa_or_segmented(module, q, k, v, None, **{segmented_attention.SPANS_KWARG: spans},
                                                   **extra)


def test_dropout_is_applied_to_each_block():
    batch = batch_of(random_pairs(4, seed=5))
    spans = tuple(map(tuple, batch["attention_spans"].tolist()))
    q, k, v = qkv(*batch["input_ids"].shape)
    torch.manual_seed(0)
    dropped = segmented_attention.segmented_attention(q, k, v, spans, dropout=0.5)
    plain = segmented_attention.segmented_attention(q, k, v, spans)
    assert (dropped - plain).abs().max() > 1e-2
    dropped.sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_segmented_layout_is_one_row_without_padding():
    pairs = random_pairs(8, seed=3)
    dense = PackedPairCollator(0, attention_layout="dense")(pairs)
    segmented = batch_of(pairs)
    tokens = sum(len(p["prompt_input_ids"]) + len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in pairs)
    assert segmented["input_ids"].shape == (1, tokens)
    assert dense["input_ids"].shape[0] > 1 and "attention_spans" not in dense
    spans = segmented["attention_spans"].tolist()
    # row, start, padding, prompt, chosen, rejected: each segment starts where the one before it ends
    assert [s[1] for s in spans] == [sum(sum(x[2:]) for x in spans[:i]) for i in range(len(spans))]
    assert [tuple(s[2:]) for s in spans] == [(0, len(p["prompt_input_ids"]), len(p["chosen_input_ids"]),
                                              len(p["rejected_input_ids"])) for p in pairs]


def test_cost_model_picks_dense_for_short_segments_and_segmented_for_long_ones():
    # measured on this CPU (benchmarks/attention_layout.py): 4 pairs of 30/20 tokens are faster dense, pairs of
    # 256/128 tokens about 1.7x faster segmented
    short = [(30, 20, 20)] * 4
    long = [(256, 128, 128)] * 4
    assert not segmented_pays(short, rows=2, width=140)
    assert segmented_pays(long, rows=2, width=1024)
    # a call costs something: with enough tiny segments dense wins even where segments cut the pairs in half
    assert segmented_pays([(8, 4, 4)] * 4, rows=1, width=64, call_cost=0)
    assert not segmented_pays([(8, 4, 4)] * 4, rows=1, width=64)
    # groups: each later response is a call and a block against the prompt; a response of 0 tokens is neither
    assert segmented_pays([(8, 4, 4, 0, 0)] * 4, rows=1, width=64, call_cost=0)
    for parts, rows, width in (([(30, 20, 20)] * 4, 2, 140), ([(256, 128, 128)] * 4, 2, 1024),
                               ([(100, 60, 60)] * 4, 1, 880), ([(100, 60, 60)] * 4, 2, 440)):
        assert segmented_pays(parts, rows, width) == segmented_pays([(*p, 0) for p in parts], rows, width)
    assert segmented_pays([(256, 128, 128, 128, 128)] * 4, rows=2, width=1536)
    assert not segmented_pays([(30, 20, 20, 20)] * 4, rows=2, width=180)
    make = lambda p, r: {"prompt_input_ids": [5] * p, "chosen_input_ids": [6] * r, "rejected_input_ids": [7] * r}
    auto = PackedPairCollator(0, attention_layout="auto")
    assert "attention_spans" not in auto([make(30, 20)] * 4)
    assert "attention_spans" in auto([make(256, 128)] * 4)
    group = lambda p, r, k: {"prompt_input_ids": [5] * p, "responses_input_ids": [[6 + j] * r for j in range(k)]}
    assert "attention_spans" not in auto([group(30, 20, 3)] * 4)
    assert "attention_spans" in auto([group(256, 128, 4)] * 4)


def test_choose_attention_layout():
    sdpa, eager = tiny_model("llama", None, "sdpa"), tiny_model("llama", None, "eager")
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_attention_layout("auto", sdpa, cpu, packed=True)[0] == "auto"
    layout, said = choose_attention_layout("auto", sdpa, cuda, packed=True)
    assert layout == "dense" and "measured on CPU" in said
    assert choose_attention_layout("segmented", sdpa, cuda, packed=True)[0] == "segmented"
    assert choose_attention_layout("dense", sdpa, cpu, packed=True)[0] == "dense"
    assert choose_attention_layout("auto", eager, cpu, packed=True) == ("dense", None)
    assert choose_attention_layout("auto", sdpa, cpu, packed=False) == ("dense", None)
    with pytest.raises(ValueError, match="runs with sdpa attention, not 'eager'"):
        choose_attention_layout("segmented", eager, cpu, packed=True)
    with pytest.raises(ValueError, match="packing is off"):
        choose_attention_layout("segmented", sdpa, cpu, packed=False)
    with pytest.raises(ValueError, match="attention_layout must be one of"):
        PackedPairCollator(0, attention_layout="sparse")


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_training_segmented_equals_dense(lora, tiny_model_dir, data_file, tmp_path, capsys):
    """One process, the trainer end to end (reference precompute, steps, eval): the same trajectory either way."""
    from training import STEPS, assert_same_trajectory, reset_accelerate_state, run

    runs = {}
    for layout in ("dense", "segmented"):
        extra = {**STEPS, "lora.enabled": lora, "train.attention_layout": layout}
        runs[layout] = run(tiny_model_dir, data_file, tmp_path / layout, **extra)["records"]
        reset_accelerate_state()
    out = capsys.readouterr().out
    assert "attention: dense (a mask over each packed row" in out and "attention: segmented (" in out
    assert_same_trajectory(runs["dense"], runs["segmented"], atol=1e-5)
    evals = [[r["eval/loss"] for r in runs[layout] if "eval/loss" in r] for layout in ("dense", "segmented")]
    assert evals[0] and evals[0] == pytest.approx(evals[1], abs=1e-5)


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 6e-3), (torch.float16, 1e-3)], ids=["bf16", "fp16"])
def test_under_autocast_segmented_is_as_close_to_fp32_as_dense(dtype, atol):
    """Mixed precision (model.dtype bf16/fp16 trains under autocast): both layouts round alike. Measured on these
    pairs (log-probs about -40): dense 1.9e-3 (bf16) and 2.8e-4 (fp16) from fp32, segmented 8e-4 and 1.9e-4 from
    dense; bounded at about 3x the dense layout's own rounding."""
    model = tiny_model("qwen2", WINDOW, "sdpa")
    pairs = random_pairs(8, seed=3)
    with torch.no_grad():
        fp32 = packed_forward(model, PackedPairCollator(0, attention_layout="dense")(pairs))
        out = {}
        for layout in ("dense", "segmented"):
            with torch.autocast("cpu", dtype=dtype):
                out[layout] = packed_forward(model, PackedPairCollator(0, attention_layout=layout)(pairs))
    for layout, scored in out.items():
        for side in ("chosen_logps", "rejected_logps"):
            torch.testing.assert_close(getattr(scored, side), getattr(fp32, side), atol=atol, rtol=0, msg=layout)
    assert not torch.equal(out["segmented"].chosen_logps, fp32.chosen_logps), "autocast must have run"
