"""Run by test_reference.py under torch.distributed.run: precompute reference log-probs on every process."""

import sys

import torch
from transformers import AutoModelForCausalLM

from dpo_dist.train import reference_cache as cache
from dpo_dist.data.collate import PreferenceCollator
from dpo_dist.distributed import build_accelerator
from dpo_dist.train.reference import (ReferenceScorer, precompute_reference, reference_fingerprint_parts,
                                      scoring_identity)
from dpo_dist.data.tokenization import tokenize_pairs
from test_reference import TRUNCATION, make_pairs
from tiny import make_tokenizer

model_dir, cache_dir, out = sys.argv[1:4]
accelerator = build_accelerator()
tok = make_tokenizer("nobos")
tokenized, _ = tokenize_pairs(make_pairs(), tok, TRUNCATION)
tokenized = tokenized.select(range(9))
model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
scoring = scoring_identity(model, PreferenceCollator(pad_token_id=0), chunk_size=1024)
parts = reference_fingerprint_parts(cache.model_identity(model_dir), tok, TRUNCATION, tokenized, scoring)
result = precompute_reference(ReferenceScorer(model, PreferenceCollator(pad_token_id=0), accelerator, batch_size=2),
                              tokenized, fingerprint_parts=parts, cache_dir=cache_dir)
if accelerator.is_main_process:
    logps = torch.tensor([result["ref_chosen_logps"], result["ref_rejected_logps"]]).T
    torch.save({"logps": logps, "num_processes": accelerator.num_processes}, out)
