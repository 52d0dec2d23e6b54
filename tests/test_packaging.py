"""The package as users get it: import names that shadow nothing, work from the repository root, and a wheel
built from the sdist that installs into a clean environment and runs the bundled model.

Each check runs Python in a subprocess, so the current folder and ``sys.path`` are what a user's would be.
"""

import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "locked.txt"
GENERATION = "transformer calls: 10 run, 40 skipped"
"""The summary line's count for the bundled digits-flux model at its 50 default steps and budget 10."""


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``args`` run in ``cwd`` with this environment, output captured; a failure shows both streams."""
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} in {cwd} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def top_level_import_names(folder: Path) -> list[str]:
    """The names ``import NAME`` finds in ``folder`` ahead of site-packages when ``folder`` is the current one:
    regular packages (folders with ``__init__.py``) and modules. A folder without ``__init__.py`` is a namespace
    portion, which any installed regular package or module of the same name wins over."""
    packages = [p.name for p in folder.iterdir() if (p / "__init__.py").is_file()]
    modules = [p.stem for p in folder.glob("*.py")]
    return sorted(packages + modules)


def test_no_import_name_of_the_repository_root_belongs_to_an_installed_distribution():
    """A folder or module at the root with a distribution's import name shadows it for every script, ``python -m``
    and pytest run started there (Hugging Face's ``kernels``, a transformers dependency since 5.25, was)."""
    installed = importlib.metadata.packages_distributions()
    names = top_level_import_names(ROOT)
    assert "meancache" in names
    clashes = {name: installed[name] for name in names if name != "meancache" and name in installed}
    assert clashes == {}
    assert "kernels" not in names  # the Triton kernels' folder is installed as meancache.kernels only


def test_the_packages_import_from_the_repository_root_beside_hugging_faces_kernels():
    pytest.importorskip("kernels", reason="Hugging Face's kernels is not installed (the lock installs it)")
    result = run(
        [sys.executable, "-c", "import kernels, meancache, meancache.ops, meancache.kernels; print(kernels.__file__)"],
        cwd=ROOT,
    )
    assert Path(result.stdout.strip()).is_relative_to(sysconfig.get_paths()["purelib"])


def test_the_suite_collects_from_the_repository_root():
    result = run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], cwd=ROOT)
    collected = re.search(r"^(\d+) tests collected", result.stdout, re.MULTILINE)
    assert collected is not None and int(collected.group(1)) > 100, result.stdout[-2000:]


def test_a_script_in_the_repository_root_generates_with_a_bundled_model():
    script = ROOT / f"_generate_from_root_{os.getpid()}.py"
    script.write_text(
        textwrap.dedent(
            """
            import meancache

            digits = meancache.load_digits_model("digits-flux")
            meancache.enable_mean_cache(digits.pipe, meancache.MeanCacheConfig(budget=10))
            digits.pipe(**digits.inputs([7]), num_inference_steps=50)
            print(meancache.summary(digits.pipe))
            """
        )
    )
    try:
        result = run([sys.executable, script.name], cwd=ROOT)
    finally:
        script.unlink()
    assert GENERATION in result.stdout


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean virtual environment holding the wheel built from this checkout's sdist (the C++ extension compiled
    against this environment's torch, as ``pip install --no-build-isolation`` does), its dependencies at the
    lock's versions. Returns the environment's ``bin`` folder."""
    work = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(work / "dist"), str(ROOT)], cwd=work)
    (wheel,) = (work / "dist").glob("meancache-*.whl")
    assert len(list((work / "dist").glob("meancache-*.tar.gz"))) == 1
    venv.create(work / "env", with_pip=True)
    bin_folder = work / "env" / "bin"
    run([str(bin_folder / "pip"), "install", "--quiet", "--constraint", str(LOCK), str(wheel)], cwd=work)
    return bin_folder


def test_the_installed_wheel_loads_the_compiled_op(installed_wheel: Path, tmp_path: Path):
    check = "import meancache._C, meancache.ops; from meancache.ops._extension import cpp_ops; "
    check += "assert cpp_ops() is not None; print(meancache._C.__file__)"
    result = run([str(installed_wheel / "python"), "-W", "error::RuntimeWarning", "-c", check], cwd=tmp_path)
    assert Path(result.stdout.strip()).is_relative_to(installed_wheel.parent / "lib")


def test_the_installed_wheel_ships_the_kernels_and_the_command(installed_wheel: Path, tmp_path: Path):
    result = run(
        [str(installed_wheel / "python"), "-c", "import meancache.kernels.jvp_attention as m; print(m.__file__)"],
        cwd=tmp_path,
    )
    assert Path(result.stdout.strip()).is_relative_to(installed_wheel.parent / "lib")
    assert "generate" in run([str(installed_wheel / "meancache"), "--help"], cwd=tmp_path).stdout


def test_the_installed_wheel_generates_with_the_bundled_model_at_budget_10(installed_wheel: Path, tmp_path: Path):
    out = tmp_path / "seven.png"
    args = ["generate", "--model", "digits-flux", "--prompt", "7", "--budget", "10", "--out", str(out)]
    result = run([str(installed_wheel / "meancache"), *args], cwd=tmp_path)
    assert GENERATION in result.stdout
    assert out.stat().st_size > 0
