import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from meancache.cli.main import main

QUANTIZER_IMPORT_NOTICES = re.compile(
    r"Failed to load .*(torchao|bitsandbytes)|W\d{4} .*torch/utils/_pytree\.py:\d+\] <enum '\w+'> is an Enum "
    r"subclass|Unable to import `torchao` Tensor objects"
)
"""What torchao and bitsandbytes (the test extra's quantizers, which ``import diffusers`` imports when installed)
print on being imported on a CPU-only machine: none of it is the command's."""


def own_stderr(stderr: str) -> str:
    """``stderr`` without the lines of :data:`QUANTIZER_IMPORT_NOTICES`."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not QUANTIZER_IMPORT_NOTICES.match(line))


def test_demo_end_to_end_through_the_installed_command(tmp_path):
    """What `make demo` runs, at 12 steps: a table, a labelled grid, and nothing on stderr (no warnings)."""
    from PIL import Image

    exe = Path(sys.executable).with_name("meancache")  # console scripts sit beside the interpreter
    assert exe.is_file(), f"pip install did not create the `meancache` command at {exe}"
    grid = tmp_path / "grid.png"
    result = subprocess.run(
        [exe, "demo", "--steps", "12", "--out", str(grid)], capture_output=True, text=True, timeout=300, check=True
    )
    assert own_stderr(result.stderr) == ""
    lines = result.stdout.splitlines()
    assert "digits-flux model (FluxPipeline)" in lines[0] and "12 steps" in lines[0]
    rows = {line[:36].strip(): line[36:].split() for line in lines[3:7]}
    assert rows["full (no cache)"][0] == "12"
    assert rows["MeanCache B=10"][0] == "10"
    assert rows["plain reuse B=10, same steps (K=1)"][0] == "10"
    assert rows["plain reuse B=10, uniform (K=1)"][0] == "10"
    assert float(rows["MeanCache B=10"][3]) > 10  # PSNR against the full run: close, not noise
    assert lines[7].startswith("loop s: median of 3 interleaved runs") and "VAE decode" in lines[7]
    with Image.open(grid) as image:
        # rows: full, B=10, two plain-reuse rows (12 steps < 17); a left gutter of labels
        assert image.height == 4 * 32 * 4 and image.width > 10 * 32 * 4
        gutter = np.asarray(image)[:, : image.width - 10 * 32 * 4]
        assert (gutter < 128).any(axis=1).reshape(4, -1).any(axis=1).all()  # dark text beside every row


def test_demo_with_the_video_model_writes_an_animated_labelled_grid(tmp_path):
    from PIL import Image

    from meancache.cli.demo import format_result, run_demo

    result = run_demo(10, grid_path=tmp_path / "grid.png", model_name="digits-video", repeats=1)
    rows = {row.method: row for row in result.rows}
    assert [row.model_evaluations for row in result.rows] == [10, 10, 10, 10]
    assert rows["full (no cache)"].temporal_error == 0 and all(r.temporal_error >= 0 for r in result.rows)
    assert "temporal err" in format_result(result).splitlines()[0]
    with Image.open(tmp_path / "grid.png") as image:
        assert image.n_frames == 9  # one image frame per video frame
        assert image.height == 4 * 32 * 4 and image.width > 10 * 32 * 4  # 4 labelled rows x 10 digits


def test_demo_with_the_true_cfg_model(tmp_path):
    from meancache.cli.demo import run_demo

    result = run_demo(12, grid_path=tmp_path / "grid.png", model_name="digits-qwen", repeats=1)
    rows = {row.method: row for row in result.rows}
    assert [row.model_evaluations for row in result.rows] == [12, 10, 10, 10]  # a CFG pair counts once
    assert rows["MeanCache B=10"].psnr_db > 10 and result.decode_seconds > 0 and (tmp_path / "grid.png").is_file()


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
    assert selected.budget == 6 and selected.metadata["replay_candidates"] >= 2
    assert selected.metadata["replay_error"] > 0 and selected.metadata["generations"] == 4
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


@pytest.mark.parametrize("model", ["digits-flux", "digits-qwen"])
def test_generate_with_a_bundled_model_and_a_budget(tmp_path, capsys, model):
    from PIL import Image

    out = tmp_path / "seven.png"
    main(["generate", "--model", model, "--prompt", "7", "--budget", "10", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "10 computed, 40 reused" in printed and f"wrote {out}" in printed
    with Image.open(out) as image:
        assert image.size == (32, 32)


def test_generate_writes_the_video_model_as_an_animated_image(tmp_path, capsys):
    from PIL import Image

    from meancache import Schedule

    Schedule.uniform(6, 4).save(tmp_path / "s.json")
    out = tmp_path / "seven.gif"
    main(["generate", "--model", "digits-video", "--prompt", "7", "--steps", "6",
          "--schedule", str(tmp_path / "s.json"), "--out", str(out)])  # fmt: skip
    assert "4 computed, 2 reused" in capsys.readouterr().out
    with Image.open(out) as video:
        assert video.size == (32, 32) and video.n_frames == 9
    assert main(["generate", "--model", "digits-video", "--prompt", "7", "--out", str(tmp_path / "seven.jpg")]) == 2
    assert "needs an animated image file extension" in capsys.readouterr().err


def test_generate_with_a_checkpoint_folder_and_a_schedule_file(tmp_path, capsys):
    from meancache import Schedule
    from meancache.testing import tiny_flux_pipeline_with_text_encoders

    model = tmp_path / "model"
    tiny_flux_pipeline_with_text_encoders().save_pretrained(model)
    Schedule(20, (0, 1, 6, 12, 19), (1, 3, 2, 5)).save(tmp_path / "s.json")
    out = tmp_path / "cat.png"
    main(["generate", "--model", str(model), "--prompt", "a photo of a cat", "--steps", "20", "--height", "32",
          "--width", "32", "--schedule", str(tmp_path / "s.json"), "--out", str(out)])  # fmt: skip
    assert "5 computed, 15 reused" in capsys.readouterr().out and out.is_file()


def test_generate_rejects_mutually_exclusive_arguments_through_argparse(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "digits-flux", "--prompt", "1", "--budget", "10", "--schedule", "s.json",
              "--out", str(tmp_path / "x.png")])  # fmt: skip
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def _calibration_file(path, **changes):
    """A small valid calibration file (20 steps, spans 1..2), with ``changes`` applied to its JSON."""
    import json

    import torch

    from meancache.calibration import calibrate
    from tests.reference_loop import toy_velocity

    calibrate(toy_velocity, [torch.zeros(3)], np.linspace(1, 0, 21), max_gap=4, max_span=2).save(path)
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}).replace('"NAN"', "NaN"))
    return path


def _run(argv, capsys):
    """``main(argv)``'s exit code and stderr; no traceback may reach the user."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def no_loading(monkeypatch):
    """Fails a test that loads a pipeline: bad arguments must be refused before any work starts."""

    def refuse(*args):
        raise AssertionError("a pipeline was loaded for bad arguments")

    monkeypatch.setattr("meancache.cli.generate.load_pipeline", refuse)
    monkeypatch.setattr("meancache.cli.schedules.load_pipeline", refuse)


