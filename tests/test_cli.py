import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from meancache.cli.demo import psnr
from meancache.cli.main import main


def test_demo_end_to_end_through_the_installed_command():
    exe = Path(sys.executable).with_name("meancache")  # console scripts sit beside the interpreter
    assert exe.is_file(), f"pip install did not create the `meancache` command at {exe}"
    result = subprocess.run(
        [exe, "demo", "--steps", "12", "--size", "32"], capture_output=True, text=True, timeout=300, check=True
    )
    lines = result.stdout.splitlines()
    assert "12 steps, 32x32" in lines[0]
    rows = {line[:36].strip(): line[36:].split() for line in lines[3:]}
    assert rows["full (no cache)"][0] == "12"
    assert rows["MeanCache B=10 (qwen-image table)"][0] == "10"
    assert rows["plain reuse B=10 (K=1)"][0] == "10"
    assert float(rows["MeanCache B=10 (qwen-image table)"][3]) > 20  # close to the full run, not garbage


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["demo", "--size", "40"], "multiple of 16, got 40"), (["demo", "--steps", "5"], "at least 10")],
)
def test_demo_rejects_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_demo_rejects_non_positive_steps(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    assert "must be a positive integer, got 0" in capsys.readouterr().err


def test_psnr_on_known_inputs():
    a = np.zeros((4, 4))
    assert psnr(a, a) == float("inf")
    assert psnr(a + 0.1, a) == pytest.approx(20.0)
