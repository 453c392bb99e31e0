"""Export a LoRA adapter merged into its full-precision base: one ordinary HF folder to serve or share.

    merge_adapter("HuggingFaceTB/SmolLM2-135M-Instruct", "outputs/default/model", "outputs/default/merged")

The base is loaded in full precision even when the adapter was trained on a 4-bit base (QLoRA): merging into
de-quantized 4-bit weights would bake their rounding error into every weight. The adapter's low-rank update was
learned against the quantized base, so the merged model matches the adapter on the full-precision base exactly, and
the 4-bit-trained model within quantization tolerance.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from dpo_dist.modeling import DTYPES, resolve_source


def merge_adapter(base: str, adapter: str, out: str, *, dtype: str = "float32") -> Any:
    """Load ``base`` in ``dtype``, apply the adapter folder, merge, and save model + tokenizer to ``out`` (atomic)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(resolve_source(base), dtype=DTYPES[dtype])
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(adapter if os.path.isfile(os.path.join(adapter, "tokenizer_config.json"))
                                              else resolve_source(base))
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return merged
