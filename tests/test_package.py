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
