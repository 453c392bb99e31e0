"""peft's adapter options as the policy is built (``lora.*``), and the initializations that change the base.

    config = lora_config(cfg.lora, model)              # peft's LoraConfig; all-linear spelled out where peft needs it
    start = starting_model(peft_model)                  # PiSSA/OLoRA: the initial adapter and the residual's digest
    save_start(start, output_dir) / check_start(start, output_dir)   # at a fresh start / at a resume
    as_plain_lora(adapter_folder, output_dir)           # the exported adapter, on the unmodified base

PiSSA and OLoRA (:data:`dpo_dist.config.LORA_INITS`, ``mutates_base``) start the adapter at B0 A0, a slice of each
adapted weight W, and leave the base holding the residual W - s B0 A0 (s: the LoRA scale). The policy as initialized
computes W x (to fp32 rounding), so it is the starting model; the policy with its adapters off is not. Hence:

- **The reference** is the policy as initialized, adapters on (:func:`reference_adapters_off` says which), scored once
  at step 0 (``reference.mode=precomputed``; the config refuses ``online``). Its cache key includes the digest of the
  residual and the initial adapter, so no other starting model's log-probs are reused.
- **A resume** rebuilds the policy from the pretrained weights with the same initialization, which must give the same
  residual bit for bit (a randomized SVD, ``pissa_niter_<N>``, draws from train.seed; another machine or library may
  decompose differently): :func:`check_start` compares the rebuilt residual's digest with the one the run started
  from (``initial_adapter/start.json`` in the output folder) and stops with the reason if they differ.
- **The exported adapter** (``model/``, a checkpoint's export) is converted as peft's
  ``path_initial_model_for_weight_conversion`` converts it: A' = [A; A0], B' = [B, -B0], rank 2r, alpha scaled to
  keep s, on the unmodified base W: W + s (B A - B0 A0) = W_res + s B A, the policy. Unlike peft's conversion it keeps
  the weights that are not A or B (DoRA's magnitudes, ``modules_to_save``). So evaluation, chat and merging load it
  on the pretrained base like any adapter, and its adapters off are the pretrained model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from dpo_dist.config import LoraSettings, lora_init

START_FOLDER = "initial_adapter"  # in train.output_dir: the initial adapter and start.json
START_FILE = "start.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def lora_config(lora: LoraSettings, model: torch.nn.Module) -> Any:
    """peft's ``LoraConfig`` for ``lora`` on ``model``. With ``layers_to_transform``, ``all-linear`` is spelled out
    as the linear layers' names, as peft itself expands it (peft takes layer indices only with a list of names).
    Tied input and output embeddings stay tied (peft's ``ensure_weight_tying``): ``modules_to_save`` naming either
    trains the one matrix they share, so a merged model keeps its config's ``tie_word_embeddings``."""
    from peft import LoraConfig

    targets = lora.target_modules
    if lora.layers_to_transform is not None and targets == "all-linear":
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

        names = _maybe_include_all_linear_layers(LoraConfig(target_modules="all-linear"), model).target_modules
        targets = sorted({name.rsplit(".", 1)[-1] for name in names})  # a full name is taken whatever its layer
    return LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type="CAUSAL_LM",
        use_dora=lora.use_dora, use_rslora=lora.use_rslora, init_lora_weights=lora.init_lora_weights,
        modules_to_save=lora.modules_to_save, layers_to_transform=lora.layers_to_transform,
        layers_pattern=lora.layers_pattern,
        ensure_weight_tying=bool(lora.modules_to_save) and bool(getattr(model.config, "tie_word_embeddings", False)),
    )


def mutates_base(model: torch.nn.Module) -> bool:
    """Whether ``model`` (a peft model, possibly wrapped by DDP) was initialized by moving part of its base weights
    into its adapter (PiSSA, OLoRA)."""
    model = getattr(model, "module", model)
    config = getattr(model, "peft_config", {}).get("default")
    init = lora_init(getattr(config, "init_lora_weights", True))
    return init is not None and init.mutates_base


def reference_adapters_off(model: torch.nn.Module) -> bool:
    """Whether the reference is ``model`` with its adapters off (a LoRA policy whose base is the starting model), or
    ``model`` as it is (no adapters; PiSSA/OLoRA, whose policy as initialized is the starting model: the reference
    is scored from it at step 0; or inside :func:`policy_as_reference`)."""
    base = getattr(model, "module", model)
    return (hasattr(base, "disable_adapter") and not mutates_base(model)
            and not getattr(base, "_policy_is_reference", False))


@contextlib.contextmanager
def policy_as_reference(model: torch.nn.Module) -> Iterator[None]:
    """Inside, the reference is the policy as it is now, adapters on: an iterative-DPO round whose reference is the
    policy at the round's start (``rounds.reference=previous``) scores its pairs from it before training the round."""
    base = getattr(model, "module", model)
    base._policy_is_reference = True
    try:
        yield
    finally:
        del base._policy_is_reference


