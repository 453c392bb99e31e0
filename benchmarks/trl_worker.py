"""One TRL DPOTrainer run for benchmarks/vs_trl.py; runs in the benchmark's own environment (the one with trl).

    python benchmarks/trl_worker.py SPEC.json RESULT.json

SPEC (written by vs_trl.py) names the model folder, the pre-tokenized pairs in step order, the initial LoRA
weights and the training settings. TRL gets exactly dpo-dist's tokens (its own tokenization is bypassed), takes the
pairs in the given order (no shuffling), starts from the same LoRA weights, and uses its fastest setting that works
here: the reference log-probs precomputed before training (no reference forward in a step). Its LM head is TRL's own
fused head (log-probs of the labelled positions only, in tiles).
"""

import json
import resource
import sys
import time


def main(spec_path: str, result_path: str) -> None:
    spec = json.load(open(spec_path))
    import torch
    from datasets import Dataset
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(spec["threads"])
    rows = [json.loads(line) for line in open(spec["pairs"])]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)

    # Bypass TRL's tokenization (the tokens are dpo-dist's, identical for both) and its shuffling (the order is given).
    DPOTrainer._prepare_dataset = lambda self, dataset, *args, **kwargs: dataset
    DPOTrainer._get_train_sampler = lambda self, *args, **kwargs: SequentialSampler(self.train_dataset)

    times, losses = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                with open("/proc/self/clear_refs", "w") as handle:  # training-phase peak from here
                    handle.write("5")
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.started)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    config = DPOConfig(
        output_dir=spec["work"] + "/trl-out", per_device_train_batch_size=spec["batch"], gradient_accumulation_steps=1,
        max_steps=spec["steps"], learning_rate=spec["lr"], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=spec["beta"], loss_type=["sigmoid"], max_length=spec["max_length"],
        precompute_ref_log_probs=True, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
        fp16=False, dataloader_num_workers=0, seed=spec["seed"], disable_dropout=True, gradient_checkpointing=False,
    )
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    setup_started = time.perf_counter()
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[Timer()])
    set_peft_model_state_dict(trainer.model, load_file(spec["init_adapter"]))
    trainer.train()
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    json.dump({
        "system": "trl", "step_times": times, "losses": losses,
        "setup_and_train_s": time.perf_counter() - setup_started,
        "train_peak_rss_gb": int(status["VmHWM"].split()[0]) / 2**20,
        "process_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }, open(result_path, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
