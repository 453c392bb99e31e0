"""Load the policy (full, LoRA, or LoRA on a 4/8-bit base), the tokenizer, and an online reference copy."""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from dpo_dist.config import Config
from dpo_dist.model.adapters import lora_config
from dpo_dist.model.builtin import SMOLLM2, smollm2_folder
from dpo_dist.model.lora_linear import fuse_lora

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_FILES = ("adapter_config.json", "config.json")  # a folder holds a model (or a LoRA adapter) if it has one
# Config entries that loading for training changes (load_base: the KV cache off, dropout 0): a saved full model (the
# trainer's model/, a merged export, an exported checkpoint) gets the base's values back.
RESTORED_CONFIG = ("use_cache", "attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop",
                   "attn_pdrop")


class ModelError(ValueError):
    """A model or tokenizer that cannot be loaded as configured: one line naming the key, the source and the way out."""

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))  # one line: transformers' messages span several


def resolve_source(name_or_path: str) -> str:
    """A built-in name -> its local folder; a local folder -> itself, if it holds a model; anything else is a Hub id,
    passed to ``from_pretrained`` as given. A path that does not exist, or a folder with no model in it, is a
    :class:`ModelError` (transformers would read the path as a malformed Hub id)."""
    if name_or_path == SMOLLM2:
        return smollm2_folder()
    if os.path.exists(name_or_path):
        check_model_folder(name_or_path)
        return name_or_path
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        raise ModelError(f"model.name_or_path: {name_or_path} does not exist (not a local folder, and not a Hub id, "
                         "which looks like org/name)") from None
    return name_or_path


def check_model_folder(path: str) -> None:
    """A ModelError unless ``path`` is a folder with a model's (or an adapter's) config in it; it names the subfolders
    that have one (a run's output folder holds its final model in ``model/``)."""
    if not os.path.isdir(path):
        raise ModelError(f"model.name_or_path: {path} is a file; give the folder that holds config.json")
    if any(os.path.isfile(os.path.join(path, name)) for name in MODEL_FILES):
        return
    inside = sorted(os.path.join(path, name) for name in os.listdir(path)
                    if any(os.path.isfile(os.path.join(path, name, f)) for f in MODEL_FILES))
    raise ModelError(f"model.name_or_path: no model in {path} (no config.json or adapter_config.json)"
                     + (f"; the model folders in it: {', '.join(inside)}" if inside else ""))


