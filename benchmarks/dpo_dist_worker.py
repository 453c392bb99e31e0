"""One dpo-dist training run for benchmarks/vs_trl.py: the real trainer (``dpo_dist.train.trainer.train``), one process.

    python benchmarks/dpo_dist_worker.py SPEC.json RESULT.json

The pairs are the spec's text pairs (tokenized by dpo-dist exactly as the harness tokenized them for TRL); the LoRA
weights start from the spec's initial adapter, as TRL's do; extra ``section.key=value`` overrides select the levers.
"""

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(spec_path: str, result_path: str) -> None:
    spec = json.load(open(spec_path))
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    import dpo_dist.train.trainer as trainer
    from dpo_dist.config import load_config

    load_policy, train_step = trainer.load_policy, trainer.train_step

    def load_with_initial_adapter(cfg, device, *args):
        model, tokenizer = load_policy(cfg, device, *args)
        set_peft_model_state_dict(model, load_file(spec["init_adapter"]))
        return model, tokenizer

    def first_step_resets_peak(*args, **kwargs):
        if not getattr(first_step_resets_peak, "done", False):
            with open("/proc/self/clear_refs", "w") as handle:  # training-phase peak from here
                handle.write("5")
            first_step_resets_peak.done = True
        return train_step(*args, **kwargs)

    trainer.load_policy, trainer.train_step = load_with_initial_adapter, first_step_resets_peak
    out = os.path.join(spec["work"], f"dpo-out-{spec['label']}")
    overrides = {
        "model.name_or_path": spec["model"], "model.dtype": "float32", "data.source": spec["text_pairs"],
        "data.eval_ratio": 0.0, "data.max_length": spec["max_length"], "data.max_prompt_length": spec["max_prompt_length"],
        "lora.r": 16, "lora.alpha": 32, "lora.dropout": 0.0, "loss.beta": spec["beta"],
        "train.per_device_batch_size": spec["batch"], "train.gradient_accumulation_steps": 1,
        "train.max_steps": spec["steps"], "train.learning_rate": spec["lr"], "train.lr_scheduler": "constant",
        "train.warmup_ratio": 0.0, "train.weight_decay": 0.0, "train.max_grad_norm": 1.0, "train.seed": spec["seed"],
        "train.output_dir": out, "train.progress_bar": False, "train.plot": False, "train.resume": "never",
        "train.cpu_threads": spec["threads"], "reference.cache_dir": os.path.join(spec["work"], "dpo-refcache"),
        **spec["overrides"],
    }
    started = time.perf_counter()
    trainer.train(load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()]))
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    json.dump({
        "system": f"dpo-dist {spec['label']}", "step_times": [r["step_time_s"] for r in records],
        "losses": [r["loss"] for r in records], "setup_and_train_s": time.perf_counter() - started,
        "train_peak_rss_gb": int(status["VmHWM"].split()[0]) / 2**20,
        "process_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }, open(result_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
