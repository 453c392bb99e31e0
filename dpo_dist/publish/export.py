"""Ship a trained model: merge a LoRA adapter into its full-precision base, export a checkpoint's weights as a model
folder, and push a folder to the Hub; each folder written here gets its model card.

    merge_adapter("outputs/default", "outputs/default/merged")                  # in the base's dtype, + tokenizer, card
    export_checkpoint("outputs/default/checkpoint-200")                         # -> its model/, + tokenizer, card
    push_to_hub("outputs/default/merged", "my-name/smollm2-dpo-sentiment")      # needs the network and a token

The base is loaded in full precision even when the adapter was trained on a 4-bit base (QLoRA): merging into
de-quantized 4-bit weights would bake their rounding error into every weight. The adapter's low-rank update was
learned against the quantized base, so the merged model matches the adapter on the full-precision base, and the
4-bit-trained model within quantization tolerance. The merge is done in fp32 and the result is then cast to
``dtype``: by default the base's own (its config's ``dtype``, else that of its weights), since rounding to a
narrower one can undo a short fine-tune (on SmolLM2-135M, bf16 rounding moved logits by up to 1.34, more than the
short fine-tune itself had moved them, 0.98). The merged config keeps the base's ``use_cache`` and dropout settings, which loading for
training turns off.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

from dpo_dist.model.load import MODEL_FILES, RESTORED_CONFIG
from dpo_dist.publish.card import CARD, find_run, replaceable_card, write_card
from dpo_dist.train.final import save_checkpoint_model

logger = logging.getLogger(__name__)
SAVED_DTYPES = ("bfloat16", "float16", "float32")


class HubLoginError(RuntimeError):
    """No Hugging Face token: the message says how to log in."""


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


def merge_adapter(run: str, out: str, *, base: str | None = None, dtype: str | None = None) -> Any:
    """Merge the adapter of ``run`` (a run's output folder or an adapter folder) into its base and save model,
    tokenizer and model card to ``out`` in ``dtype`` (default: the base's; logged) (written to ``out.tmp`` and renamed
    when complete). Returns the merged model."""
    import torch
    from transformers import AutoConfig

    from dpo_dist.model.load import DTYPES
    from dpo_dist.model.trained import load_trained

    trained = load_trained(run, device=torch.device("cpu"), base=base, dtype="float32", quantization="none")
    if not trained.is_adapter:
        raise ValueError(f"{trained.folder} is a full model, not a LoRA adapter: there is nothing to merge")
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
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    trained.tokenizer.save_pretrained(tmp)
    run_folder = find_run(trained.folder)
    write_card(tmp, run=run_folder, model_id=out, kind="merged")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return merged


def export_checkpoint(path: str) -> str:
    """The weights of the checkpoint ``path`` as a model folder, ``<path>/model``: what the run's ``model/`` would
    hold had training stopped there (:func:`~dpo_dist.train.final.save_checkpoint_model`: the LoRA adapter, or the full
    model with the base's ``use_cache`` and dropout, and the tokenizer), and a card that says which step and shows the
    metrics up to it. Written once, atomically (an existing ``<path>/model`` is returned as it is). A checkpoint that
    holds no loadable weights (an FSDP or DeepSpeed run's shards) or does not fit its run's config is a
    :class:`~dpo_dist.train.checkpoint.CheckpointError`, raised before anything is written."""
    out = os.path.join(path, "model")
    if any(os.path.isfile(os.path.join(out, name)) for name in MODEL_FILES):
        return out
    tmp = out + ".tmp"
    save_checkpoint_model(path, tmp)
    write_card(tmp, run=os.path.dirname(os.path.abspath(path)), model_id=out)
    os.replace(tmp, out)
    return out


def hub_token(token: str | None = None) -> str:
    """``token``, or the one ``hf auth login`` saved or HF_TOKEN holds; a :class:`HubLoginError` if none."""
    import huggingface_hub

    token = token or huggingface_hub.get_token()
    if not token:
        raise HubLoginError("no Hugging Face token: log in with `hf auth login` (or `huggingface-cli login`), or set "
                            "HF_TOKEN to a token with write access")
    return token


def push_to_hub(folder: str, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, token: str | None = None, api: Any = None) -> str:
    """Upload a model or adapter folder (with its tokenizer) to the Hub repository ``repo_id``, creating it if needed,
    and the branch ``revision`` if given. A model card is written into the folder first when it has none (or only
    peft's blank template). Returns the repository's URL. ``api`` is a ``huggingface_hub.HfApi`` (made from the
    token if not given); no token is a :class:`HubLoginError`, before anything is written or sent."""
    token = hub_token(token)  # first: without one, nothing is loaded, written or sent
    from dpo_dist.model.trained import is_adapter, model_folder

    folder = model_folder(folder)
    if replaceable_card(os.path.join(folder, CARD)):
        write_card(folder, model_id=repo_id)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    kind = "LoRA adapter" if is_adapter(folder) else "model"
    api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision,
                      commit_message=commit_message or f"Upload DPO-trained {kind} (dpo-dist)")
    return str(url)