GENERATE = ["generate", "--model", "digits-flux", "--prompt", "7"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "0"], r"--budget \(computed steps of --steps 50\) must be an integer in \[2, 50\], got 0"),
        (["--budget", "100", "--steps", "6"], r"--budget \(computed steps of --steps 6\) must be .*\[2, 6\], got 100"),
        (["--steps", "0"], r"--steps must be an integer in \[1, 10000\], got 0"),  # item 3
        (["--steps", "-1"], r"--steps must be an integer in \[1, 10000\], got -1"),
        (["--schedule", "{tmp}/missing.json"], r"No such file or directory: '.*missing\.json'"),
        (["--schedule", "{tmp}/truncated.json"], r"truncated\.json' is not a schedule JSON file"),
        (["--schedule", "{tmp}/b10.json", "--steps", "6"], r"budget 10 \(made for 50 steps\) cannot run 6 steps"),
        (["--device", "bogus"], r"--device 'bogus' is not a torch device name"),
        (["--height", "0"], r"--height must be an integer >= 1, got 0"),
        (["--prompt", "cat"], r"digits-flux draws a digit: --prompt must be 0-9, got 'cat'"),
        (["--out", "{tmp}/image"], r"--out '.*image' needs an image file extension .*got 'none'"),  # item 2
        (["--out", "{tmp}/folder.png"], r"--out '.*folder\.png' is a directory"),
        (["--out", "{tmp}/b10.json/x.png"], r"its folder '.*b10\.json' is not a directory"),
        (["--out", "{tmp}/new/dir/x.png"], r"--out '.*x\.png' cannot be written: its folder '.*dir' does not exist"),
        (["--out", "/proc/x.png"], r"--out '/proc/x\.png' cannot be written: no file can be created in '/proc'"),
        (["--model", "digits-flx"], r"--model 'digits-flx' is not a folder, .* did you mean 'digits-flux'\?"),
        (["--model", "{tmp}/FLUX.1-dev"], r"--model '.*FLUX\.1-dev' is not a folder, a bundled model"),
        (["--calibration-runs", "2"], r"--calibration-runs applies to --budget only"),
        (["--budget", "10", "--calibration-runs", "-1"], r"--calibration-runs must be an integer >= 0, got -1"),
    ],
)
def test_generate_refuses_bad_arguments_before_loading_anything(tmp_path, capsys, no_loading, args, message):
    """Items 1-3 of issue #15: exit code 2, `meancache generate: error: ...`, no traceback, nothing loaded."""
    from meancache import Schedule

    (tmp_path / "truncated.json").write_text('{"num_steps": 50, "compute_')
    Schedule.preset("qwen-image", 10).save(tmp_path / "b10.json")
    (tmp_path / "folder.png").mkdir()
    argv = [*GENERATE, "--out", str(tmp_path / "x.png"), *(a.format(tmp=tmp_path) for a in args)]
    code, err = _run(argv, capsys)
    assert code == 2 and err.startswith("meancache generate: error: ")
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b10.json", "folder.png", "truncated.json"]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sigmas": [1.0, 0.5]}, r"max_span must be an integer in \[1, 1\], got 2"),  # item 5: too few sigmas
        ({"max_span": 3}, r"one_shot must be an array of shape \(N, N, max_span\) = \(20, 20, 3\), got \(20, 20, 2\)"),
        ({"one_shot": "x"}, r"one_shot must be nested lists of costs, got str"),
        ({"closed_loop": [[["1.0"]]]}, r"closed_loop costs must be numbers or null, got '1.0' \(str\)"),
        ({"metadata": "x"}, r"metadata must be a dict \(a JSON object\), got 'x'"),
        ({"sigmas": [1.0, "NAN", *np.linspace(0.9, 0, 19).tolist()]}, r"sigmas\[1\] must be finite, got nan"),  # 6
        ({"sigmas": np.linspace(0, 1, 21).tolist()}, r"strictly decreasing .* sigmas\[1\] = 0.05 follows 0.0"),
    ],
)
def test_schedule_refuses_bad_calibration_files_and_creates_nothing(tmp_path, capsys, changes, message):
    """Items 5-7 of issue #15: the file is named, exit code 2, and --out-dir is not created."""
    calibration = _calibration_file(tmp_path / "c.json", **changes)
    code, err = _run(["schedule", calibration, "--budget", "8", "--out-dir", tmp_path / "out"], capsys)
    assert code == 2 and err.startswith(f"meancache schedule: error: {str(calibration)!r} is not a valid calibration")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "1"], r"budget must be an integer in \[2, 20\] for 20 steps, got 1"),
        (["--budget", "8", "3"], r"no schedule with 3 computed steps .* needs at least 6 computed steps"),
        (["--budget", "8", "--gamma", "nan"], r"gamma must be a finite number >= 1 .*got nan"),
        (["--budget", "8", "--out-dir", "{tmp}/c.json"], r"--out-dir '.*c\.json' exists and is not a directory"),
    ],
)
def test_schedule_refuses_bad_budgets_and_creates_nothing(tmp_path, capsys, args, message):
    calibration = _calibration_file(tmp_path / "c.json")
    argv = ["schedule", calibration, "--out-dir", tmp_path / "out", *(a.format(tmp=tmp_path) for a in args)]
    code, err = _run(argv, capsys)
    assert code == 2 and err.startswith("meancache schedule: error: ") and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


