"""What the whole-model CPU benchmarks share: the training model and the token-id pairs of ``benchmarks/vs_trl.py``.

Importing it imports no torch (``host_memory.py`` sets malloc's thresholds before torch allocates anything)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def load_lora_model(model_dir: str, group: bool = True) -> torch.nn.Module:
    """The model as training holds it on CPU: fp32, sdpa, LoRA r16 (alpha 32, no dropout) on every linear layer,
    fused (with ``group``: the layers of one input grouped; see ``dpo_dist.model.lora_linear``)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from dpo_dist.model.lora_linear import fuse_lora

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    fuse_lora(model, group=group)
    return model


def token_pairs(pairs_file: str) -> list[dict[str, list[int]]]:
    """The pairs of ``pairs_tokenized.jsonl`` (as ``vs_trl.py`` writes it), as the collators take them."""
    rows = [json.loads(line) for line in open(pairs_file)]
    return [{f"{k}_input_ids": r[f"{k}_ids"] for k in ("prompt", "chosen", "rejected")} for r in rows]


def forward_backward(model: torch.nn.Module, collated: dict[str, Any]) -> float:
    """One packed forward and backward, as a training step computes it (the DPO loss replaced by a sum of the
    log-probs: the same graph); the gradients are dropped. Returns the summed value."""
    from dpo_dist.train.logprobs import packed_forward

    out = packed_forward(model, collated)
    total = out.chosen_logps.sum() - out.rejected_logps.sum()
    total.backward()
    model.zero_grad(set_to_none=True)
    return total.item()


def add_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The options the whole-model benchmarks share: the model, the pairs, rounds and threads."""
    parser.add_argument("--model", required=True, help="a local model folder (SmolLM2-135M-Instruct for the figures)")
    parser.add_argument("--pairs", required=True, help="pairs_tokenized.jsonl from benchmarks/vs_trl.py")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
