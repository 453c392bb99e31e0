"""The typed config: every shipped recipe loads; unknown keys and wrong types are errors naming the key."""

import glob
import os

import pytest

from dpo_dist.config import Config, ConfigError, describe, load_config, parse_override

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))


def test_there_are_recipes():
    assert len(RECIPES) >= 2


@pytest.mark.parametrize("path", RECIPES, ids=os.path.basename)
def test_every_shipped_recipe_loads_and_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.train.output_dir.startswith("outputs/")


def test_the_seed_projects_recipe():
    cfg = load_config(os.path.join(ROOT, "recipes", "tinyllama_ultrafeedback_qlora.yaml"))
    assert cfg.model.name_or_path == "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    assert cfg.data.source == "argilla/ultrafeedback-binarized-preferences-cleaned"
    assert (cfg.data.num_samples, cfg.loss.beta, cfg.model.quantization, cfg.lora.enabled) == (500, 0.1, "4bit", True)


def test_defaults_are_the_default_run():
    cfg = load_config()
    assert cfg.model.name_or_path == "builtin:smollm2-135m-instruct" and cfg.data.source == "builtin:sentiment"


def test_overrides_are_typed_yaml():
    cfg = load_config(None, ["train.max_steps=20", "loss.beta=0.05", "lora.target_modules=[q_proj, v_proj]",
                             "train.eval_every=null", "train.learning_rate=1", "model.dtype=float32"])
    assert cfg.train.max_steps == 20 and cfg.loss.beta == 0.05
    assert cfg.lora.target_modules == ["q_proj", "v_proj"] and cfg.train.eval_every is None
    assert cfg.train.learning_rate == 1.0 and isinstance(cfg.train.learning_rate, float)
    # PyYAML reads 1e-3 as a string; a float option takes it as the number everyone means, in recipes too
    assert load_config(None, ["train.learning_rate=1e-3", "train.max_grad_norm=5E+1"]).train.learning_rate == 0.001
    assert load_config(None, ["train.max_grad_norm=5E+1"]).train.max_grad_norm == 50.0
    assert load_config(None, ["train.output_dir=1e-3"]).train.output_dir == "1e-3"  # a str option keeps the text
    assert parse_override("a.b.c=x y") == {"a": {"b": {"c": "x y"}}}


# Bad values and the errors naming their keys: tests/faults.py (BAD_CONFIG), run by tests/test_faults.py.


def test_recipe_errors_name_the_file(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"r.yaml: unknown config key 'train.epoch'"):
        load_config(str(bad))
    # PyYAML's 4-5 lines (what it was parsing, where, the problem, where) as one, with the line and column
    for text, said in [
        ("train: [1, 2\n", "2:1: not valid YAML: expected ',' or ']', but got '<stream end>' (a flow sequence started "
                           "at 1:8)"),
        ("train:\n  max_steps: 3\n bad: 1\n", "3:2: not valid YAML: expected <block end>, but found '<block mapping "
                                             "start>' (a block mapping started at 1:1)"),
        ("train:\n\tmax_steps: 3\n", "2:1: not valid YAML: found character '\\t' that cannot start any token"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError) as raised:
            load_config(str(bad))
        assert str(raised.value).startswith(f"{bad}:{said}") and "\n" not in str(raised.value), str(raised.value)
    bad.write_bytes(b"train:\n  x: \xff\n")
    with pytest.raises(ConfigError, match=r"r.yaml: not UTF-8 text \(byte 12: invalid start byte\)$"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match=r"^override 'train.adam_betas=\[1,': the value is not valid YAML at column 4: "
                                          r"expected the node content, but found '<stream end>'[^\n]*$"):
        load_config(None, ["train.adam_betas=[1,"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_describe_gives_type_default_and_meaning():
    text = "\n".join(describe())
    assert "train.learning_rate (float; default: 0.0002)" in text
    assert "peak learning rate" in text
    assert "data.sentiment.num_prompts (int; default: 240)" in text


def test_quantization_needs_lora():
    with pytest.raises(ConfigError, match=r"model.quantization=4bit .* set lora.enabled=true"):
        load_config(None, ["model.quantization=4bit", "lora.enabled=false"])


def test_a_requested_tracker_must_be_installed(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.report_to: wandb is not installed \(python3 -m pip install wandb\)"):
        load_config(None, ["train.report_to=[wandb]"])


def test_bitsandbytes_options_need_bitsandbytes(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.optimizer=adamw_8bit needs bitsandbytes"):
        load_config(None, ["train.optimizer=adamw_8bit"])
    with pytest.raises(ConfigError, match=r"model.quantization=4bit needs bitsandbytes"):
        load_config(None, ["model.quantization=4bit"])


def test_accelerate_configs_named_in_recipes_exist():
    """Every accelerate config a recipe's comment tells users to launch with is shipped."""
    import re

    for path in RECIPES:
        for name in re.findall(r"accelerate_configs/([\w.]+\.yaml)", open(path).read()):
            assert os.path.isfile(os.path.join(ROOT, "accelerate_configs", name)), (path, name)


def test_early_stopping_needs_eval_data():
    with pytest.raises(ConfigError, match="train.early_stopping_patience needs eval data"):
        load_config(None, ["data.source=pairs.jsonl", "data.eval_ratio=0", "train.early_stopping_patience=2"])
    load_config(None, ["data.source=pairs.jsonl", "data.eval_ratio=0.1", "train.early_stopping_patience=2"])
    load_config(None, ["train.early_stopping_patience=2", "train.metric_for_best=eval/rewards/margins",
                       "train.greater_is_better=true"])  # the built-in set has held-out prompts


def test_on_off_options_accept_what_yaml_makes_of_on_and_off():
    from dpo_dist.config import load_config

    assert load_config(None, ["train.packing=on"]).train.packing == "on"  # YAML reads `on` as true
    assert load_config(None, ["train.packing=off"]).train.packing == "off"
    assert load_config(None, ["train.packing=auto"]).train.packing == "auto"