def load_error(what: str, source: str, error: Exception, cfg: Config) -> ModelError:
    """``from_pretrained``'s error as a ModelError naming the key that caused it."""
    if isinstance(error, ImportError) and cfg.model.attn_implementation:  # flash attention not installed
        return ModelError(f"model.attn_implementation={cfg.model.attn_implementation}: {str(error).rstrip('.')}; set "
                          "model.attn_implementation=sdpa (or null) or install the kernel")
    hint = " (not a local folder either)" if not os.path.exists(source) else ""
    return ModelError(f"model.name_or_path={source}{hint}: cannot load the {what}: {error}")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU (bf16 matmuls are tens of times slower there), bf16 where the GPU has it, else fp16."""
    if name != "auto":
        return DTYPES[name]
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# model.quantization -> how load_base stores the base's linear layers (quantization_config's settings), in words.
QUANTIZED = {"4bit": "4-bit NF4 (bitsandbytes, double quantization)", "8bit": "8-bit (bitsandbytes LLM.int8)"}


def quantization_config(quantization: str, compute: torch.dtype) -> Any:
    """The ``BitsAndBytesConfig`` of ``model.quantization`` (4bit, 8bit) for a base computing in ``compute``; what
    :data:`QUANTIZED` says it is."""
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute)
    return BitsAndBytesConfig(load_in_8bit=True)


def base_weights(quantization: str, dtype: torch.dtype) -> str:
    """The base as loaded (:func:`load_base`), in words, for the log lines that say so (the precision line, the
    policy's): ``base in fp32``, or ``base of 4-bit NF4 linear layers (bitsandbytes, double quantization) and fp32
    embeddings, norms and LM head`` (``dtype``: what they are in, and what the 4-bit layers compute in)."""
    if quantization == "none":
        return f"base in {SHORT[dtype]}"
    return f"base of {QUANTIZED[quantization]} linear layers and {SHORT[dtype]} embeddings, norms and LM head"


@dataclass(frozen=True)
class Precision:
    """How the policy's numbers are held and computed.

    ``compute``: what ``model.dtype`` resolves to; ``weights``: the dtype the policy is loaded in (for LoRA the frozen
    base: peft keeps the adapters in fp32); ``mixed_precision``: the Accelerator's setting (``no``, ``bf16``, ``fp16``:
    its forward under autocast, and for fp16 a GradScaler); ``said``: one line for the log.
    """

    compute: torch.dtype
    weights: torch.dtype
    mixed_precision: str
    said: str

    @property
    def autocast(self) -> torch.dtype | None:
        """The dtype the policy's forward is autocast to; None when it runs in its weights' dtype."""
        return self.compute if self.mixed_precision != "no" else None

    @property
    def loss_scaling(self) -> bool:
        """fp16 gradients are scaled (a GradScaler, or DeepSpeed's loss scaler): a step whose scaled gradients
        overflow is skipped and the scale lowered, which is routine, not an error."""
        return self.compute == torch.float16


def resolve_precision(cfg: Config, device: torch.device, *, deepspeed: bool) -> Precision:
    """What ``model.dtype`` means for training on ``device``.

    fp32 is fp32. A half dtype: under DeepSpeed, DeepSpeed's bf16/fp16 section (``configure_deepspeed`` writes it):
    half weights, fp32 master copies in its optimizer. Otherwise accelerate's mixed precision, so no update is rounded
    away: full fine-tuning keeps fp32 weights (what AdamW steps) and runs the forward under autocast; LoRA keeps the
    frozen base in the half dtype (peft keeps the adapters in fp32), under autocast and a GradScaler for fp16
    (fp16 gradients underflow without loss scaling); bf16 has fp32's range and needs neither, so a bf16 LoRA run
    computes in its weights' dtype as before. A 4/8-bit base (QLoRA) is said as loaded (:func:`base_weights`), in fp32
    too: its linear layers are not fp32 weights.
    """
    compute = resolve_dtype(cfg.model.dtype, device)
    half = SHORT[compute]
    quantized = cfg.model.quantization != "none"  # with LoRA (the config says so); ZeRO and FSDP refuse it
    if compute == torch.float32 and not quantized:
        return Precision(compute, compute, "no", "precision: fp32 weights and compute")
    scaling = compute == torch.float16
    if deepspeed and not quantized:
        return Precision(compute, compute, "no", f"precision: {half} weights and compute, fp32 master weights in "
                         f"DeepSpeed's optimizer (its {half} section{', dynamic loss scaling' if scaling else ''})")
    amp = f"{half} autocast (mixed precision{', GradScaler loss scaling' if scaling else ''})"
    if not cfg.lora.enabled:
        return Precision(compute, torch.float32, half, f"precision: fp32 weights, {amp}")
    base = base_weights(cfg.model.quantization, compute)
    comma = "; " if quantized else ", "  # the quantized base's words have commas of their own
    said = f"precision: frozen {base}{comma}LoRA adapters in fp32{comma}"
    if scaling:
        return Precision(compute, compute, half, said + amp)
    return Precision(compute, compute, "no", f"{said}{half} compute")


def load_tokenizer(source: str, cfg: Config) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        )
    except (OSError, ValueError, ImportError) as error:
        raise load_error("tokenizer", source, error, cfg) from error
    if tokenizer.eos_token is None:
        raise ModelError(f"the tokenizer of {source} has no eos_token; DPO needs one to end responses")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; any id will do
        logger.info("tokenizer has no pad token: padding with eos (%r), which the attention mask hides", tokenizer.eos_token)
    return tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere: DPO compares log-probs of policy and reference, which dropout would make noisy.

    Both kinds: ``nn.Dropout`` modules, and attention dropout passed as a float (``attention_dropout`` on Llama-style
    attention modules and their config), which no module-type check would find.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)


def one_4bit_path(model: torch.nn.Module) -> None:
    """Every bitsandbytes ``Linear4bit`` in ``model`` computes the same way in eval/no-grad as in training: the weight
    de-quantized to the compute dtype, then a plain matmul.

    Why: on a CPU with AVX512-BF16 (Intel Sapphire Rapids and newer) bitsandbytes 0.50 sends a ``Linear4bit`` that
    runs in eval mode without grad down another path: it repacks the weight in place for a bf16 CPU kernel
    (``_convert_weight_packed_for_cpu``) and computes in bf16. That breaks DPO three ways. (1) The repacking fails
    on layers narrower than the quantization block (``shape '[32, 0]' is invalid``). (2) The reference (eval, no
    grad) gets bf16 numerics and the policy (train, grad) fp32, so step 1 is not ln 2 (SmolLM2-135M: off by up to
    3e-3). (3) The weight stays repacked, so every later training forward runs the bf16 kernel, which has no
    backward: no gradient flows through the 4-bit layers any more (torch only warns). With the switch off, both
    passes call the same ``gemm_4bit`` (de-quantize + matmul; ``MatMul4Bit`` runs it as its forward too), so they
    agree exactly, on any CPU. ``forward`` reads the switch only for CPU inputs: on a GPU this changes nothing.
    Call it before the first forward (``load_base`` does, right after loading): undoing a repacking is lossy, as
    bitsandbytes rounds the block scales to bf16 when it repacks.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_base(source: str, cfg: Config, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "revision": cfg.model.revision,
        "dtype": dtype,
        "trust_remote_code": cfg.model.trust_remote_code,
    }
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    if cfg.model.quantization != "none":
        kwargs["quantization_config"] = quantization_config(cfg.model.quantization, dtype)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError, ImportError) as error:
        raise load_error("model", source, error, cfg) from error
    if cfg.model.quantization == "4bit":
        one_4bit_path(model)  # reference and policy, evaluation and chat: one 4-bit numerics on any CPU
    disable_dropout(model)
    model.config.use_cache = False
    return model


