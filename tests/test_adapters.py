"""peft's adapter options (lora.use_dora, use_rslora, init_lora_weights, modules_to_save, layers_to_transform): each
builds the policy it names, trains, resumes exactly and exports and merges exactly, with QLoRA where peft allows it;
what cannot be made exact is refused with the reason (dpo_dist/config.py, dpo_dist/model/adapters.py).

PiSSA and OLoRA move part of each weight into the adapter: their reference is the policy as initialized (not the
residual base with adapters off), a resume must rebuild the same residual, and the export is a plain LoRA adapter on
the unmodified base. The training runs are shared (``adapter_run``): each test checks one thing of them."""

import functools
import importlib.util
import math
import os
import shutil
import subprocess

import pytest
import torch

from dpo_dist.config import ConfigError, load_config
from training import (ROOT, accelerate_launch, assert_same_reference_caches, assert_same_trajectory, copy_run,
                      overrides, read_jsonl, reset_accelerate_state, run)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")  # conftest.py
IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])


# -- what is refused, and why (before anything loads) -------------------------------------------------------------

REFUSED = [
    (["lora.init_lora_weights=loftq"], "lora.init_lora_weights=loftq is not offered: peft 0.21's LoftQ computes on "
                                       "CUDA/XPU only"),
    (["lora.init_lora_weights=false"], "lora.init_lora_weights=false is not offered: the adapter would start as random"),
    (["lora.init_lora_weights=eva"], "EVA initializes from activations on training data"),
    (["lora.init_lora_weights=pissa_niter_0"], "'pissa_niter_0' is not one of true, gaussian, pissa, pissa_niter_<N>, "
                                               "olora"),
    (["lora.init_lora_weights=pissa", "model.quantization=4bit"],
     "lora.init_lora_weights=pissa needs model.quantization=none: it moves part of each full-precision weight"),
    (["lora.init_lora_weights=olora", "model.quantization=8bit"], "OLoRA would quantize the residual a second time"),
    (["lora.init_lora_weights=pissa_niter_4", "reference.mode=online"],
     "the online reference (the policy with its adapters off) would not be the starting model: set "
     "reference.mode=precomputed"),
    (["lora.use_dora=true", "model.quantization=8bit"], "lora.use_dora=true cannot train on an 8-bit base"),
    (["lora.use_dora=true", "lora.enabled=false"], "lora.use_dora applies to LoRA adapters: set lora.enabled=true"),
    (["lora.modules_to_save=[lm_head]", "lora.enabled=false"], "lora.modules_to_save applies to LoRA adapters"),
    (["lora.layers_pattern=layers"], "lora.layers_pattern names the list of layers lora.layers_to_transform picks"),
    (["lora.layers_to_transform=[1]", "lora.target_modules=q_proj"],
     "lora.layers_to_transform needs lora.target_modules all-linear or a list of names"),
    (["lora.layers_to_transform=[-1]"], "lora.layers_to_transform must be layer indices (0 or more)"),
]


@pytest.mark.parametrize("given, message", REFUSED, ids=[" ".join(case[0]) for case in REFUSED])
def test_refused_combinations_say_why_and_what_to_use(given, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, given)
    assert message in str(error.value)


def test_the_sharding_engines_refuse_pissa_and_olora_and_train_dora():
    """PiSSA/OLoRA under ZeRO-3 or FSDP2 stop at launch; DoRA trains under both (the launches below)."""
    from dpo_dist.train.checks import TrainingError, check_combination

    for init in ("pissa", "pissa_niter_2", "olora"):
        cfg = load_config(None, [f"lora.init_lora_weights={init}"])
        for stage, fsdp, engine in ((3, 0, "DeepSpeed ZeRO-3"), (0, 2, "FSDP2")):
            with pytest.raises(TrainingError, match=f"lora.init_lora_weights={init} cannot train under {engine}: the "
                                                    "residual base is computed while the weights load"):
                check_combination(cfg, stage, fsdp)
        check_combination(cfg, 0, 0)
        check_combination(cfg, 2, 0)
    dora = load_config(None, ["lora.use_dora=true", "lora.use_rslora=true", "lora.modules_to_save=[lm_head]"])
    for stage, fsdp in ((3, 0), (0, 2)):
        check_combination(dora, stage, fsdp)


# -- the policy each option builds (in process, no training) -----------------------------------------------------

def policy(model_dir, *given, seed=0):
    from accelerate.utils import set_seed

    from dpo_dist.model.load import load_policy

    set_seed(seed)  # as the trainer does before loading: a randomized initialization draws from it
    model, _ = load_policy(load_config(None, [f"model.name_or_path={model_dir}", *given]), torch.device("cpu"))
    return model.eval()


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@functools.cache
def base_logits(model_dir):
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(model_dir).eval())


