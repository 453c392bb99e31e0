"""The attention mask a packed batch needs (:func:`packed_mask`, the rule), in the form this model's attention kernel
and layer types take.

A 4D mask passed to a transformers model skips the model's own mask building, sliding windows included, so the
mask must carry everything the model would have applied:

- **Kernel.** ``sdpa`` takes a boolean mask (True: attend). ``eager`` *adds* the mask to the attention scores, so it
  needs an additive float mask (0 to attend, the dtype's minimum to mask); a boolean one would add 0/1 and mask
  nothing. ``flex_attention`` takes a ``BlockMask`` built from the same rule as a ``mask_mod`` (rows padded to whole
  blocks), and skips the blocks no query sees. Flash attention takes no mask of ours: packing is refused for it.
- **Layer types.** Mistral applies ``sliding_window`` in every layer (one mask). Qwen2/Qwen3 name each layer's type
  in ``config.layer_types`` (``full_attention``, ``sliding_attention``) and take a dict with a mask per type. Llama and
  GPT-2 have full attention only. The window counts position ids (:func:`packed_mask`).

Packing runs only on the model types listed here, each tested against an unpadded forward with and without a
sliding window (tests/test_exactness.py).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from dpo_dist.data.packing import PROMPT
from dpo_dist.model import segmented_attention

PACKING_KERNELS = ("sdpa", "eager", "flex_attention")
FLEX_BLOCK = 128  # FlexAttention's block size: packed rows are padded to a multiple of it
ONE_MASK = ("llama", "mistral", "gpt2")  # one mask for every layer (Mistral's carries its sliding window)
MASK_PER_LAYER_TYPE = ("qwen2", "qwen3")  # a dict {layer type: mask}
PACKING_MODEL_TYPES = ONE_MASK + MASK_PER_LAYER_TYPE
LAYER_TYPES = ("full_attention", "sliding_attention")


def packed_mask(segment_ids: torch.Tensor, branch_ids: torch.Tensor, position_ids: torch.Tensor, *,
                sliding_window: int | None = None) -> torch.Tensor:
    """Which keys each query may attend to in packed rows: the same segment, at or before the query in the row,
    in the prompt or in the query's own response, and (with a window) fewer than ``sliding_window`` positions back,
    as transformers' ``sliding_window_overlay`` counts (``q - k < window``).

    Padding tokens form one segment of their own, so each attends at least to itself (no all-masked row, no NaN).

    Shape: segment_ids, branch_ids, position_ids (R, W) -> (R, 1, W, W) bool.
    """
    width = segment_ids.shape[1]
    index = torch.arange(width, device=segment_ids.device)
    causal = index[:, None] >= index[None, :]  # (W, W): key at or before the query in the row
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    key_branch = branch_ids[:, None, :]
    visible_branch = (key_branch == PROMPT) | (key_branch == branch_ids[:, :, None])
    mask = same_segment & visible_branch & causal
    if sliding_window is not None:
        mask &= (position_ids[:, :, None] - position_ids[:, None, :]) < sliding_window
    return mask[:, None]


def packed_mask_mod(segment_ids: torch.Tensor, branch_ids: torch.Tensor, position_ids: torch.Tensor, *,
                    sliding_window: int | None = None):
    """:func:`packed_mask` as a FlexAttention ``mask_mod(batch, head, query, key) -> bool``, the same rule."""

    def mask_mod(b, h, q, k):
        visible = (segment_ids[b, q] == segment_ids[b, k]) & (k <= q)
        visible = visible & ((branch_ids[b, k] == PROMPT) | (branch_ids[b, k] == branch_ids[b, q]))
        if sliding_window is not None:
            visible = visible & (position_ids[b, q] - position_ids[b, k] < sliding_window)
        return visible

    return mask_mod


def base_model(model: Any) -> Any:
    """The transformers model under DDP (``.module``) and PEFT wrappers."""
    base = getattr(model, "module", model)
    return base.get_base_model() if hasattr(base, "get_base_model") else base


def layer_windows(config: Any) -> dict[str, int | None]:
    """The sliding window of each layer type the model has (None: full attention)."""
    if config.model_type == "mistral":
        return {"full_attention": getattr(config, "sliding_window", None)}
    if config.model_type in MASK_PER_LAYER_TYPE:
        types = getattr(config, "layer_types", None) or ["full_attention"]
        return {t: (config.sliding_window if t == "sliding_attention" else None) for t in dict.fromkeys(types)}
    return {"full_attention": None}


def packing_unsupported(model: Any) -> str | None:
    """Why packing cannot run with this model and setup, or None when it can. Any ZeRO stage can: under ZeRO-3 the
    packed scoring runs the partitioned LM head inside the forward (``logprobs.packed_forward``)."""
    base = base_model(model)
    config = base.config
    if config.model_type not in PACKING_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one packing is verified on ({', '.join(PACKING_MODEL_TYPES)})"
    attention = getattr(config, "_attn_implementation", None)
    if attention not in PACKING_KERNELS:
        return (f"attention {attention!r} takes no 4D attention mask of ours (packing runs with "
                f"{' or '.join(PACKING_KERNELS)}; model.attn_implementation=sdpa, or train.packing=off)")
    unknown = set(getattr(config, "layer_types", None) or ()) - set(LAYER_TYPES)
    if unknown:
        return f"layer types {sorted(unknown)} have masks packing does not build (it builds {', '.join(LAYER_TYPES)})"
    if not isinstance(base.get_output_embeddings(), torch.nn.Linear):
        return "the LM head is not a plain Linear layer"
    return None


def choose_packing(setting: str, model: Any, *, share_prompt: bool = True) -> tuple[bool, str]:
    """``train.packing`` resolved for this model: (on, the line that says so and why). ``on`` where unsupported is an
    error."""
    if setting == "off":
        return False, "packing: off (train.packing=off)"
    reason = packing_unsupported(model)
    if reason and setting == "on":
        raise ValueError(f"train.packing=on, but {reason}; use train.packing=auto or off")
    if reason:
        return False, f"packing: off ({reason})"
    if share_prompt:
        return True, "packing: on (each pair as prompt|chosen|rejected with the prompt computed once, packed into rows)"
    return True, "packing: on (prompt|chosen and prompt|rejected segments packed into rows; train.share_prompt=false)"


def choose_attention_layout(setting: str, model: Any, device: torch.device, *, packed: bool) -> tuple[str, str | None]:
    """``train.attention_layout`` resolved for this model and device: (what ``PackedPairCollator`` takes, the line that
    says so, or None with nothing to say). ``segmented`` where it cannot run is an error."""
    if not packed:
        if setting == "segmented":
            raise ValueError("train.attention_layout=segmented lays out packed rows, and packing is off; "
                             "use train.attention_layout=auto")
        return "dense", None
    kernel = base_model(model).config._attn_implementation
    if kernel != "sdpa":
        if setting == "segmented":
            raise ValueError(f"train.attention_layout=segmented runs with sdpa attention, not {kernel!r} "
                             f"(model.attn_implementation=sdpa, or train.attention_layout=auto)")
        return "dense", None
    if setting == "dense":
        return "dense", "attention: dense (a mask over each packed row; train.attention_layout=dense)"
    if setting == "segmented":
        return "segmented", ("attention: segmented (each segment's blocks computed alone; "
                             "train.attention_layout=segmented)")
    if device.type != "cpu":
        return "dense", (f"attention: dense (the segmented layout's cost model is measured on CPU, this is "
                         f"{device.type})")
    return "auto", "attention: segmented or dense per batch, whichever the cost model finds cheaper"


def for_kernel(mask: torch.Tensor, kernel: str, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask (True: attend) as ``kernel`` takes it: as is for sdpa, additive (0 / dtype min) for eager."""
    if kernel == "sdpa":
        return mask
    if kernel == "eager":
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    raise ValueError(f"attention {kernel!r} takes no 4D mask of ours; packing runs with {' or '.join(PACKING_KERNELS)}")


