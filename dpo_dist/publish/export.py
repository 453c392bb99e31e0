"""Ship a trained model: merge a LoRA adapter into its full-precision base, export a checkpoint's weights as a model
folder, and push a folder to the Hub; each folder written here gets its model card.

    merge_adapter("outputs/default", "outputs/default/merged")                  # in the base's dtype, + tokenizer, card
    export_checkpoint("outputs/default/checkpoint-200")                         # -> its model/, + tokenizer, card
    push_to_hub("outputs/default/merged", "my-name/smollm2-dpo-sentiment")      # needs the network and a token

The weights come from the stages that know them: the merge from :mod:`dpo_dist.model.merge` (in full precision, then
the base's dtype: why, there), a checkpoint's from :mod:`dpo_dist.train.final`; this module writes them where they go
with their card, and uploads.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from dpo_dist.model.load import MODEL_FILES
from dpo_dist.model.merge import merged_model
from dpo_dist.progress import progress, step_done
from dpo_dist.publish.card import CARD, find_run, replaceable_card, write_card
from dpo_dist.train.final import save_checkpoint_model


class HubLoginError(RuntimeError):
    """No Hugging Face token: the message says how to log in."""


def merge_adapter(run: str, out: str, *, base: str | None = None, dtype: str | None = None) -> Any:
    """Merge the adapter of ``run`` (a run's output folder or an adapter folder) into its base
    (:func:`~dpo_dist.model.merge.merged_model`) and save model, tokenizer and model card to ``out`` in ``dtype``
    (default: the base's; logged) (written to ``out.tmp`` and renamed when complete). Returns the merged model."""
    with progress(3, "merge", unit="step") as bar:  # load, merge, save: each a step of seconds to minutes
        merged, trained = merged_model(run, base=base, dtype=dtype, progress=bar)
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(tmp)
        trained.tokenizer.save_pretrained(tmp)
        run_folder = find_run(trained.folder)
        write_card(tmp, run=run_folder, model_id=out, kind="merged")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        step_done(bar, f"saved to {out}")
    return merged


def export_checkpoint(path: str) -> str:
    """The weights of the checkpoint ``path`` as a model folder, ``<path>/model``: what the run's ``model/`` would
    hold had training stopped there (:func:`~dpo_dist.train.final.save_checkpoint_model`: the LoRA adapter, or the full
    model with the base's ``use_cache`` and dropout, and the tokenizer), and a card that says which step and shows the
    metrics up to it. Written once, atomically (an existing ``<path>/model`` is returned as it is). An FSDP2 run's
    checkpoint is consolidated from its shards. A checkpoint that holds no loadable weights (a DeepSpeed run's
    shards) or does not fit its run's config is a
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
        write_card(folder, repo_id=repo_id)
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