def test_dora_trains_magnitudes_and_never_takes_the_fast_lora_path(tiny_model_dir):
    """DoRA's layers run peft's own forward: the fused LoRA function computes plain LoRA only, so no DoRA layer is
    routed through it or grouped with its siblings; the plain policy has every layer routed."""
    from dpo_dist.model.lora_linear import _fused_forward, _grouped_forward, fuse_lora, group_lora

    def routed(model):
        return [n for n, m in lora_layers(model).items()
                if getattr(m.forward, "__func__", None) in (_fused_forward, _grouped_forward)]

    dora = policy(tiny_model_dir, "lora.use_dora=true")
    magnitudes = [n for n, p in dora.named_parameters() if "lora_magnitude_vector" in n and p.requires_grad]
    assert len(lora_layers(dora)) == len(magnitudes) == 14
    assert routed(dora) == [] and fuse_lora(dora) == 0 and group_lora(dora) == 0
    assert len(routed(policy(tiny_model_dir))) == 14
    torch.testing.assert_close(logits(dora), base_logits(tiny_model_dir), atol=1e-6, rtol=0)  # starts at the base


def test_rslora_scales_by_the_square_root_of_the_rank(tiny_model_dir):
    for given, scale in ((["lora.use_rslora=true"], 32 / math.sqrt(16)), ([], 32 / 16)):
        layers = lora_layers(policy(tiny_model_dir, *given))
        assert {layer.scaling["default"] for layer in layers.values()} == {scale}


@pytest.mark.parametrize("given, layers", [(["lora.layers_to_transform=1"], {1}),
                                           (["lora.layers_to_transform=[0]", "lora.layers_pattern=layers"], {0}),
                                           (["lora.layers_to_transform=[0, 1]", "lora.target_modules=[q_proj]"], {0, 1})])
def test_layers_to_transform_adapts_those_layers_only(tiny_model_dir, given, layers):
    """With target_modules all-linear too (peft takes layer indices only with a list of module names: the loader
    spells all-linear out)."""
    adapted = lora_layers(policy(tiny_model_dir, *given))
    assert {int(name.split(".layers.")[1].split(".")[0]) for name in adapted} == layers
    per_layer = 1 if "lora.target_modules=[q_proj]" in given else 7
    assert len(adapted) == per_layer * len(layers)


