"""The on-disk cache of reference log-probs: fingerprints, atomic writes, and reads that trust nothing.

A cache entry is one safetensors file named by the fingerprint of everything the reference log-probs depend on:

- the model: a digest of its weight files (and config), its dtype and quantization, and the autocast dtype its
  forward ran under when mixed precision is on;
- the tokenizer: its vocabulary and merges, special tokens and chat template;
- the truncation settings (``max_length``, ``max_prompt_length``);
- the data: every token id of every tokenized pair, in order (rankings: of the prompt and each response, and a key
  that pairs' never have, so the two modes never share an entry);
- the scoring path: attention kernel, padded or packed (prompt shared or not), chunking, mixed precision, device
  type, and the torch / transformers / peft / bitsandbytes versions (``reference.scoring_identity``).

Any change gives another fingerprint, hence another file: nothing stale is ever read. A file that fails to open, whose
stored fingerprint or shape differs, or whose checksum does not match its contents is reported and recomputed.
Writes go to a temporary file in the same folder that is renamed into place, so a reader sees a whole file or none.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from typing import Any

import torch

from dpo_dist.train.disk import reporting_full_disk, tensor_bytes

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dpo_dist", "reference")


def _sha256_files(paths: list[str]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def model_identity(source: str, *, revision: str | None = None, dtype: str = "float32", quantization: str = "none") -> dict:
    """What identifies the reference model's weights: a digest of its weight and config files.

    ``source`` is a local folder or file, or a Hub id already in the local Hub cache (resolved offline).
    """
    folder = source
    if not os.path.exists(source):
        from huggingface_hub import snapshot_download

        folder = snapshot_download(source, revision=revision, local_files_only=True)
    if os.path.isfile(folder):
        files = [folder]
    else:
        files = sorted(
            os.path.join(folder, name)
            for name in os.listdir(folder)
            if name.endswith(WEIGHT_SUFFIXES) or name == "config.json"
        )
    if not any(f.endswith(WEIGHT_SUFFIXES) for f in files):
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in {folder}")
    return {"weights_sha256": _sha256_files(files), "dtype": dtype, "quantization": quantization}


def tokenizer_identity(tokenizer: Any) -> dict:
    """Vocabulary, merges and normalization (the fast tokenizer's JSON), special tokens and chat template."""
    if hasattr(tokenizer, "backend_tokenizer"):
        body = tokenizer.backend_tokenizer.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "tokenizer_sha256": hashlib.sha256(body.encode()).hexdigest(),
        "special_tokens": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


def data_identity(tokenized: Any, columns: tuple[str, ...]) -> dict:
    """A digest of every token id of every pair, in order."""
    digest = hashlib.sha256()
    for batch in tokenized.select_columns(list(columns)).iter(batch_size=1024):
        for column in columns:
            for ids in batch[column]:
                digest.update(len(ids).to_bytes(4, "little"))
                digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return {"pairs": len(tokenized), "token_ids_sha256": digest.hexdigest()}


def groups_identity(tokenized: Any, column: str) -> str:
    """A digest of every response's token ids of every group (rankings: a list of k token lists per example), in
    order, each group's count of responses included."""
    digest = hashlib.sha256()
    for batch in tokenized.select_columns([column]).iter(batch_size=1024):
        for responses in batch[column]:
            digest.update(len(responses).to_bytes(4, "little"))
            for ids in responses:
                digest.update(len(ids).to_bytes(4, "little"))
                digest.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(parts: dict) -> str:
    """sha256 of the canonical JSON of ``parts`` (dataclasses become dicts)."""
    def plain(value: Any) -> Any:
        return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)

    text = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()


def cache_path(cache_dir: str, key: str) -> str:
    return os.path.join(cache_dir, f"reference-{key[:32]}.safetensors")


def _checksum(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


def write_cache(path: str, key: str, logps: torch.Tensor, parts: dict) -> None:
    """Atomically write ``logps`` (N, 2) float32: chosen in column 0, rejected in column 1 (rankings: (N, K), response
    j of example i at [i, j], 0 past its k). A full disk is
    :class:`~dpo_dist.train.disk.DiskFullError`, the temporary file removed."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    logps = logps.detach().to("cpu", torch.float32).contiguous()
    metadata = {
        "fingerprint": key,
        "checksum": _checksum(logps),
        "parts": json.dumps(parts, sort_keys=True, default=str),
    }
    handle, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    os.close(handle)
    try:
        needed = tensor_bytes([logps]) + sum(len(k) + len(v) for k, v in metadata.items())
        with reporting_full_disk(path, tmp, needed=lambda: (needed, "the log-probs and their key"),
                                 then=lambda: "nothing is cached"):
            save_file({"logps": logps}, tmp, metadata=metadata)
            with open(tmp, "rb") as written:
                os.fsync(written.fileno())
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_cache(path: str, key: str, num_pairs: int, width: int = 2) -> torch.Tensor | None:
    """The cached (N, width) log-probs (pairs: 2; rankings: their largest k), or None if the file is absent,
    unreadable, stale or corrupt (logged)."""
    if not os.path.exists(path):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            logps = handle.get_tensor("logps")
    except Exception as error:  # a truncated or garbled file raises from inside safetensors
        logger.warning("reference cache %s is unreadable (%s): recomputing", path, error)
        return None
    problem = None
    if metadata.get("fingerprint") != key:
        problem = "its fingerprint differs"
    elif tuple(logps.shape) != (num_pairs, width) or logps.dtype != torch.float32:
        problem = f"its shape {tuple(logps.shape)} is not ({num_pairs}, {width})"
    elif metadata.get("checksum") != _checksum(logps):
        problem = "its checksum does not match its contents"
    elif not torch.isfinite(logps).all():
        problem = "it holds non-finite values"
    if problem:
        logger.warning("reference cache %s is not valid (%s): recomputing", path, problem)
        return None
    return logps
