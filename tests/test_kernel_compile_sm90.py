import json
import os
import subprocess
import sys
from pathlib import Path

from meancache.kernels.average_velocity_step import compile_configs


def test_every_triton_kernel_config_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "tests.kernel_compile"],
        cwd=Path(__file__).parent.parent, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(reports) == len(compile_configs()) == 14
    for report in reports:
        assert report["spill_bytes"] == 0, report
        assert 0 < report["registers"] <= 255 and report["cubin_bytes"] > 0, report