def packed_attention_mask(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    """The ``attention_mask`` argument for a packed batch (``PackedPairCollator``): one mask, or a dict by layer type.

    Shape: each mask (R, 1, W, W), bool (sdpa) or the embedding dtype (eager); a ``BlockMask`` for flex_attention.
    """
    base = base_model(model)
    config = base.config
    kernel = config._attn_implementation
    dtype = base.get_input_embeddings().weight.dtype
    dtype = dtype if dtype.is_floating_point else torch.float32
    if kernel == "flex_attention":
        masks = {layer_type: block_mask(batch, window) for layer_type, window in layer_windows(config).items()}
    else:
        masks = {
            layer_type: for_kernel(packed_mask(batch["segment_ids"], batch["branch_ids"], batch["position_ids"],
                                               sliding_window=window), kernel, dtype)
            for layer_type, window in layer_windows(config).items()
        }
    if config.model_type in MASK_PER_LAYER_TYPE:
        return masks
    (mask,) = masks.values()
    return mask


def packed_attention(model: Any, batch: dict[str, torch.Tensor]) -> tuple[dict[str, Any], Any]:
    """The attention arguments of a packed batch's forward, and a context to run the forward in.

    Dense: the mask (:func:`packed_attention_mask`), and no check. Where the batch carries ``attention_spans`` and
    the kernel is sdpa: the spans, which have each segment computed alone (``dpo_dist.model.segmented_attention``,
    registered here as transformers' sdpa function on first use), and a check that every layer did so. The model
    still takes an ``attention_mask`` then: a 4D one is passed through to the attention function untouched, so it
    gets :func:`unused_mask`, no memory, which a layer without the spans refuses. Other kernels ignore the spans
    and get the mask."""
    spans = batch.get("attention_spans")
    base = base_model(model)
    if spans is None or base.config._attn_implementation != "sdpa":
        return {"attention_mask": packed_attention_mask(model, batch)}, contextlib.nullcontext()
    segmented_attention.install()
    mask = unused_mask(*batch["input_ids"].shape, device=batch["input_ids"].device)
    if base.config.model_type in MASK_PER_LAYER_TYPE:
        mask = {layer_type: mask for layer_type in layer_windows(base.config)}
    kwargs = {"attention_mask": mask, segmented_attention.SPANS_KWARG: tuple(map(tuple, spans.tolist()))}
    return kwargs, segmented_attention.expect_every_layer(base.config.num_hidden_layers)


def unused_mask(rows: int, width: int, device: torch.device) -> torch.Tensor:
    """A (rows, 1, width, width) boolean mask that masks everything, one element in memory (an expanded view)."""
    return torch.zeros((), dtype=torch.bool, device=device).expand(rows, 1, width, width)


def block_mask(batch: dict[str, torch.Tensor], window: int | None) -> Any:
    """A FlexAttention ``BlockMask`` for a packed batch whose rows are whole blocks (``FLEX_BLOCK``)."""
    from torch.nn.attention.flex_attention import create_block_mask

    segment_ids = batch["segment_ids"]
    rows, width = segment_ids.shape
    if width % FLEX_BLOCK:
        raise ValueError(f"FlexAttention rows must be a multiple of {FLEX_BLOCK} positions, got {width}: build the "
                         f"collator with pad_to_multiple_of={FLEX_BLOCK}")
    mod = packed_mask_mod(segment_ids, batch["branch_ids"], batch["position_ids"], sliding_window=window)
    return create_block_mask(mod, B=rows, H=None, Q_LEN=width, KV_LEN=width, device=segment_ids.device)


def flex_training_unsupported(kernel: str | None, device: torch.device) -> str | None:
    """Why this kernel cannot train on this device, or None. torch 2.13's FlexAttention has no backward on CPU."""
    if kernel == "flex_attention" and device.type == "cpu":
        return ("model.attn_implementation=flex_attention cannot train on CPU: torch's FlexAttention has no backward "
                "there (NotImplementedError: FlexAttention does not support backward on CPU); use "
                "model.attn_implementation=sdpa on CPU (flex is exact in no-grad passes there, and trains on GPUs)")
    return None

