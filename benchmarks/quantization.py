"""Peak memory and step time of the same LoRA run on a 4-bit, an 8-bit and a full-precision base, side by side.

    python benchmarks/quantization.py [--model builtin:smollm2-135m-instruct] [--steps 4]

One process each, same pairs, same settings; peak memory is resident memory on CPU (allocated GPU memory on CUDA),
from the trainer's peak_memory.json; time per step is the median over steps after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from zero_memory import write_pairs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="quantization-")
    data = os.path.join(work, "pairs.jsonl")
    write_pairs(data)
    rows = []
    for quantization in ("none", "8bit", "4bit"):
        out = os.path.join(work, quantization)
        command = [sys.executable, os.path.join(ROOT, "launch", "train.py"), f"model.name_or_path={args.model}",
                   f"model.quantization={quantization}", f"data.source={data}", "data.eval_ratio=0.0",
                   f"train.max_steps={args.steps}", "train.per_device_batch_size=4", "train.eval_every=null",
                   "train.progress_bar=false", "train.plot=false", "train.debug=true", f"train.output_dir={out}",
                   f"reference.cache_dir={work}/refcache", "data.max_length=64", "data.max_prompt_length=32"]
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        if result.returncode != 0:
            sys.exit(f"{quantization} failed:\n{result.stderr[-3000:]}")
        peak = json.load(open(os.path.join(out, "peak_memory.json")))
        times = [float(line.split(" took ")[1].split(" s")[0]) for line in result.stdout.splitlines()
                 if line.startswith("debug: step") and not line.startswith("debug: step 1 ")]
        rows.append((quantization, peak["per_rank_peak_gb"][0], statistics.median(times), peak["device"]))
        print(rows[-1], flush=True)
    print("\n| base | peak memory (GiB) | vs full | time per step (s) | vs full |")
    print("|---|---|---|---|---|")
    for name, memory, seconds, device in rows:
        print(f"| {name} ({device}) | {memory:.2f} | {memory / rows[0][1]:.2f} | {seconds:.2f} | {seconds / rows[0][2]:.2f} |")


if __name__ == "__main__":
    main()
