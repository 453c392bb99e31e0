"""Reference log-probs: the cache equals the online reference, is keyed by everything it depends on, and a damaged
file is recomputed, never trusted."""

import os
import subprocess
import sys

import datasets
import pytest
import torch

from dpo_dist.train import reference_cache as cache
from dpo_dist.data.collate import PreferenceCollator
from dpo_dist.distributed import build_accelerator
from dpo_dist.train.logprobs import concatenated_forward
from dpo_dist.data.packing import PackedPairCollator
from dpo_dist.train.reference import (
    ReferenceScorer, batch_reference_logps, online_reference_logps, precompute_reference, reference_fingerprint_parts,
    scoring_identity,
)
from dpo_dist.data.tokenization import Truncation, tokenize_pairs
from tiny import CORPUS, make_llama, make_tokenizer

TRUNCATION = Truncation(max_length=48, max_prompt_length=24)
# Summed log-probs here are about -150, where one fp32 step is 1.5e-5: "within 1e-5" allows that one rounding step.
CLOSE = dict(atol=1e-5, rtol=1e-7)


def make_pairs(n=10):
    rows = []
    for i in range(n):
        words = CORPUS[i % len(CORPUS)].split()
        cut = 3 + i % 4
        rows.append({"prompt": " ".join(words[:cut]), "chosen": " " + " ".join(words[cut:]),
                     "rejected": " " + " ".join(words[cut:][::-1]) + f" {i}", "row": i})
    return datasets.Dataset.from_list(rows)


class Setup:
    def __init__(self, tmp_path, tokenizer_kind="nobos", truncation=TRUNCATION, seed=0, kernel="sdpa", layout="padded",
                 chunk_size=1024, mixed_precision="no", device_type="cpu"):
        self.tok = make_tokenizer(tokenizer_kind)
        self.model_dir = str(tmp_path / f"model-{seed}")
        if not os.path.isdir(self.model_dir):
            make_llama(len(self.tok), seed=seed).save_pretrained(self.model_dir)
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, attn_implementation=kernel).eval()
        self.truncation = truncation
        self.tokenized, _ = tokenize_pairs(make_pairs(), self.tok, truncation)
        self.collator = (PreferenceCollator(pad_token_id=0) if layout == "padded"
                         else PackedPairCollator(0, share_prompt=layout == "packed-shared-prompt"))
        self.chunk_size = chunk_size
        self.scoring = dict(chunk_size=chunk_size, mixed_precision=mixed_precision, device_type=device_type)
        self.cache_dir = str(tmp_path / "cache")

    def scoring_identity(self):
        return scoring_identity(self.model, self.collator, **self.scoring)

    def parts(self):
        identity = cache.model_identity(self.model_dir)
        return reference_fingerprint_parts(identity, self.tok, self.truncation, self.tokenized, self.scoring_identity())

    def precompute(self, model=None):
        scorer = ReferenceScorer(model or self.model, self.collator, build_accelerator(cpu=True), batch_size=3,
                                 chunk_size=self.chunk_size)
        return precompute_reference(scorer, self.tokenized, fingerprint_parts=self.parts(), cache_dir=self.cache_dir)


class NoForward(torch.nn.Module):
    """A model that must not be run: the cache should answer."""

    def forward(self, *args, **kwargs):
        raise AssertionError("the reference model ran although the cache holds this fingerprint")

    @property
    def config(self):  # read first by packed scoring, to build the attention mask
        raise AssertionError("the reference model ran although the cache holds this fingerprint")

    def get_output_embeddings(self):  # read first by packed scoring, for the LM head
        raise AssertionError("the reference model ran although the cache holds this fingerprint")


def cached_logps(dataset):
    return torch.tensor([dataset["ref_chosen_logps"], dataset["ref_rejected_logps"]]).T


