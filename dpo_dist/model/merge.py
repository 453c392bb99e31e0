"""A LoRA adapter merged into its full-precision base: one ordinary model, in the base's dtype by default.

    merged, trained = merged_model("outputs/default")          # dpo_dist.publish.export.merge_adapter saves it, + card

The base is loaded in full precision even when the adapter was trained on a 4-bit base (QLoRA): merging into
de-quantized 4-bit weights would bake their rounding error into every weight. The adapter's low-rank update was
learned against the quantized base, so the merged model matches the adapter on the full-precision base, and the
4-bit-trained model within quantization tolerance. The merge is done in fp32 and the result is then cast to
``dtype``: by default the base's own (its config's ``dtype``, else that of its weights), since rounding to a
narrower one can undo a short fine-tune (on SmolLM2-135M, bf16 rounding moved logits by up to 1.34, more than the
short fine-tune itself had moved them, 0.98). The merged config keeps the base's ``use_cache`` and dropout settings,
which loading for training turns off.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from dpo_dist.model.load import RESTORED_CONFIG
from dpo_dist.model.trained import Trained
from dpo_dist.progress import step_done

logger = logging.getLogger(__name__)
SAVED_DTYPES = ("bfloat16", "float16", "float32")


def base_dtype(config: dict[str, Any], source: str) -> tuple[str, str]:
    """The dtype a merge saves in by default and where it came from: the base's ``config`` ``dtype`` (or
    ``torch_dtype``), else the dtype of its safetensors weights (``source`` a local folder), else float32 (exact)."""
    named = config.get("dtype") or config.get("torch_dtype")
    if isinstance(named, str) and named.removeprefix("torch.") in SAVED_DTYPES:
        return named.removeprefix("torch."), "the base's dtype, from its config"
    stored = weights_dtype(source)
    if stored:
        return stored, "the base's dtype, from its weights"
    return "float32", f"the base's dtype is not known ({named or 'its config names none'}): float32, exact"


def weights_dtype(folder: str) -> str | None:
    """The dtype of the first floating-point tensor of a local folder's safetensors, if one of SAVED_DTYPES."""
    if not os.path.isdir(folder):
        return None
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with open(os.path.join(folder, name), "rb") as handle:
                header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
            for key, entry in header.items():
                if key != "__metadata__" and entry["dtype"] in names:
                    return names[entry["dtype"]]
    return None


def merged_model(run: str, *, base: str | None = None, dtype: str | None = None,
                 progress: Any = None) -> tuple[Any, Trained]:
    """The adapter of ``run`` (a run's output folder or an adapter folder) merged into its base, in ``dtype``
    (default: the base's; logged), its config with the base's ``use_cache`` and dropout; and the run's model as
    loaded (its tokenizer, folder). A full model is a ValueError: there is nothing to merge. ``progress``: a bar
    (:mod:`dpo_dist.progress`) told of two steps, the loading and the merging."""
    import torch
    from transformers import AutoConfig

    from dpo_dist.model.load import DTYPES
    from dpo_dist.model.trained import load_trained

    trained = load_trained(run, device=torch.device("cpu"), base=base, dtype="float32", quantization="none")
    if not trained.is_adapter:
        raise ValueError(f"{trained.folder} is a full model, not a LoRA adapter: there is nothing to merge")
    step_done(progress, "base and adapter loaded")
    base_config = AutoConfig.from_pretrained(trained.base_source, revision=trained.cfg.model.revision,
                                             trust_remote_code=trained.cfg.model.trust_remote_code).to_dict()
    said = "as asked"
    if dtype is None:
        dtype, said = base_dtype(base_config, trained.base_source)
    logger.info("merged weights saved in %s (%s)", dtype, said)
    merged = trained.model.merge_and_unload().to(DTYPES[dtype])
    for key in RESTORED_CONFIG:
        if key in base_config:
            setattr(merged.config, key, base_config[key])
    step_done(progress, f"merged in fp32, cast to {dtype}")
    return merged, trained