def test_schedule_refuses_a_missing_or_undecodable_file(tmp_path, capsys):
    code, err = _run(["schedule", tmp_path / "none.json", "--budget", "8", "--out-dir", tmp_path / "out"], capsys)
    assert code == 2 and "No such file or directory" in err and "none.json" in err
    (tmp_path / "latin1.json").write_bytes(b'{"sigmas": "\xe9"}')
    code, err = _run(["schedule", tmp_path / "latin1.json", "--budget", "8", "--out-dir", tmp_path / "out"], capsys)
    assert code == 2 and "latin1.json' is not a calibration JSON file" in err and "utf-8" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.json"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", "a cat"], r"digits-flux draws a digit: --prompt must be 0-9, got 'a cat'"),
        (["--prompt", "1", "--steps", "4"], r"--max-span must be an integer in \[1, 4\], got 5"),
        (["--prompt", "1", "--select", "1"], r"--select \(computed steps of --steps 50\) must be .*got 1"),
        (["--prompt", "1", "--max-gap", "1"], r"--max-gap must be an integer >= 2, got 1"),
        (["--prompt", "1", "--out", "{tmp}"], r"--out '.*' needs the file extension '\.json', got 'none'"),
        (["--prompt", "1", "--out", "{tmp}/c.png"], r"--out '.*c\.png' needs the file extension '\.json', got '\.png'"),
        (["--prompt", "1", "--out", "{tmp}/folder.json"], r"--out '.*folder\.json' is a directory"),
        (["--prompt", "1", "--model", "digits-qwn"], r"did you mean 'digits-qwen'\?"),
    ],
)
def test_calibrate_refuses_bad_arguments_before_loading_anything(tmp_path, capsys, no_loading, args, message):
    (tmp_path / "folder.json").mkdir()
    argv = ["calibrate", "--model", "digits-flux", "--out", tmp_path / "c.json"]
    argv += [a.format(tmp=tmp_path) for a in args]
    code, err = _run(argv, capsys)
    assert code == 2 and err.startswith("meancache calibrate: error: ") and re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.json"]