def test_cached_equals_online_and_is_reused(tmp_path):
    setup = Setup(tmp_path)
    first = setup.precompute()
    files = os.listdir(setup.cache_dir)
    assert len(files) == 1 and files[0].endswith(".safetensors")
    # Online, batch by batch, in another grouping than the precompute used.
    for start in range(0, len(first), 4):
        examples = [first[i] for i in range(start, min(start + 4, len(first)))]
        batch = setup.collator(examples)
        online = online_reference_logps(setup.model, batch)
        torch.testing.assert_close(online.chosen_logps, batch["ref_chosen_logps"], **CLOSE)
        torch.testing.assert_close(online.rejected_logps, batch["ref_rejected_logps"], **CLOSE)
    again = setup.precompute(model=NoForward())
    assert torch.equal(cached_logps(again), cached_logps(first))
    assert again["row"] == first["row"]


@pytest.mark.parametrize(
    "change",
    [
        dict(tokenizer_kind="chatml"),  # same vocabulary, other special tokens and a chat template
        dict(truncation=Truncation(max_length=40, max_prompt_length=24)),
        dict(truncation=Truncation(max_length=48, max_prompt_length=20)),
        dict(seed=1),  # other weights
    ],
)
def test_any_change_in_the_fingerprint_recomputes(tmp_path, change):
    base = Setup(tmp_path)
    base.precompute()
    changed = Setup(tmp_path, **change)
    assert cache.fingerprint(changed.parts()) != cache.fingerprint(base.parts())
    with pytest.raises(AssertionError, match="the reference model ran"):
        changed.precompute(model=NoForward())
    changed.precompute()
    assert len(os.listdir(base.cache_dir)) == 2


def test_the_scoring_key_does_not_depend_on_what_was_imported(tmp_path):
    """Two processes that imported different libraries before (one ran QLoRA, one did not) key the same numbers the
    same way: the one-process and ZeRO-2 runs once named the same reference log-probs differently."""
    setup = Setup(tmp_path)
    before = setup.scoring_identity()
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401

    assert setup.scoring_identity() == before and before["bitsandbytes"] is None


def test_a_chat_template_alone_changes_the_fingerprint(tmp_path):
    setup = Setup(tmp_path, tokenizer_kind="chatml")
    before = cache.fingerprint(setup.parts())
    setup.tok.chat_template = setup.tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert cache.fingerprint(setup.parts()) != before


def bump_version(monkeypatch, library):
    """Another installed version of ``library``: torch and transformers by their ``__version__``, the others by
    their installed distribution's metadata."""
    import importlib

    from dpo_dist.train import reference

    if library in ("torch", "transformers"):
        module = importlib.import_module(library)
        monkeypatch.setattr(module, "__version__", module.__version__ + "+other")
        return
    real = reference.installed_version
    monkeypatch.setattr(reference, "installed_version",
                        lambda name: real(name) + "+other" if name == library else real(name))


@pytest.mark.parametrize("field,change", [
    ("attn_implementation", dict(kernel="eager")),
    ("layout", dict(layout="padded")),  # the padded collator has no share_prompt: that field changes too
    ("share_prompt", dict(layout="packed")),
    ("chunk_size", dict(chunk_size=5)),
    ("mixed_precision", dict(mixed_precision="bf16")),
    ("device_type", dict(device_type="cuda")),
    ("torch", "version"), ("transformers", "version"), ("peft", "version"), ("bitsandbytes", "version"),
])
def test_each_scoring_field_alone_makes_a_new_cache_entry(tmp_path, monkeypatch, field, change):
    """The sdpa cache is not reused for eager attention (where it once gave a step-1 loss of 2.82 instead of ln 2),
    nor for another layout, chunking, precision, device or library version (bitsandbytes: of a quantized model)."""
    if change == "version":
        pytest.importorskip(field, reason=f"{field} is not installed")
    base = Setup(tmp_path, layout="packed-shared-prompt")
    quantized = field == "bitsandbytes"  # the version counts only for a 4/8-bit model; marked so here
    base.model.is_quantized = quantized
    base.precompute()
    before = base.scoring_identity()
    if change == "version":
        bump_version(monkeypatch, field)
        changed = Setup(tmp_path, layout="packed-shared-prompt")
    else:
        changed = Setup(tmp_path, **{"layout": "packed-shared-prompt", **change})
    changed.model.is_quantized = quantized
    after = changed.scoring_identity()
    assert [k for k in after if after[k] != before[k]] == [field] + (["share_prompt"] if field == "layout" else [])
    with pytest.raises(AssertionError, match="the reference model ran"):
        changed.precompute(model=NoForward())
    changed.precompute()
    assert len(os.listdir(base.cache_dir)) == 2


