"""The segmented attention layout: each segment's blocks alone, equal to the dense mask; chosen by a cost model.

Its log-probs against an unpadded forward, for every model type and window, are in tests/test_exactness.py; its
training trajectories under DDP, ZeRO-3 and FSDP2 against one process in test_train, test_deepspeed and test_fsdp.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dpo_dist.data.packing import PackedPairCollator, packed_mask, segmented_pays
from dpo_dist.model import segmented_attention
from dpo_dist.model.attention import choose_attention_layout, packed_attention_kwargs
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


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared", "not-shared"])
@pytest.mark.parametrize("window", [None, 5, 1000], ids=["no-window", "window5", "window-longer-than-rows"])
def test_equals_the_dense_mask_with_padding_and_windows(share_prompt, window):
    """Every position, padding included (rows padded to a multiple of 32: a padding span), outputs and the gradients
    of q, k and v."""
    batch = batch_of(random_pairs(5, seed=1), share_prompt=share_prompt, pad_to_multiple_of=32)
    spans = tuple(map(tuple, batch["attention_spans"].tolist()))
    assert spans[-1][5] > 0, "the test needs a padding span"
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
def test_model_gradients_equal_the_dense_layout(model_type, window, checkpointing):
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
    try:
        segmented_attention.segmented_attention = lambda *a, **k: calls.append(1) or original(*a, **k)
        grads = {}
        for layout in ("dense", "segmented"):
            model.zero_grad()
            with torch.enable_grad():
                out = packed_forward(model, PackedPairCollator(0, attention_layout=layout)(pairs))
                (out.chosen_logps.sum() - 0.5 * out.rejected_logps.sum()).backward()
            grads[layout] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    finally:
        segmented_attention.segmented_attention = original
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


def test_calls_without_spans_run_transformers_sdpa_unchanged():
    model = tiny_model("qwen2", WINDOW, "sdpa")
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        segmented_attention.install()
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is segmented_attention._sdpa_or_segmented


def test_a_layer_that_ignored_the_spans_could_not_pass_for_exact():
    """The mask passed alongside the spans masks every key: sdpa given it alone returns no attention at all."""
    model = tiny_model("llama", None, "sdpa")
    batch = batch_of(random_pairs(3))
    kwargs = packed_attention_kwargs(model, batch)
    mask = kwargs["attention_mask"]
    assert mask.shape == (1, 1, *batch["input_ids"].shape[1:] * 2) and not mask.any()
    assert mask.untyped_storage().nbytes() == 1  # an expanded view: no W x W memory
    assert segmented_attention.SPANS_KWARG in kwargs
    qwen = packed_attention_kwargs(tiny_model("qwen2", WINDOW, "sdpa"), batch)["attention_mask"]
    assert set(qwen) == {"full_attention", "sliding_attention"}
    eager = packed_attention_kwargs(tiny_model("llama", None, "eager"), batch)
    assert segmented_attention.SPANS_KWARG not in eager and eager["attention_mask"].dtype == torch.float32


def test_segmented_layout_is_one_row_without_padding():
    pairs = random_pairs(8, seed=3)
    dense = PackedPairCollator(0, attention_layout="dense")(pairs)
    segmented = batch_of(pairs)
    tokens = sum(len(p["prompt_input_ids"]) + len(p["chosen_input_ids"]) + len(p["rejected_input_ids"]) for p in pairs)
    assert segmented["input_ids"].shape == (1, tokens)
    assert dense["input_ids"].shape[0] > 1 and "attention_spans" not in dense
    spans = segmented["attention_spans"].tolist()
    assert [s[1] for s in spans] == [sum(x[2] + x[3] + x[4] for x in spans[:i]) for i in range(len(spans))]
    assert [(s[2], s[3], s[4]) for s in spans] == [(len(p["prompt_input_ids"]), len(p["chosen_input_ids"]),
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
    make = lambda p, r: {"prompt_input_ids": [5] * p, "chosen_input_ids": [6] * r, "rejected_input_ids": [7] * r}
    auto = PackedPairCollator(0, attention_layout="auto")
    assert "attention_spans" not in auto([make(30, 20)] * 4)
    assert "attention_spans" in auto([make(256, 128)] * 4)


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