@pytest.mark.parametrize("where", ["name", "folder"])
def test_calibrate_a_bundled_model_by_name_or_folder(tmp_path, capsys, where):
    """Item 4 of issue #15: the digits models calibrate with digits as prompts."""
    import shutil

    from meancache.calibration import Calibration
    from meancache.models import bundled_model_path

    model = "digits-flux"
    if where == "folder":
        model = str(shutil.copytree(bundled_model_path(model), tmp_path / "my digits"))
    out = tmp_path / "c.json"
    argv = ["calibrate", "--model", model, "--prompt", "3", "--steps", "8", "--max-gap", "3", "--max-span", "2",
            "--out", out]  # fmt: skip
    code, err = _run(argv, capsys)
    assert code == 0, err
    calibration = Calibration.load(out)
    assert calibration.num_steps == 8 and calibration.trajectories == 1


def test_runtime_failures_exit_1_with_the_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = _run(["generate", "--model", tmp_path / "empty", "--prompt", "a cat", "--out", tmp_path / "x.png"],
                     capsys)  # fmt: skip
    assert code == 1 and err.startswith("meancache generate: error: ") and "model_index.json" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--steps", "5"], r"--steps \(the demo's smallest budget is 10\) must be an integer in \[10, 10000\]"),
        (["demo", "--steps", "0"], r"must be an integer in \[10, 10000\], got 0"),
        (["demo", "--out", "grid.txt"], r"--out 'grid.txt' needs an image file extension .*got '.txt'"),
        (["demo", "--model", "digits-video", "--out", "grid.jpg"], r"--out 'grid.jpg' needs an animated image file"),
    ],
)
def test_demo_rejects_bad_arguments(capsys, argv, message):
    code, err = _run(argv, capsys)
    assert code == 2 and err.startswith("meancache demo: error: ") and re.search(message, err), err


def test_the_installed_command_prints_errors_without_a_traceback(tmp_path):
    exe = str(Path(sys.executable).with_name("meancache"))
    for argv, code, message in [
        ([*GENERATE, "--budget", "0", "--out", str(tmp_path / "x.png")], 2, "meancache generate: error: --budget"),
        (["generate", "--model", str(tmp_path), "--prompt", "a", "--out", str(tmp_path / "x.png")], 1,
         "meancache generate: error: "),
    ]:  # fmt: skip
        result = subprocess.run([exe, *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == code and own_stderr(result.stderr).startswith(message), result.stderr
        assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["schedule", "c.json", "--budget", "8", "--out", "s.json"], "required: --out-dir"),
        (["demo", "--st", "12"], "unrecognized arguments: --st 12"),
    ],
)
def test_options_are_never_abbreviated(tmp_path, monkeypatch, capsys, argv, message):
    """`--out` is not taken for `--out-dir` (which made a folder named s.json), nor `--st` for `--steps`."""
    monkeypatch.chdir(tmp_path)
    _calibration_file(tmp_path / "c.json")
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json"]


