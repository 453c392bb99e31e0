"""The training config owns DeepSpeed's batch, accumulation, clipping and precision; what cannot work stops at start."""

from types import SimpleNamespace

import pytest
import torch

from dpo_dist.config import load_config
from dpo_dist.distributed import DeepSpeedConfigError, configure_deepspeed
from dpo_dist.train.checks import TrainingError, check_combination


def fake_accelerator(ds_config, processes=2, accumulation=2):
    plugin = SimpleNamespace(deepspeed_config=ds_config)
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin), num_processes=processes,
                           gradient_accumulation_steps=accumulation)


def configure(ds_config, **kwargs):
    args = dict(per_device_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=0.5, dtype=torch.float32)
    args.update(kwargs)
    return configure_deepspeed(fake_accelerator(ds_config), **args)


def test_auto_and_missing_values_are_filled_from_the_training_config():
    config = configure({"train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
                        "zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}})
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_accumulation_steps"] == 2
    assert config["train_batch_size"] == 16 and config["gradient_clipping"] == 0.5
    assert config["bf16"]["enabled"] is False and config["fp16"]["enabled"] is False
    assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert configure({}, dtype=torch.bfloat16)["bf16"]["enabled"] is True
    # what accelerate writes for mixed_precision "no" (the shipped ZeRO configs): bf16 weights on a GPU still train
    accelerate_no = {"bf16": {"enabled": False}, "fp16": {"enabled": False}}
    assert configure(accelerate_no, dtype=torch.bfloat16)["bf16"]["enabled"] is True
    assert configure(accelerate_no, dtype=torch.bfloat16)["fp16"]["enabled"] is False
    assert configure({}, max_grad_norm=None)["gradient_clipping"] == 0.0
    assert configure_deepspeed(SimpleNamespace(state=SimpleNamespace()), per_device_batch_size=1,
                               gradient_accumulation_steps=1, max_grad_norm=1.0, dtype=torch.float32) is None


@pytest.mark.parametrize(
    "ds_config, message",
    [
        ({"gradient_clipping": 1.0}, r"sets gradient_clipping=1.0, the training config train.max_grad_norm gives 0.5"),
        ({"train_micro_batch_size_per_gpu": 8}, r"train_micro_batch_size_per_gpu=8.*train.per_device_batch_size gives 4"),
        ({"gradient_accumulation_steps": 1}, r"gradient_accumulation_steps=1.*gives 2"),
        ({"bf16": {"enabled": True}}, r"bf16.enabled=True but model.dtype resolves to torch.float32"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": False}}, r"fp16.enabled=True but model.dtype resolves"),
    ],
)
def test_a_forced_mismatch_is_an_error(ds_config, message):
    with pytest.raises(DeepSpeedConfigError, match=message):
        configure(ds_config)


def test_accelerate_launch_accumulation_must_agree():
    with pytest.raises(DeepSpeedConfigError, match="accelerate launch set gradient accumulation to 2"):
        configure_deepspeed(fake_accelerator({}, accumulation=2), per_device_batch_size=4,
                            gradient_accumulation_steps=4, max_grad_norm=1.0, dtype=torch.float32)


@pytest.mark.parametrize(
    "stage, overrides, message",
    [
        (2, ["model.quantization=4bit"], r"cannot be sharded by DeepSpeed ZeRO-2: launch without a DeepSpeed config"),
        (3, ["model.quantization=8bit"], r"cannot be sharded by DeepSpeed ZeRO-3: launch without a DeepSpeed config"),
    ],
)
def test_combinations_that_cannot_work_name_the_fix(stage, overrides, message):
    with pytest.raises(TrainingError, match=message):
        check_combination(load_config(None, overrides), stage)
    check_combination(load_config(None, overrides), 0)  # fine without DeepSpeed
    check_combination(load_config(None, []), 3)  # the defaults (the built-in sentiment set) under ZeRO-3