def test_modules_to_save_trains_a_copy_and_the_reference_keeps_the_original(tiny_model_dir):
    """lm_head on a model whose embeddings are tied (as SmolLM2's): one trained copy serves both (peft's
    ensure_weight_tying), the original stays frozen, and with the adapters off the model is the base."""
    from dpo_dist.train.reference import as_reference

    model = policy(tiny_model_dir, "lora.modules_to_save=[lm_head]")
    inner = model.base_model.model
    assert inner.get_input_embeddings().weight is inner.get_output_embeddings().weight
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {"base_model.model.model.embed_tokens.modules_to_save.default.weight"}
    with torch.no_grad():
        inner.get_output_embeddings().weight.add_(0.5)  # as training would move it
    moved = logits(model)
    assert (moved - base_logits(tiny_model_dir)).abs().max() > 1e-2
    with as_reference(model):
        torch.testing.assert_close(logits(model), base_logits(tiny_model_dir), atol=1e-6, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_pissa_and_olora_start_at_the_base_with_the_residual_in_their_base_weights(tiny_model_dir, init):
    """The policy as initialized computes the base (to fp32 rounding); with its adapters off it computes the residual
    W - s B0 A0, which is not the base, so the reference is the policy as initialized. The same seed rebuilds the same
    residual bit for bit (its digest); only the randomized SVD depends on the seed."""
    from dpo_dist.model.adapters import reference_adapters_off, starting_model
    from dpo_dist.train.reference import as_reference

    model = policy(tiny_model_dir, f"lora.init_lora_weights={init}")
    torch.testing.assert_close(logits(model), base_logits(tiny_model_dir), atol=1e-5, rtol=0)
    with model.disable_adapter():
        assert (logits(model) - base_logits(tiny_model_dir)).abs().max() > 1e-2
    assert not reference_adapters_off(model)
    with as_reference(model):
        reference = logits(model)
    assert torch.equal(reference, logits(model))
    start = starting_model(model)
    assert start.initialization == init and len(start.adapter) == 28
    assert starting_model(policy(tiny_model_dir, f"lora.init_lora_weights={init}")).digest == start.digest
    other_seed = starting_model(policy(tiny_model_dir, f"lora.init_lora_weights={init}", seed=1)).digest
    assert (other_seed != start.digest) == (init == "pissa_niter_2")


# -- training, resume, export and merge (shared in-process runs) ---------------------------------------------------

RUNS = {
    "rslora-lm_head-layer1-gaussian": {"lora.use_rslora": True, "lora.modules_to_save": ["lm_head"],
                                       "lora.layers_to_transform": [1], "lora.init_lora_weights": "gaussian"},
    "pissa_niter-dora-rslora-lm_head": {"lora.init_lora_weights": "pissa_niter_2", "lora.use_dora": True,
                                        "lora.use_rslora": True, "lora.modules_to_save": ["lm_head"]},
    "olora": {"lora.init_lora_weights": "olora"},
}
# DoRA alone trains on a 4-bit base and under ZeRO-3 and FSDP2 below; its resume and export are checked here with PiSSA.
# 4 steps, checkpoints at 2 and 4 (the resume goes back to 2), a learning rate that moves every trainable weight
SETTINGS = {"lora.enabled": True, "train.max_steps": 4, "train.save_every": 2, "train.keep_last": 3,
            "train.learning_rate": 1e-2}


@pytest.fixture(scope="module")
def adapter_run(tiny_model_dir, data_file, tmp_path_factory):
    """``adapter_run(name)``: the records and output folder of the in-process run of ``RUNS[name]``, trained once."""
    @functools.cache
    def get(name):
        out = tmp_path_factory.mktemp(name) / "out"
        reset_accelerate_state()
        records = run(tiny_model_dir, data_file, out, **SETTINGS, **RUNS[name])["records"]
        reset_accelerate_state()
        return records, out

    return get


def initial_policy(out):
    """The policy the run at ``out`` started from, rebuilt from its config.yaml as the trainer builds it (the same
    seed: the same residual)."""
    from accelerate.utils import set_seed

    from dpo_dist.model.load import load_policy

    cfg = load_config(os.path.join(out, "config.yaml"))
    set_seed(cfg.train.seed)
    return load_policy(cfg, torch.device("cpu"))[0].eval()


def trained_policy(out, step):
    """The policy the run at ``out`` held after ``step``: its initial policy with the adapter-only checkpoint's
    weights loaded; and those weights."""
    from safetensors.torch import load_file

    model = initial_policy(out)
    state = load_file(os.path.join(out, f"checkpoint-{step}", "model.safetensors"))
    assert set(state) == {n for n, p in model.named_parameters() if p.requires_grad}
    model.load_state_dict(state, strict=False)
    return model, state


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_each_option_trains_every_trainable_weight_from_ln2(name, adapter_run, tiny_model_dir):
    records, out = adapter_run(name)
    losses = [r["loss"] for r in records]
    assert abs(losses[0] - math.log(2)) < 1e-6, losses  # reference = the starting model, PiSSA/OLoRA included
    assert losses[-1] < losses[0] - 0.01, losses
    _, state = trained_policy(out, 4)
    initial = {n: p for n, p in initial_policy(out).named_parameters() if p.requires_grad}
    assert set(initial) == set(state)
    assert all((state[n] - initial[n]).abs().max() > 0 for n in state), "every trainable weight moved"
    kinds = {n.split(".")[-3] if "lora_" in n else "modules_to_save" for n in state}
    expected = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if RUNS[name].get("lora.use_dora") else set()) | (
        {"modules_to_save"} if RUNS[name].get("lora.modules_to_save") else set())
    assert kinds == expected, kinds
    if "lora.layers_to_transform" in RUNS[name]:
        assert all(".layers.1." in n for n in state if "lora_" in n)


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_a_resumed_run_repeats_the_uninterrupted_steps(name, adapter_run, tiny_model_dir, data_file, tmp_path, capsys):
    """The run taken back to checkpoint-2 and resumed: steps 3 and 4 repeat exactly. PiSSA/OLoRA rebuild their
    residual base from the pretrained weights, checked bit for bit against the one the run started from."""
    records, whole = adapter_run(name)
    out = tmp_path / "out"
    copy_run(whole, out)
    for later in ("checkpoint-4", "model"):
        shutil.rmtree(out / later)
    capsys.readouterr()
    run(tiny_model_dir, data_file, out, **SETTINGS, **RUNS[name])
    assert f"resumed from {out}/checkpoint-2 at step 2" in capsys.readouterr().out
    assert_same_trajectory(records, read_jsonl(out / "metrics.jsonl"), atol=1e-6)
    torch.testing.assert_close(exported_logits(tiny_model_dir, out / "model"),
                               exported_logits(tiny_model_dir, whole / "model"), atol=1e-6, rtol=0)