def test_calibrations_clear_refuses_an_unknown_key_with_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEANCACHE_HOME", str(tmp_path))
    (tmp_path / "calibrations").mkdir()
    _calibration_file(tmp_path / "calibrations" / "abc123.json")
    code, err = _run(["calibrations", "clear", "abd"], capsys)
    assert code == 2 and re.search(r"calibrations: error: key 'abd' matches no stored calibration", err), err
    assert "caused by" not in err  # the store's error, said once
    assert (tmp_path / "calibrations" / "abc123.json").is_file()  # nothing deleted
    assert _run(["calibrations", "clear", "abc"], capsys) == (0, "")
    assert not (tmp_path / "calibrations" / "abc123.json").exists()


def test_an_error_names_the_errors_it_was_raised_from():
    """A hub download's error says "see the root cause in the stacktrace above", which the CLI does not show."""
    from meancache.cli.main import error_message

    try:
        try:
            raise ConnectionError("Failed to resolve 'huggingface.co'")
        except ConnectionError as e:
            raise OSError("Cannot reach the hub: see the root cause in the stacktrace above") from e
    except OSError as e:
        message = error_message(e)
    assert message == (
        "Cannot reach the hub: see the root cause in the stacktrace above; caused by ConnectionError: Failed to "
        "resolve 'huggingface.co'"
    )


def test_calibrate_progress_bar_moves_with_the_generations(tmp_path, capsys):
    """The bar counted generations while building their arguments, all at once: 0 % for minutes, then 100 % at
    over 100,000 generation/s. Now each generation ticks it when it finishes."""
    argv = ["calibrate", "--model", "digits-flux", "--prompt", "1", "--prompt", "2", "--prompt", "3", "--steps", "20",
            "--max-gap", "3", "--max-span", "2", "--out", tmp_path / "c.json"]  # fmt: skip
    code, err = _run(argv, capsys)
    assert code == 0, err
    final = err.rsplit("calibrating: 100%", 1)[1]
    rate = re.search(r"3/3 \[[\d:]+<[\d:]+, +([\d.]+)(s/generation|generation/s)\]", final)
    assert rate is not None, err
    assert rate[2] == "s/generation" or float(rate[1]) < 1000  # a digits generation of 20 steps takes > 1 ms


def test_demo_marks_a_speedup_above_the_ideal_as_measured_under_load():
    from meancache.cli.demo import DemoResult, DemoRow, format_result

    def row(method, evaluations, speedup):
        return DemoRow(method, evaluations, 1 / speedup, speedup, 40.0, 0.99, 1.0, None)

    rows = [row("full (no cache)", 50, 1.0), row("MeanCache B=10", 10, 5.4), row("plain reuse B=10", 10, 22.3)]
    lines = format_result(DemoResult(rows, 0.1, 3)).splitlines()
    speedups = [line[36:].split()[2] for line in lines[2:5]]
    assert speedups == ["1.00x", "5.40x", "22.30x*"]  # 5.40x: within 10 % of N / B = 5
    assert lines[-1].startswith("* above the ideal speedup")
    assert "* above" not in format_result(DemoResult(rows[:2], 0.1, 3))


def test_generate_with_calibration_runs(tmp_path, monkeypatch, capsys):
    """`--calibration-runs 1`: the first `--budget` generation of a checkpoint with no schedule runs in full and
    calibrates, the second (a new process would too) uses the calibration; the default would calibrate 4 times."""
    from meancache.testing import tiny_flux_pipeline_with_text_encoders

    monkeypatch.setenv("MEANCACHE_HOME", str(tmp_path / "home"))
    model = tmp_path / "model"
    tiny_flux_pipeline_with_text_encoders().save_pretrained(model)
    argv = ["generate", "--model", model, "--prompt", "a cat", "--steps", "12", "--height", "32", "--width", "32",
            "--budget", "5", "--calibration-runs", "1", "--out", tmp_path / "cat.png"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    assert "calibrating on first use: generation 1 of 1 runs in full" in capsys.readouterr().out
    assert main([str(a) for a in argv]) == 0
    assert "12 steps, 5 computed, 7 reused" in capsys.readouterr().out
