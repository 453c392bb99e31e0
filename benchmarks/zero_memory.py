"""Per-rank peak memory of full fine-tuning under DDP, ZeRO-2 and ZeRO-3 on 2 processes, side by side.

    python benchmarks/zero_memory.py [--model builtin:smollm2-135m-instruct] [--steps 2]

Each setup trains the same model on the same synthetic pairs for a few steps with ``accelerate launch`` and the
configs in accelerate_configs/; the trainer writes to peak_memory.json, per rank, the parameters, gradients and
optimizer state that rank holds at the end of training (what ZeRO shards), and its peak memory over the whole run
(resident memory on CPU, allocated GPU memory on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUPS = [("DDP", "ddp.yaml"), ("ZeRO-2", "zero2.yaml"), ("ZeRO-3", "zero3.yaml")]


def write_pairs(path: str, n: int = 64) -> None:
    rng = random.Random(0)
    words = "the movie was a film of great music and acting from start to finish".split()
    with open(path, "w") as handle:
        for _ in range(n):
            middle = " ".join(rng.choices(words, k=6))
            handle.write(json.dumps({"prompt": " ".join(rng.choices(words, k=8)), "chosen": f" {middle} yes",
                                     "rejected": f" {middle} no"}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="zero-memory-")
    data = os.path.join(work, "pairs.jsonl")
    write_pairs(data)
    rows = []
    for name, config in SETUPS:
        out = os.path.join(work, name)
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   os.path.join(ROOT, "accelerate_configs", config), "--num_processes", "2",
                   os.path.join(ROOT, "launch", "train.py"), f"model.name_or_path={args.model}", f"data.source={data}",
                   "data.eval_ratio=0.0", "lora.enabled=false", f"train.max_steps={args.steps}",
                   "train.per_device_batch_size=2", "train.eval_every=null", "train.progress_bar=false",
                   "train.plot=false", f"train.output_dir={out}", f"reference.cache_dir={work}/refcache",
                   "data.max_length=64", "data.max_prompt_length=32"]
        started = time.time()
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
        peak = json.load(open(os.path.join(out, "peak_memory.json")))
        rows.append((name, peak, time.time() - started))
        print(f"{name}: {peak} ({time.time() - started:.0f} s)", flush=True)
    print("\n| setup | params + grads + AdamW state held per rank (GiB) | vs DDP | peak memory per rank (GiB) | vs DDP |")
    print("|---|---|---|---|---|")
    state0, peak0 = rows[0][1]["per_rank_state_gb"][0], rows[0][1]["per_rank_peak_gb"][0]
    for name, peak, _ in rows:
        states = " / ".join(f"{v:.2f}" for v in peak["per_rank_state_gb"])
        peaks = " / ".join(f"{v:.2f}" for v in peak["per_rank_peak_gb"])
        print(f"| {name} | {states} | {peak['per_rank_state_gb'][0] / state0:.2f} | {peaks} | "
              f"{peak['per_rank_peak_gb'][0] / peak0:.2f} |")


if __name__ == "__main__":
    main()