def exported_logits(model_dir, folder, off=False):
    """The logits of the adapter in ``folder`` loaded onto the pretrained base, as evaluation, chat and merging load
    it (with ``off``: its adapters disabled)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(folder)).eval()
    if not off:
        return logits(model)
    with model.disable_adapter():
        return logits(model)


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_the_export_and_the_merge_compute_the_trained_policy(name, adapter_run, tiny_model_dir, tmp_path):
    """model/ loaded on the pretrained base, a checkpoint's export and the merged model all give the logits of the
    policy as it trained; with its adapters off the export is the pretrained base (for PiSSA/OLoRA too: their export
    is a plain LoRA adapter of rank 2r on the unmodified base)."""
    import json

    from transformers import AutoModelForCausalLM

    from dpo_dist.publish.export import export_checkpoint, merge_adapter

    _, whole = adapter_run(name)
    out = tmp_path / "out"
    copy_run(whole, out)
    model, _ = trained_policy(out, 4)
    want = logits(model)
    assert (want - base_logits(tiny_model_dir)).abs().max() > 1e-2, "training moved the model"
    torch.testing.assert_close(exported_logits(tiny_model_dir, out / "model"), want, atol=1e-5, rtol=0)
    assert torch.equal(exported_logits(tiny_model_dir, out / "model", off=True), base_logits(tiny_model_dir))
    torch.testing.assert_close(exported_logits(tiny_model_dir, export_checkpoint(str(out / "checkpoint-4"))), want,
                               atol=1e-5, rtol=0)
    merge_adapter(str(out), str(tmp_path / "merged"), dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    torch.testing.assert_close(logits(merged), want, atol=1e-5, rtol=0)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in merged.named_parameters())
    with open(out / "model" / "adapter_config.json") as handle:
        config = json.load(handle)
    mutated = RUNS[name].get("lora.init_lora_weights") in ("pissa_niter_2", "olora")
    assert (config["r"], config["init_lora_weights"]) == ((32, True) if mutated else (16, RUNS[name].get(
        "lora.init_lora_weights", True)))
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])
    assert scale == pytest.approx(32 / (4 if config["use_rslora"] else 16))  # the run's scale, kept


@pytest.mark.slow
def test_pissas_reference_is_the_starting_model_and_keyed_apart(adapter_run):
    """The precomputed reference of a PiSSA run (the policy as initialized) is the base's log-probs, as a run's whose
    base is unchanged (adapters off: the base itself) are, to fp32 rounding; its cache key includes the starting
    model's digest, so the two are cached apart."""
    _, pissa = adapter_run("pissa_niter-dora-rslora-lm_head")
    _, plain = adapter_run("rslora-lm_head-layer1-gaussian")
    assert_same_reference_caches(f"{plain}-refcache", f"{pissa}-refcache", same_keys=False)


@pytest.mark.slow
def test_a_resume_that_rebuilds_another_residual_is_refused(adapter_run, tiny_model_dir, data_file, tmp_path):
    """Resumed with another randomized SVD (pissa_niter_3: the same shapes, so the checkpoint would load), the
    residual differs from the one recorded at the start: the run stops before any reference or step. A changed
    lora.* key is refused before that, by the config check (tests/test_resume_guards.py); the run's config.yaml is
    edited to the new value here, as for a run resumed with the same config on another machine or library version,
    which rebuilds another residual."""
    import yaml

    from dpo_dist.train.checkpoint import CheckpointError

    _, whole = adapter_run("pissa_niter-dora-rslora-lm_head")
    out = tmp_path / "out"
    copy_run(whole, out)
    changed = {**RUNS["pissa_niter-dora-rslora-lm_head"], "lora.init_lora_weights": "pissa_niter_3"}
    saved = yaml.safe_load((out / "config.yaml").read_text())
    saved["lora"]["init_lora_weights"] = "pissa_niter_3"
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    with pytest.raises(CheckpointError, match=r"lora.init_lora_weights=pissa_niter_3 rebuilt another residual base "
                                              r"than this run started from .* resume with the run's setup, or start "
                                              r"over with train.resume=never"):
        run(tiny_model_dir, data_file, out, **{**SETTINGS, **changed, "train.max_steps": 6})
    assert read_jsonl(out / "metrics.jsonl") == read_jsonl(whole / "metrics.jsonl")


