"""Ship a trained model: merge a LoRA adapter into its full-precision base, and push a folder to the Hub.

    merge_adapter("outputs/default", "outputs/default/merged")                  # bf16 model + tokenizer
    push_to_hub("outputs/default/merged", "my-name/smollm2-dpo-sentiment")      # needs the network and a token

The base is loaded in full precision even when the adapter was trained on a 4-bit base (QLoRA): merging into
de-quantized 4-bit weights would bake their rounding error into every weight. The adapter's low-rank update was
learned against the quantized base, so the merged model matches the adapter on the full-precision base, and the
4-bit-trained model within quantization tolerance. The merge is done in fp32 and the result is then cast to the
16-bit ``dtype`` it is saved in (``float32`` keeps it exact).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch

from dpo_dist.model.load import DTYPES
from dpo_dist.model.trained import load_trained, model_folder


def merge_adapter(run: str, out: str, *, base: str | None = None, dtype: str = "bfloat16") -> Any:
    """Merge the adapter of ``run`` (a run's output folder or an adapter folder) into its base and save model and
    tokenizer to ``out`` in ``dtype`` (written to ``out.tmp`` and renamed when complete). Returns the merged model."""
    trained = load_trained(run, device=torch.device("cpu"), base=base, dtype="float32", quantization="none")
    if not trained.is_adapter:
        raise ValueError(f"{trained.folder} is a full model, not a LoRA adapter: there is nothing to merge")
    merged = trained.model.merge_and_unload().to(DTYPES[dtype])
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    trained.tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return merged


def push_to_hub(folder: str, repo_id: str, *, private: bool = False, token: str | None = None, api: Any = None) -> str:
    """Upload a model or adapter folder (with its tokenizer) to the Hub repository ``repo_id``, creating it if needed.
    Returns the repository's URL. ``api`` is a ``huggingface_hub.HfApi`` (made from ``token`` if not given)."""
    folder = model_folder(folder)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    kind = "LoRA adapter" if os.path.isfile(os.path.join(folder, "adapter_config.json")) else "model"
    api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message=f"Upload DPO-trained {kind} (dpo-dist)")
    return str(url)
