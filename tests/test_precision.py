"""Precision: model.dtype bf16/fp16 trains in mixed precision (fp32 weights, autocast, a GradScaler for fp16), so an
update below half-precision resolution is not rounded away, and step 1 is still ln 2.

CPU autocast runs both bf16 and fp16; accelerate leaves fp16 off on CPU, which ``build_accelerator`` switches on.
"""

import contextlib
import io
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from dpo_dist.config import load_config
from dpo_dist.model.load import resolve_precision
from dpo_dist.train.checks import TrainingError, check_launch_precision, check_step
from training import assert_same_trajectory, reset_accelerate_state, run

LR = 1e-7  # AdamW's first step moves every weight by about lr: far below half a bf16 (6e-5) or fp16 (8e-6) ulp at 0.02
HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest.py


@pytest.fixture(scope="module")
def one_step(tiny_model_dir, data_file, tmp_path_factory):
    """One full fine-tuning step at lr 1e-7 in each model.dtype, with a checkpoint: (record, output folder, stdout)."""
    out = {}
    for dtype in ("float32", "bfloat16", "float16"):
        folder = tmp_path_factory.mktemp(dtype) / "out"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            records = run(tiny_model_dir, data_file, folder, **{
                "model.dtype": dtype, "train.learning_rate": LR, "train.max_steps": 1, "train.save_every": 1})["records"]
        reset_accelerate_state()
        out[dtype] = (records[0], folder, printed.getvalue())
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_an_update_below_half_precision_resolution_moves_the_fp32_weights(dtype, one_step, tiny_model_dir):
    """The weights stay fp32 and take AdamW's ~1e-7 step; held in bf16/fp16, >90% of them could not have moved: the
    updated value rounds back to the initial one. (The code before this test, which loaded and stepped bf16/fp16
    weights, failed it: 0.1% of the bf16 weights moved; in fp16, AdamW's eps underflowed and 98.8% became inf/NaN.)"""
    _, out, printed = one_step[dtype]
    short = {"bfloat16": "bf16", "float16": "fp16"}[dtype]
    assert f"precision: fp32 weights, {short} autocast (mixed precision" in printed
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    assert {after[name].dtype for name in before} == {torch.float32}
    initial = torch.cat([w.flatten() for w in before.values()])
    updated = torch.cat([after[name].flatten() for name in before])
    step = (updated - initial).abs()
    assert step.max().item() < 1.25 * LR  # |lr * m / (sqrt(v) + eps)| <= lr at step 1, plus fp32 rounding near 1.0
    assert (step > LR / 2).float().mean() > 0.9  # nearly every weight took the step
    moved = step > LR / 2
    rounded_away = updated[moved].to(HALF[dtype]) == initial[moved].to(HALF[dtype])
    assert rounded_away.float().mean() > 0.9


