import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from meancache.cli.demo import image_metrics
from meancache.cli.main import main


@pytest.mark.parametrize(("model", "pipeline"), [("digits-flux", "FluxPipeline"), ("digits-qwen", "QwenImagePipeline")])
def test_demo_end_to_end_through_the_installed_command(tmp_path, model, pipeline):
    from PIL import Image

    exe = Path(sys.executable).with_name("meancache")  # console scripts sit beside the interpreter
    assert exe.is_file(), f"pip install did not create the `meancache` command at {exe}"
    grid = tmp_path / "grid.png"
    result = subprocess.run(
        [exe, "demo", "--steps", "12", "--model", model, "--out", str(grid)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    assert f"{model} model ({pipeline})" in lines[0] and "12 steps" in lines[0]
    rows = {line[:36].strip(): line[36:].split() for line in lines[3:7]}
    assert rows["full (no cache)"][0] == "12"
    assert rows["MeanCache B=10"][0] == "10"
    assert rows["plain reuse B=10, same steps (K=1)"][0] == "10"
    assert rows["plain reuse B=10, uniform (K=1)"][0] == "10"
    assert float(rows["MeanCache B=10"][3]) > 10  # PSNR against the full run: close, not noise
    with Image.open(grid) as image:
        assert image.size == (10 * 32 * 4, 4 * 32 * 4)  # rows: full, B=10, two plain-reuse rows (12 steps < 17)


@pytest.mark.parametrize(("argv", "message"), [(["demo", "--steps", "5"], "at least 10")])
def test_demo_rejects_bad_arguments(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_demo_rejects_non_positive_steps(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--steps", "0"])
    assert "must be a positive integer, got 0" in capsys.readouterr().err


def test_image_metrics_on_known_inputs():
    a = np.random.default_rng(0).uniform(size=(2, 16, 16))
    assert image_metrics(a, a) == (float("inf"), pytest.approx(1.0))
    psnr, ssim = image_metrics(np.clip(a + 0.1, 0, 1), a)
    assert 20.0 <= psnr < 22 and 0.5 < ssim < 1.0  # 0.1 everywhere except where clipped
    psnr, ssim = image_metrics(np.zeros((2, 16, 16)), a)
    assert psnr < 6 and ssim < 0.1


def test_calibrate_then_schedule_then_run_through_the_installed_command(tmp_path):
    import torch
    from diffusers import DiffusionPipeline

    from meancache import MeanCacheConfig, Schedule, enable_mean_cache, summary
    from meancache.testing import tiny_flux_pipeline_with_text_encoders

    model = tmp_path / "tiny flux"  # a path with a space, like a user's folder
    tiny_flux_pipeline_with_text_encoders().save_pretrained(model)
    exe = str(Path(sys.executable).with_name("meancache"))
    calibration = tmp_path / "calibration.json"
    subprocess.run(
        [exe, "calibrate", "--model", str(model), "--prompt", "a photo of a cat", "--prompt", "a red dog",
         "--seeds", "0", "1", "--steps", "16", "--height", "32", "--width", "32", "--max-gap", "5",
         "--max-span", "3", "--out", str(calibration), "--select", "6"],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    selected = Schedule.load(tmp_path / "schedule_B6.json")  # the best validated candidate, beside --out
    assert selected.budget == 6 and selected.metadata["validation_candidates"] >= 2
    assert selected.metadata["validation_error"] > 0 and selected.metadata["generations"] == 4
    result = subprocess.run(
        [exe, "schedule", str(calibration), "--budget", "5", "8", "--gamma", "3", "--out-dir", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "B=5: computed [0," in result.stdout and "B=8:" in result.stdout
    schedule = Schedule.load(tmp_path / "s" / "schedule_B5.json")
    assert schedule.budget == 5 and schedule.num_steps == 16 and schedule.metadata["gamma"] == 3.0
    assert schedule.metadata["generations"] == 4 and schedule.metadata["cost_kind"] == "closed-loop"
    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    enable_mean_cache(pipe, MeanCacheConfig(schedule))
    pipe("a photo of a cat", num_inference_steps=16, height=32, width=32, output_type="latent",
         generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert summary(pipe).transformer_calls == 5


def test_schedule_command_reports_infeasible_budgets(tmp_path):
    import numpy as np
    import torch

    from meancache.calibration import calibrate
    from tests.reference_loop import toy_velocity

    calibrate(toy_velocity, [torch.zeros(3)], np.linspace(1, 0, 21), max_gap=4, max_span=2).save(tmp_path / "c.json")
    with pytest.raises(ValueError, match="needs at least 6 computed steps"):
        main(["schedule", str(tmp_path / "c.json"), "--budget", "3", "--out-dir", str(tmp_path)])


@pytest.mark.parametrize("model", ["digits-flux", "digits-qwen"])
def test_generate_with_a_bundled_model_and_a_budget(tmp_path, capsys, model):
    from PIL import Image

    out = tmp_path / "seven.png"
    main(["generate", "--model", model, "--prompt", "7", "--budget", "10", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "10 computed, 40 reused" in printed and f"wrote {out}" in printed
    with Image.open(out) as image:
        assert image.size == (32, 32)


def test_generate_with_a_checkpoint_folder_and_a_schedule_file(tmp_path, capsys):
    from meancache import Schedule
    from meancache.testing import tiny_flux_pipeline_with_text_encoders

    model = tmp_path / "model"
    tiny_flux_pipeline_with_text_encoders().save_pretrained(model)
    Schedule(20, (0, 1, 6, 12, 19), (1, 3, 2, 5)).save(tmp_path / "s.json")
    out = tmp_path / "out" / "cat.png"
    main(["generate", "--model", str(model), "--prompt", "a photo of a cat", "--steps", "20", "--height", "32",
          "--width", "32", "--schedule", str(tmp_path / "s.json"), "--out", str(out)])  # fmt: skip
    assert "5 computed, 15 reused" in capsys.readouterr().out and out.is_file()


def test_generate_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--prompt must be 0-9, got 'cat'"):
        main(["generate", "--model", "digits-flux", "--prompt", "cat", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit):
        main(["generate", "--model", "digits-flux", "--prompt", "1", "--budget", "10", "--schedule", "s.json",
              "--out", str(tmp_path / "x.png")])  # fmt: skip
    assert "not allowed with argument" in capsys.readouterr().err