def test_data_change_changes_the_fingerprint(tmp_path):
    setup = Setup(tmp_path)
    before = cache.fingerprint(setup.parts())
    setup.tokenized = setup.tokenized.select(range(len(setup.tokenized) - 1))
    assert cache.fingerprint(setup.parts()) != before


def damage_truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def damage_flip_a_value(path):
    with open(path, "r+b") as handle:
        handle.seek(-3, os.SEEK_END)  # inside the last float of the tensor data
        byte = handle.read(1)
        handle.seek(-3, os.SEEK_END)
        handle.write(bytes([byte[0] ^ 0x40]))


@pytest.mark.parametrize("damage", [damage_truncate, damage_flip_a_value])
def test_damaged_cache_is_recomputed(tmp_path, damage, caplog):
    setup = Setup(tmp_path)
    first = setup.precompute()
    path = os.path.join(setup.cache_dir, os.listdir(setup.cache_dir)[0])
    damage(path)
    with pytest.raises(AssertionError, match="the reference model ran"):
        setup.precompute(model=NoForward())
    assert "recomputing" in caplog.text
    again = setup.precompute()
    assert torch.equal(cached_logps(again), cached_logps(first))
    assert cache.read_cache(path, cache.fingerprint(setup.parts()), len(first)) is not None, "rewritten whole"


def test_write_is_atomic(tmp_path, monkeypatch):
    """A write that dies midway leaves no file under the cache's name and no temporary behind."""
    import safetensors.torch

    def dies(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies)
    path = str(tmp_path / "c" / "reference-x.safetensors")
    with pytest.raises(KeyboardInterrupt):
        cache.write_cache(path, "x", torch.zeros(3, 2), {})
    assert os.listdir(tmp_path / "c") == []


def test_lora_reference_is_the_base_with_adapters_off(tmp_path):
    from peft import LoraConfig, get_peft_model

    setup = Setup(tmp_path)
    base = setup.precompute()
    batch = setup.collator([base[i] for i in range(4)])
    policy = get_peft_model(setup.model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    policy.train()
    with torch.no_grad():
        adapted = concatenated_forward(policy, batch)
    assert (adapted.chosen_logps - batch["ref_chosen_logps"]).abs().max() > 1e-3, "the adapters change the model"
    reference = online_reference_logps(policy, batch)
    assert policy.training, "training mode restored"
    torch.testing.assert_close(reference.chosen_logps, batch["ref_chosen_logps"], **CLOSE)
    torch.testing.assert_close(reference.rejected_logps, batch["ref_rejected_logps"], **CLOSE)
    assert not reference.chosen_logps.requires_grad


def free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_equal_one(tmp_path):
    """Pairs sharded over 2 processes (an odd count, so one shard is padded) gather back equal and in order."""
    setup = Setup(tmp_path)
    setup.tokenized = setup.tokenized.select(range(9))
    single = cached_logps(setup.precompute())
    script = os.path.join(os.path.dirname(__file__), "scripts", "precompute_reference.py")
    out = tmp_path / "two.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), os.getcwd()]))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
         script, setup.model_dir, str(tmp_path / "cache2"), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    two = torch.load(out)
    assert two["num_processes"] == 2
    torch.testing.assert_close(two["logps"], single, **CLOSE)


def test_one_option_chooses_the_reference(tmp_path):
    setup = Setup(tmp_path)
    tokenized = setup.precompute()
    batch = setup.collator([tokenized[i] for i in range(3)])
    cached = batch_reference_logps("precomputed", NoForward(), batch)
    online = batch_reference_logps("online", setup.model, batch)
    for a, b in zip(cached, online):
        torch.testing.assert_close(a, b, **CLOSE)
    assert batch_reference_logps("none", None, batch) == (None, None)
    plain = setup.collator([setup.tokenized[i] for i in range(3)])
    with pytest.raises(KeyError, match="run precompute_reference first"):
        batch_reference_logps("precomputed", None, plain)
    with pytest.raises(ValueError, match="is not one of"):
        batch_reference_logps("cached", None, plain)
