"""Builds the DeepSpeed ops that the CPU runs compile on first use, into torch's extension cache: the shared-memory
communication op (every DeepSpeed start on CPU) and CPU Adam (the offload configs). conftest.py starts this in the
background when a session holds launch tests, so that the build (about 100 s on 2 cores) runs while the SLURM tests
wait on their jobs, not inside the first DeepSpeed test. torch's build lock makes a launch that needs an op wait for
it; a built op loads at once."""

import deepspeed.ops
from deepspeed.accelerator import get_accelerator

for name in ("ShareMemCommBuilder", "CPUAdamBuilder"):
    builder = get_accelerator().create_op_builder(name)
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load(verbose=False)
