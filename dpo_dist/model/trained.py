"""What a training run wrote, loaded back: its config, and its model (a LoRA adapter on its base, or a full model).

    trained = load_trained("outputs/default", device=torch.device("cpu"))   # the run folder or its model/ folder
    trained.model, trained.tokenizer, trained.is_adapter, trained.base_source

The base of an adapter is, in this order: ``base=`` given by the caller, ``model.name_or_path`` of the run's
``config.yaml``, or ``base_model_name_or_path`` of ``adapter_config.json``. The base is loaded as the run loaded it
(its dtype and 4/8-bit quantization from ``config.yaml``) unless the caller says otherwise.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from dpo_dist.config import STATE_FILE, Config, load_config
from dpo_dist.model.load import MODEL_FILES, load_base, load_tokenizer, resolve_dtype, resolve_source


def model_folder(path: str) -> str:
    """``path`` itself if it holds a model or an adapter, else its ``model/`` folder (a run's output folder)."""
    for folder in (path, os.path.join(path, "model")):
        if any(os.path.isfile(os.path.join(folder, name)) for name in MODEL_FILES):
            return folder
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        raise FileNotFoundError(f"{path} is a training checkpoint, not a model folder: `python launch/push.py {path} "
                                "REPO_ID` exports its weights to a model folder in it and pushes that")
    raise FileNotFoundError(
        f"{path}: no model here: expected adapter_config.json or config.json in it or in {os.path.join(path, 'model')}"
        " (a training run's output folder, or a saved model or adapter folder)"
    )


def is_adapter(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "adapter_config.json"))


def run_config(path: str) -> Config | None:
    """The ``config.yaml`` a run wrote, found in ``path`` or beside its ``model/`` folder; None if there is none."""
    for folder in (path, os.path.dirname(os.path.normpath(path))):
        candidate = os.path.join(folder, "config.yaml")
        if os.path.isfile(candidate):
            return load_config(candidate)
    return None


def adapter_base(folder: str) -> str:
    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as handle:
        base = json.load(handle).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder}/adapter_config.json names no base_model_name_or_path: pass the base explicitly")
    return base


@dataclass
class Trained:
    """A trained model ready to use. ``base_source`` is the base's folder or Hub id (for a full model: the run's
    starting model when known, else None)."""

    model: Any
    tokenizer: Any
    is_adapter: bool
    folder: str
    base_source: str | None
    cfg: Config


def load_trained(
    path: str, *, device: torch.device, base: str | None = None, dtype: str | None = None,
    quantization: str | None = None, cfg: Config | None = None,
) -> Trained:
    """Load a run's model onto ``device`` in eval mode. ``dtype`` and ``quantization`` default to the run's."""
    folder = model_folder(path)
    cfg = cfg or run_config(path)
    from_run = cfg is not None  # the run's config names the base it trained from
    cfg = cfg or Config()
    if dtype is not None:
        cfg.model.dtype = dtype
    if quantization is not None:
        cfg.model.quantization = quantization
    torch_dtype = resolve_dtype(cfg.model.dtype, device)
    adapter = is_adapter(folder)
    if base is not None:
        base_source = resolve_source(base)
    elif from_run:
        base_source = resolve_source(cfg.model.name_or_path)
    else:
        base_source = adapter_base(folder) if adapter else None
    tokenizer = load_tokenizer(folder if os.path.isfile(os.path.join(folder, "tokenizer_config.json"))
                               else base_source, cfg)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_base(base_source, cfg, torch_dtype, device), folder)
    else:
        model = load_base(folder, cfg, torch_dtype, device)
    if cfg.model.quantization == "none":  # a quantized model is placed on its device as it loads
        model.to(device)
    return Trained(model.eval(), tokenizer, adapter, folder, base_source, cfg)


def load_base_model(trained: Trained, device: torch.device) -> Any:
    """The untrained base as the run loaded it (for a full model's comparison; an adapter's base is the same model
    with its adapters disabled, which needs no second copy)."""
    if trained.base_source is None:
        raise ValueError(f"{trained.folder}: which model it was trained from is unknown: pass the base explicitly")
    cfg = trained.cfg
    model = load_base(trained.base_source, cfg, resolve_dtype(cfg.model.dtype, device), device)
    if cfg.model.quantization == "none":
        model.to(device)
    return model.eval()