@dataclass(frozen=True)
class Start:
    """Where a PiSSA/OLoRA policy starts: its initial adapter (peft's saved names) and the digest of the residual
    base weights and that adapter, bit for bit."""

    initialization: str
    adapter: dict[str, torch.Tensor]
    digest: str


def starting_model(model: torch.nn.Module) -> Start | None:
    """The :class:`Start` of a freshly initialized PiSSA/OLoRA policy (before any step); None for one whose base is
    unchanged (there is nothing to check or convert)."""
    if not mutates_base(model):
        return None
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    adapter = {name: tensor.detach().to("cpu", copy=True).contiguous()
               for name, tensor in get_peft_model_state_dict(model).items()}
    digest = hashlib.sha256()
    for name, module in sorted(model.named_modules(), key=lambda item: item[0]):
        if isinstance(module, LoraLayer):
            _update(digest, f"{name}.base_layer.weight", module.get_base_layer().weight)
    for name in sorted(adapter):
        _update(digest, name, adapter[name])
    return Start(str(model.peft_config["default"].init_lora_weights), adapter, digest.hexdigest())


def _update(digest: Any, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")


def save_start(start: Start, output_dir: str) -> str:
    """Write ``start`` to ``<output_dir>/initial_adapter/`` (replaced): the initial adapter's weights and
    ``start.json`` (the initialization and the digest). Main process, at a run's fresh start."""
    from safetensors.torch import save_file

    folder = os.path.join(output_dir, START_FOLDER)
    os.makedirs(folder, exist_ok=True)
    save_file(start.adapter, os.path.join(folder, ADAPTER_WEIGHTS))
    with open(os.path.join(folder, START_FILE), "w", encoding="utf-8") as handle:
        json.dump({"init_lora_weights": start.initialization, "digest": start.digest}, handle, indent=1)
    return folder


def check_start(start: Start, output_dir: str) -> str | None:
    """None if ``start`` (rebuilt for a resume) is the start the run in ``output_dir`` recorded; else why not, in a
    line that says what to do."""
    path = os.path.join(output_dir, START_FOLDER, START_FILE)
    if not os.path.isfile(path):
        return (f"{path} is missing: the residual base this run started from (lora.init_lora_weights="
                f"{start.initialization}) cannot be checked, so its checkpoints cannot be resumed exactly; start over "
                "with train.resume=never")
    with open(path, encoding="utf-8") as handle:
        recorded = json.load(handle)
    if recorded["digest"] == start.digest:
        return None
    return (f"lora.init_lora_weights={start.initialization} rebuilt another residual base than this run started from "
            f"(digest {start.digest[:12]}, recorded {recorded['digest'][:12]} in {path}): resumed with another "
            "train.seed, lora setting, base, machine or library version, the checkpoint's adapter would sit on other "
            "weights; resume with the run's setup, or start over with train.resume=never")


def as_plain_lora(folder: str, output_dir: str) -> None:
    """Rewrite the PiSSA/OLoRA adapter saved in ``folder`` as a plain LoRA adapter on the unmodified base, from the
    initial adapter recorded in ``<output_dir>/initial_adapter/``: A' = [A; A0], B' = [B, -B0] (peft's
    ``subtract_mutated_init``), rank 2r, alpha doubled (with rsLoRA times sqrt 2) so the scale stays, and
    ``init_lora_weights`` true (loading it changes no base weight). Every other weight (DoRA's magnitudes,
    ``modules_to_save``) is kept as it is. An adapter of another initialization, or a full model, is left alone."""
    from safetensors.torch import load_file, save_file

    if not os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):  # a full model
        return
    with open(os.path.join(folder, ADAPTER_CONFIG), encoding="utf-8") as handle:
        config = json.load(handle)
    init = lora_init(config.get("init_lora_weights", True))
    if init is None or not init.mutates_base:
        return
    initial = load_file(os.path.join(output_dir, START_FOLDER, ADAPTER_WEIGHTS))
    trained = load_file(os.path.join(folder, ADAPTER_WEIGHTS))
    converted = {}
    for name, tensor in trained.items():
        if ".lora_A." in name:
            converted[name] = torch.cat([tensor, initial[name].to(tensor.dtype)], dim=0)
        elif ".lora_B." in name:
            converted[name] = torch.cat([tensor, -initial[name].to(tensor.dtype)], dim=1)
        else:
            converted[name] = tensor
    config.update(r=2 * config["r"], lora_alpha=config["lora_alpha"] * (2 ** 0.5 if config.get("use_rslora") else 2),
                  init_lora_weights=True)
    save_file(converted, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(folder, ADAPTER_CONFIG), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
