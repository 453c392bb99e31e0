"""Tiny tokenizers and models built offline inside the tests: nothing comes from the Hub."""

from __future__ import annotations

import functools

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "Human: What is the capital of France? Assistant: The capital of France is Paris.",
    "Human: Can you help me bake bread? Assistant: Sure! Mix flour, water, salt and yeast, then knead.",
    "The movie was wonderful, a delight from start to finish. I loved the acting and the music.",
    "The film was terrible and boring; I would not recommend it to anyone.",
    "user assistant system hello thanks please yes no good bad great awful 0123456789",
]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Zephyr / TinyLlama style: the template itself renders BOS, and EOS ends each turn.
ZEPHYR = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@functools.lru_cache(maxsize=None)
def _bpe(vocab_size: int = 400) -> str:
    special = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok.to_str()


def make_tokenizer(kind: str = "bos") -> PreTrainedTokenizerFast:
    """``bos``: adds ``<s>`` in front, like Llama; ``nobos``: adds nothing, like GPT-2/Qwen (EOS ``<|endoftext|>``);
    ``chatml``: no BOS, ChatML template, EOS ``<|im_end|>`` like SmolLM2; ``zephyr``: adds BOS and its template
    renders BOS too, EOS ``</s>`` ends turns."""
    tok = Tokenizer.from_str(_bpe())
    if kind in ("bos", "zephyr"):
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
        if kind == "zephyr":
            hf.chat_template = ZEPHYR
        return hf
    if kind == "nobos":
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    if kind == "chatml":
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        hf.chat_template = CHATML
        return hf
    raise ValueError(kind)


def make_llama(vocab_size: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, **overrides,
    )
    return LlamaForCausalLM(config).eval()


def make_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    """Absolute position embeddings: wrong position ids under left padding would show."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    return GPT2LMHeadModel(config).eval()