def base_config_values(cfg: Config) -> dict[str, Any]:
    """The base's own values of :data:`RESTORED_CONFIG` (those its config has), read from its config file."""
    from transformers import AutoConfig

    source = resolve_source(cfg.model.name_or_path)
    config = AutoConfig.from_pretrained(source, revision=cfg.model.revision,
                                        trust_remote_code=cfg.model.trust_remote_code).to_dict()
    return {key: config[key] for key in RESTORED_CONFIG if key in config}


@contextlib.contextmanager
def config_set_to(model: torch.nn.Module, values: dict[str, Any]) -> Iterator[None]:
    """``model.config`` with ``values`` while the block runs (a ``save_pretrained``), as it was afterwards."""
    config = model.config
    before = {key: getattr(config, key) for key in values if hasattr(config, key)}
    for key, value in values.items():
        setattr(config, key, value)
    try:
        yield
    finally:
        for key in values:
            if key in before:
                setattr(config, key, before[key])
            else:
                delattr(config, key)


def parameter_count(parameter: torch.nn.Parameter) -> int:
    """The number of weights a parameter holds, wherever its storage says otherwise: ZeRO-3 partitions it (its
    ``numel()`` is then 0 outside a gather; ``ds_numel`` is the whole), and a 4-bit weight packs two into a byte (its
    ``quant_state`` keeps the unquantized shape)."""
    if hasattr(parameter, "ds_numel"):
        return parameter.ds_numel
    quant_state = getattr(parameter, "quant_state", None)
    if quant_state is not None:
        return quant_state.shape.numel()
    return parameter.numel()


def load_policy(cfg: Config, device: torch.device, weights: torch.dtype | None = None) -> tuple[torch.nn.Module, Any]:
    """The trainable policy and its tokenizer; ``weights``: the dtype it is loaded in (``Precision.weights``;
    default: ``model.dtype`` resolved on ``device``). A 4/8-bit base computes in ``model.dtype``."""
    source = resolve_source(cfg.model.name_or_path)
    tokenizer = load_tokenizer(source, cfg)
    dtype = weights or resolve_dtype(cfg.model.dtype, device)
    model = load_base(source, cfg, dtype, device)
    checkpointing = {"use_reentrant": False}
    if cfg.model.quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.model.gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing
        )
    elif cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    if cfg.lora.enabled:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(cfg.lora, model))
        fuse_lora(model)  # peft's numbers with fewer passes over the activations, where exact (see lora_linear)
    trainable = sum(parameter_count(p) for p in model.parameters() if p.requires_grad)
    total = sum(parameter_count(p) for p in model.parameters())
    if cfg.lora.enabled:
        adapters = sorted({SHORT.get(p.dtype, str(p.dtype)) for p in model.parameters() if p.requires_grad})
        weights = f"frozen {base_weights(cfg.model.quantization, dtype)}; LoRA adapters in {' and '.join(adapters)}"
    else:
        weights = f"{SHORT[dtype]} weights"
    logger.info("policy %s: %s; %.2fM of %.2fM parameters trainable", source, weights, trainable / 1e6, total / 1e6)
    return model, tokenizer


def load_reference_copy(cfg: Config, device: torch.device, weights: torch.dtype | None = None) -> torch.nn.Module:
    """A frozen second copy of the initial weights: the online reference for full fine-tuning, in the policy's
    ``weights`` dtype (under the same autocast, it computes what the policy computed at step 1)."""
    source = resolve_source(cfg.model.name_or_path)
    model = load_base(source, cfg, weights or resolve_dtype(cfg.model.dtype, device), device)
    model.requires_grad_(False)
    return model.eval()  # placed by distributed.prepare_frozen (sharded under ZeRO-3)
