"""The package installs light: importing any core module never imports DeepSpeed or bitsandbytes."""

import subprocess
import sys

CORE = ["dpo_dist", "dpo_dist.data.formats", "dpo_dist.data.load", "dpo_dist.data.tokenization", "dpo_dist.data.collate",
        "dpo_dist.train.logprobs", "dpo_dist.train.loss", "dpo_dist.train.reference_cache", "dpo_dist.train.reference", "dpo_dist.distributed"]

# A meta-path hook that makes any import of deepspeed or bitsandbytes fail, installed or not.
BLOCK = """
import importlib, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('deepspeed', 'bitsandbytes'):
            raise ImportError('blocked at import time: ' + name)
sys.meta_path.insert(0, Block())
"""


def run(code):
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_core_imports_without_deepspeed_or_bitsandbytes():
    result = run(f"for m in {CORE!r}: importlib.import_module(m)\nprint('ok')")
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_the_block_would_catch_an_import():
    """The hook does fail a module that imports one of them, so the test above can fail."""
    result = run("import bitsandbytes")
    assert result.returncode != 0 and "blocked at import time" in result.stderr


LAUNCH = ("train", "evaluate", "chat", "merge", "push")


def imported_modules(*args):
    """Run python -X importtime with ``args``: its result and every module it imported (importtime's last column)."""
    result = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120)
    modules = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return result, modules


def test_launch_help_answers_without_importing_torch():
    """--help of every launch script parses its arguments before any heavy import (evaluate.py took 8 s)."""
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name in LAUNCH:
        result, modules = imported_modules(os.path.join(root, "launch", f"{name}.py"), "--help")
        assert result.returncode == 0, (name, result.stderr[-2000:])
        assert result.stdout.startswith("usage:") and f"{name}.py" in result.stdout.splitlines()[0], name
        heavy = modules & {"torch", "transformers", "peft", "accelerate", "datasets"}
        assert not heavy, f"launch/{name}.py --help imported {sorted(heavy)}"


def test_importtime_lists_what_is_imported():
    """The check above can fail: importtime's lines name a module imported (json), not one that was not (torch)."""
    _, modules = imported_modules("-c", "import json")
    assert "json" in modules and "torch" not in modules
