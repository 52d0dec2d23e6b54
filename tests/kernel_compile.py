"""Compile every shipped Triton kernel configuration for sm_90 (no GPU needed) and report register spills.

Run as ``python -m tests.kernel_compile`` without ``TRITON_INTERPRET``; prints one JSON line per config.
"""

import json
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from meancache.kernels import average_velocity_step, jvp_attention

KERNELS = [
    (average_velocity_step.average_velocity_step_kernel, average_velocity_step),
    (jvp_attention.jvp_attention_kernel, jvp_attention),
]
TARGET = GPUTarget("cuda", 90, 32)


def main() -> None:
    ptxas = get_ptxas(90).path
    for kernel, module in KERNELS:
        for signature, constexprs, options in module.compile_configs():
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=TARGET, options=options)
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
                f.write(compiled.asm["ptx"])
                f.flush()
                report = subprocess.run(
                    [ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", "/dev/null"],
                    capture_output=True, text=True, check=True,
                ).stderr  # fmt: skip
            spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", report)]
            registers = int(re.search(r"Used (\d+) registers", report).group(1))
            print(json.dumps({
                "kernel": kernel.__name__, "signature": signature,
                "constexprs": {k: str(v) for k, v in constexprs.items()},
                "registers": registers, "spill_bytes": sum(spills), "cubin_bytes": len(compiled.asm["cubin"]),
                "shared_bytes": compiled.metadata.shared,
            }))  # fmt: skip


if __name__ == "__main__":
    main()