@pytest.mark.parametrize("dtype, logps_atol, grad_atol", [("bfloat16", 3e-3, 3e-4), ("float16", 3e-4, 5e-5)])
def test_first_step_under_autocast_is_ln2_and_matches_fp32(dtype, logps_atol, grad_atol, one_step):
    """The reference was precomputed under the policy's autocast, so step 1 is ln 2 as tightly as in fp32 (measured:
    |loss - ln 2| 2e-9 bf16, 9e-8 fp16). Log-probs (sums over ~10 response tokens, about -45) and the gradient norm
    differ from fp32 by the autocast rounding: measured 3.4e-4 / 2.4e-5 (bf16) and 1.6e-5 / 5e-6 (fp16), checked
    with about 10x margin."""
    first, fp32 = one_step[dtype][0], one_step["float32"][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected"):
        assert abs(first[key]) < 1e-5
    for key in ("logps/chosen", "logps/rejected"):
        assert first[key] == pytest.approx(fp32[key], abs=logps_atol), key
        assert first[key] != fp32[key], "autocast changes the numbers; equal would mean it never ran"
    assert first["grad_norm"] == pytest.approx(fp32["grad_norm"], abs=grad_atol)


def test_fp16_scales_the_loss_with_a_grad_scaler(one_step):
    """fp16 has a GradScaler (its state is checkpointed beside the optimizer's) at the initial scale 2^16: step 1 did
    not overflow, and its update was applied (the previous test saw the weights move). bf16 and fp32 have none."""
    _, out, printed = one_step["float16"]
    assert "GradScaler loss scaling" in printed
    scaler = torch.load(out / "checkpoint-1" / "scaler.pt", weights_only=True)
    assert scaler["scale"] == 2.0**16
    for dtype in ("float32", "bfloat16"):
        assert not os.path.exists(one_step[dtype][1] / "checkpoint-1" / "scaler.pt")
    assert "precision: fp32 weights and compute" in one_step["float32"][2]


def test_an_fp16_overflow_skips_the_update_and_training_goes_on(tiny_model_dir, data_file, tmp_path, monkeypatch):
    """A loss scale of 2^40 overflows the fp16 gradients: each step's update is skipped and the scale halved, which
    is routine for fp16 (not an error); the weights do not move, and step 2 is still ln 2."""
    from accelerate.utils import GradScalerKwargs

    from dpo_dist.train import trainer

    real = trainer.build_accelerator
    monkeypatch.setattr(trainer, "build_accelerator",
                        lambda **kwargs: real(**kwargs, kwargs_handlers=[GradScalerKwargs(init_scale=2.0**40)]))
    out = tmp_path / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        records = run(tiny_model_dir, data_file, out, **{"model.dtype": "float16", "train.max_steps": 2,
                                                        "train.save_every": 2})["records"]
    assert [r["step"] for r in records] == [1, 2] and not any(math.isfinite(r["grad_norm"]) for r in records)
    assert printed.getvalue().count("the loss scaler skipped this update and lowered the scale") == 2
    assert records[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert torch.load(out / "checkpoint-2" / "scaler.pt", weights_only=True)["scale"] == 2.0**38
    before = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    after = load_file(str(out / "model" / "model.safetensors"))
    for name, weight in before.items():
        torch.testing.assert_close(after[name], weight, rtol=0, atol=0)


def test_online_reference_under_autocast_equals_precomputed(tiny_model_dir, data_file, tmp_path):
    """Full fine-tuning in bf16 with the online reference: the frozen fp32 copy runs under the policy's autocast,
    so step 1 is ln 2 and the run follows the precomputed one (measured: step 1 identical; after it, bf16 rounding
    of differently shaped batches, at most 2.5e-5 on the eval log-prob sums of about -45)."""
    extra = {"model.dtype": "bfloat16", "train.max_steps": 4}
    precomputed = run(tiny_model_dir, data_file, tmp_path / "pre", **extra)["records"]
    reset_accelerate_state()
    online = run(tiny_model_dir, data_file, tmp_path / "on", **extra, **{"reference.mode": "online"})["records"]
    assert online[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert_same_trajectory(precomputed, online, atol=1e-4)


def config(dtype, lora):
    """``lora``: False (full fine-tuning), True, or "4bit" (QLoRA)."""
    quantization = lora if isinstance(lora, str) else "none"
    return load_config(None, [f"model.dtype={dtype}", f"lora.enabled={str(bool(lora)).lower()}",
                              f"model.quantization={quantization}"])


@pytest.mark.parametrize("dtype, lora, deepspeed, expected", [
    ("float32", False, False, (torch.float32, torch.float32, "no", "precision: fp32 weights and compute")),
    ("bfloat16", False, False, (torch.bfloat16, torch.float32, "bf16", "precision: fp32 weights, bf16 autocast (mixed precision)")),
    ("float16", False, False, (torch.float16, torch.float32, "fp16",
                               "precision: fp32 weights, fp16 autocast (mixed precision, GradScaler loss scaling)")),
    ("bfloat16", True, False, (torch.bfloat16, torch.bfloat16, "no",
                               "precision: frozen base in bf16, LoRA adapters in fp32, bf16 compute")),
    ("float16", True, False, (torch.float16, torch.float16, "fp16", "precision: frozen base in fp16, LoRA adapters in "
                              "fp32, fp16 autocast (mixed precision, GradScaler loss scaling)")),
    ("float16", "4bit", False, (torch.float16, torch.float16, "fp16", "precision: frozen base of 4-bit NF4 (bitsandbytes, "
                                "double quantization) linear layers and fp16 embeddings, norms and LM head; LoRA "
                                "adapters in fp32; fp16 autocast (mixed precision, GradScaler loss scaling)")),
    ("float32", "4bit", False, (torch.float32, torch.float32, "no", "precision: frozen base of 4-bit NF4 (bitsandbytes, "
                                "double quantization) linear layers and fp32 embeddings, norms and LM head; LoRA "
                                "adapters in fp32; fp32 compute")),  # on CPU: no 'fp32 weights and compute'
    ("bfloat16", "8bit", False, (torch.bfloat16, torch.bfloat16, "no", "precision: frozen base of 8-bit (bitsandbytes "
                                 "LLM.int8) linear layers and bf16 embeddings, norms and LM head; LoRA adapters in "
                                 "fp32; bf16 compute")),
    ("bfloat16", False, True, (torch.bfloat16, torch.bfloat16, "no", "precision: bf16 weights and compute, fp32 master "
                               "weights in DeepSpeed's optimizer (its bf16 section)")),
    ("float16", True, True, (torch.float16, torch.float16, "no", "precision: fp16 weights and compute, fp32 master "
                             "weights in DeepSpeed's optimizer (its fp16 section, dynamic loss scaling)")),
])
def test_what_each_model_dtype_trains_in(dtype, lora, deepspeed, expected):
    """(compute, weights, the Accelerator's mixed_precision, the log line): full fine-tuning keeps fp32 weights under
    autocast, LoRA keeps the frozen base in the half dtype, DeepSpeed's own bf16/fp16 section keeps fp32 masters."""
    precision = resolve_precision(config(dtype, lora), torch.device("cpu"), deepspeed=deepspeed)
    assert (precision.compute, precision.weights, precision.mixed_precision, precision.said) == expected


@pytest.mark.parametrize("bf16_supported, expected", [(True, ("bf16", torch.float32)), (False, ("fp16", torch.float32))])
def test_auto_on_a_gpu(bf16_supported, expected, monkeypatch):
    """model.dtype=auto on a GPU (simulated): bf16 where it has it, else fp16, either one in mixed precision; CPU: fp32."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_supported)
    precision = resolve_precision(config("auto", False), torch.device("cuda"), deepspeed=False)
    assert (precision.mixed_precision, precision.weights) == expected
    assert resolve_precision(config("auto", False), torch.device("cpu"), deepspeed=False).mixed_precision == "no"


def test_accelerate_launch_precision_must_agree_with_model_dtype():
    check_launch_precision("no", torch.bfloat16)  # the shipped configs: model.dtype decides
    check_launch_precision("bf16", torch.bfloat16)
    with pytest.raises(TrainingError, match=r"asks for mixed precision bf16 .* model.dtype resolves to float32: .*"
                                            r"set model.dtype=bfloat16, or launch with --mixed_precision no"):
        check_launch_precision("bf16", torch.float32)
    with pytest.raises(TrainingError, match=r"mixed precision fp8 .* trains in float32, bfloat16 or float16"):
        check_launch_precision("fp8", torch.bfloat16)


def test_a_finite_step_and_an_fp16_overflow_go_on():
    """An fp16 step whose loss is finite but whose scaled gradients overflowed was skipped by the loss scaler: routine,
    a line for the log. Without loss scaling, the same numbers stop the run (next test)."""
    cfg = load_config(None, [])
    assert check_step(3, {"loss": 0.69, "grad_norm": 1.0}, applied=True, loss_scaling=False, cfg=cfg) is None
    said = check_step(3, {"loss": 0.69, "grad_norm": math.inf}, applied=False, loss_scaling=True, cfg=cfg)
    assert said == ("step 3: the fp16 gradients overflowed at the current loss scale; the loss scaler skipped this "
                    "update and lowered the scale")


@pytest.mark.parametrize("record, applied, loss_scaling, message", [
    ({"loss": 0.69, "grad_norm": math.inf}, False, False, r"non-finite grad_norm at step 3 .*stopped before applying"),
    ({"loss": math.nan, "grad_norm": math.nan}, False, True, r"non-finite loss at step 3 .*stopped before "
                                                             r"applying it\. Last checkpoint: .*checkpoint-2"),
    ({"loss": 0.69, "grad_norm": math.nan}, True, False, r"DeepSpeed applied this update before it could be checked .*"
                                                         r"Last checkpoint: .*checkpoint-2"),
], ids=["inf-gradients", "nan-loss", "deepspeed-applied"])
def test_a_non_finite_step_stops_saying_whether_its_update_was_applied(record, applied, loss_scaling, message,
                                                                       tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "trainer_state.json").write_text("{}")
    cfg = load_config(None, [f"train.output_dir={tmp_path}"])
    with pytest.raises(TrainingError, match=message):
        check_step(3, record, applied=applied, loss_scaling=loss_scaling, cfg=cfg)
