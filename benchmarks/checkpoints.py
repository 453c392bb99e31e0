"""Checkpoint size and save/load time per engine, and what the checks cost, side by side in one run.

    python benchmarks/checkpoints.py [--model builtin:smollm2-135m-instruct] [--setups ...]

Each setup trains 2 steps with a checkpoint at each (``benchmarks/checkpoint_worker.py``: launch/train.py with its
checkpoint functions timed), then resumes from checkpoint-1 on the process count that wrote it and, for the sharded
engines, on another (one process: DeepSpeed's shards through its universal checkpoint, FSDP2's read whole). The table
gives the checkpoint's size and file count, the save (of which the manifest: each file's SHA-256) and the loads (of
which the check against the manifest; on another count, of which DeepSpeed's universal conversion). "Before" (the
checkpoints of before the manifest and the check) is the save without the manifest and the load without the check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from zero_memory import write_pairs  # noqa: E402

# name: (accelerate config or None for one plain process, processes, LoRA, process count of the other-count resume)
SETUPS = {
    "one process": (None, 1, False, None),
    "DDP": ("ddp.yaml", 2, False, 1),
    "ZeRO-2": ("zero2.yaml", 2, False, 1),
    "ZeRO-3": ("zero3.yaml", 2, False, 1),
    "FSDP2": ("fsdp.yaml", 2, False, 1),
    "DDP LoRA": ("ddp.yaml", 2, True, 1),
    "ZeRO-3 LoRA": ("zero3.yaml", 2, True, 1),
}


def launch(config: str | None, processes: int, out: str, times: str, settings: list[str]) -> None:
    worker = os.path.join(ROOT, "benchmarks", "checkpoint_worker.py")
    command = [sys.executable, worker]
    if config:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   os.path.join(ROOT, "accelerate_configs", config), "--num_processes", str(processes), worker]
    result = subprocess.run(command + settings + [f"train.output_dir={out}"], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "CHECKPOINT_TIMES": times})
    if result.returncode != 0:
        sys.exit(f"{out} failed:\n{result.stderr[-3000:]}")


def read_times(path: str) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    if os.path.exists(path):
        for line in open(path):
            record = json.loads(line)
            found.setdefault(record["what"], []).append(record["seconds"])
    return found


def folder_size(path: str) -> tuple[int, int]:
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files]
    return sum(sizes), len(sizes)


def back_to_checkpoint_1(out: str) -> None:
    for name in os.listdir(out):
        if name.startswith("checkpoint-") and name != "checkpoint-1" or name in ("model", "abandoned"):
            shutil.rmtree(os.path.join(out, name))
    shutil.rmtree(os.path.join(out, "checkpoint-1", "universal"), ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m-instruct")
    parser.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="checkpoints-")
    data = os.path.join(work, "pairs.jsonl")
    write_pairs(data)
    rows = []
    for name in args.setups:
        config, processes, lora, other = SETUPS[name]
        out, times = os.path.join(work, name.replace(" ", "-")), os.path.join(work, name.replace(" ", "-") + ".jsonl")
        settings = [f"model.name_or_path={args.model}", f"data.source={data}", "data.eval_ratio=0.0",
                    f"lora.enabled={str(lora).lower()}", "train.max_steps=2", "train.save_every=1",
                    f"train.per_device_batch_size={4 // processes}", "train.eval_every=null",
                    "train.progress_bar=false", "train.plot=false", "train.single_device_fallback=false",
                    f"reference.cache_dir={work}/refcache", "data.max_length=64", "data.max_prompt_length=32"]
        launch(config, processes, out, times, settings)
        saved = read_times(times)
        size, files = folder_size(os.path.join(out, "checkpoint-1"))
        back_to_checkpoint_1(out)
        os.remove(times)
        launch(config, processes, out, times, settings)
        same = read_times(times)
        other_load = None
        if other:
            back_to_checkpoint_1(out)
            os.remove(times)
            launch(None if config in ("ddp.yaml", "fsdp.yaml") else config, other, out, times,
                   settings[:6] + [f"train.per_device_batch_size={4 // other}"] + settings[7:])
            other_load = read_times(times)
        rows.append((name, processes, size, files, saved, same, other, other_load))
        print(f"{name}: {size / 2**20:.0f} MiB, {files} files; save {saved['save'][0]:.2f} s; load "
              f"{same['load'][0]:.2f} s" + (f"; on {other}: {other_load['load'][0]:.2f} s" if other_load else ""),
              flush=True)
    print("\n| setup | checkpoint | save: before -> after (manifest) | load, same count: before -> after (check) | "
          "load, another count (of which universal) |")
    print("|---|---|---|---|---|")
    for name, processes, size, files, saved, same, other, other_load in rows:
        save, manifest = saved["save"][0], saved["manifest"][0]
        load, verify = same["load"][0], sum(same.get("verify", [0.0]))
        cell = "-"
        if other_load:
            converted = other_load.get("universal")
            cell = (f"{processes} -> {other}: {other_load['load'][0]:.2f} s"
                    + (f" ({converted[0]:.2f} s)" if converted else ""))
        print(f"| {name} ({processes} process{'es' * (processes > 1)}) | {size / 2**20:.0f} MiB, {files} files | "
              f"{save - manifest:.2f} -> {save:.2f} s (+{manifest:.2f}) | {load:.2f} -> {load + verify:.2f} s "
              f"(+{verify:.2f}) | {cell} |")


if __name__ == "__main__":
    main()