# -- QLoRA --------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="needs bitsandbytes: python3 -m pip install -e '.[qlora]' (the dev extra has it)")
@pytest.mark.parametrize("avx512bf16", [True, False], ids=["avx512bf16", "no-avx512bf16"])
def test_dora_rslora_modules_to_save_and_layers_on_a_4bit_base(avx512bf16, tiny_model_dir, data_file, tmp_path,
                                                               monkeypatch):
    """What peft allows on a 4-bit base (PiSSA/OLoRA and DoRA on 8 bits are refused above), on a CPU believed to have
    AVX512-BF16 and on one believed not to (bitsandbytes branches on it: tests/test_qlora_cpu.py; with it, it would
    repack the 4-bit weights of eval/no-grad passes, which DoRA's weight norm, read from the de-quantized weight, must
    not meet either): nothing is repacked, step 1 is ln 2 to 1e-6, it learns, and the adapter loaded back onto a 4-bit
    base gives the training path's logits."""
    from dpo_dist.model.trained import load_trained
    from test_qlora_cpu import linear_4bit_layers, simulate_cpu

    calls = simulate_cpu(monkeypatch, avx512bf16)
    result = run(tiny_model_dir, data_file, tmp_path / "out", **{
        "model.quantization": "4bit", "lora.enabled": True, "lora.use_dora": True, "lora.use_rslora": True,
        "lora.modules_to_save": ["lm_head"], "lora.layers_to_transform": [1], "train.max_steps": 4,
        "train.learning_rate": 1e-2})
    losses = [r["loss"] for r in result["records"]]
    assert calls == [] and abs(losses[0] - math.log(2)) < 1e-6 and losses[-1] < losses[0] - 0.01, losses
    trained = load_trained(str(tmp_path / "out"), device=torch.device("cpu"))
    assert len(linear_4bit_layers(trained.model)) == 14 and len(lora_layers(trained.model)) == 7
    served = logits(trained.model)
    trained.model.train()
    embeds = trained.model.get_input_embeddings()(IDS).detach().requires_grad_()
    trained_path = trained.model(inputs_embeds=embeds).logits
    assert trained_path.grad_fn is not None and calls == []
    torch.testing.assert_close(served, trained_path.detach(), atol=1e-6, rtol=0)


# -- DoRA under the sharding engines (2 processes over gloo) -----------------------------------------------------

@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """The tiny model made wide enough (320) that ZeRO-3 partitions its larger weights (DeepSpeed keeps parameters
    under 100,000 values whole on every process), so DoRA's read of a layer's weight meets a partitioned one."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny import make_tokenizer

    folder = str(tmp_path_factory.mktemp("wide"))
    tokenizer = make_tokenizer("nobos")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=320, intermediate_size=640, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 tie_word_embeddings=True)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


DORA_SHARDED = {"lora.enabled": True, "lora.use_dora": True, "train.max_steps": 4, "data.num_samples": 40}


@pytest.fixture(scope="module")
def wide_dora_one_process(wide_model_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("wide-dora-one") / "out"
    reset_accelerate_state()
    records = run(wide_model_dir, data_file, out, **DORA_SHARDED)["records"]
    reset_accelerate_state()
    return records, out


@pytest.mark.multiprocess
@pytest.mark.parametrize("config", ["zero3", "fsdp"])
def test_dora_under_zero3_and_fsdp2_equals_one_process(config, wide_model_dir, wide_dora_one_process, data_file,
                                                       tmp_path):
    """DoRA reads each adapted layer's whole weight (its norm) beside the layer's own matmul; under ZeRO-3 (weights
    partitioned) and FSDP2 (sharded) it still computes what one process computes, step for step and in its export."""
    if config == "zero3" and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("needs DeepSpeed: python3 -m pip install -e '.[deepspeed]' (the dev extra has it)")
    records, single = wide_dora_one_process
    out = tmp_path / "out"
    command = accelerate_launch("--config_file", os.path.join(ROOT, "accelerate_configs", f"{config}.yaml"),
                                "--num_processes", "2", os.path.join(ROOT, "launch", "train.py"))
    command += overrides(wide_model_dir, data_file, out, **DORA_SHARDED, **{"train.per_device_batch_size": 4})
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "4 per device x 1 accumulation x 2 processes" in result.stdout
    if config == "fsdp":
        assert "FSDP2: parameters, gradients and optimizer state sharded over 2 processes" in result.stdout
    assert_same_trajectory(records, read_jsonl(out / "metrics.jsonl"), atol=1e-4)
    torch.testing.assert_close(exported_logits(wide_model_dir, out / "model"),
                               exported_logits(wide_model_dir, single / "model"), atol=1e-5, rtol=0)
