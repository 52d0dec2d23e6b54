"""Every code block of README.md and docs/*.md runs here as written, apart from these substitutions:

- The checkpoint a reader supplies, ``/path/to/FLUX.1-dev``, is a tiny random-weight ``FluxPipeline`` with text
  encoders saved in a folder of that name (so name-based presets apply to it), one copy per page. Python loads it
  with ``_reader_checkpoint`` (float32 on the CPU, 32x32 pixels by default, no progress bar) in place of the
  ``from_pretrained(...).to(...)`` call; on the command line it runs at 32x32 in float32.
- The GPU, ``"cuda"`` in Python, is the CPU.

The blocks of one page run in order, in one namespace and one working folder, with the page's own
``MEANCACHE_HOME``. A ``python`` block runs with ``exec``; a ``bash`` block is ``meancache`` commands, each run by
``meancache.cli.main.main`` and required to exit 0. A ``text`` block right after a code block is what that block
prints: the printed lines must match it, ``...`` standing for any text within a line, and a line of only ``...``
for any number of lines. A block preceded by ``<!-- skip: REASON -->`` is skipped with that reason (GPU-only,
multi-process, installing or long-running commands), and a ``text`` block preceded by ``<!-- drawing -->`` is a
figure (the architecture diagram), not output; any other language, an unmarked command other than ``meancache``,
or an indented fence fails.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
READER_CHECKPOINT = "/path/to/FLUX.1-dev"
FENCE = re.compile(r"^```(\w*)$")
SKIP = re.compile(r"^<!-- skip: (.+) -->$")
DRAWING = "<!-- drawing -->"
LOADING = re.compile(r"(\w+)\.from_pretrained\(\"" + re.escape(READER_CHECKPOINT) + r"\"[^)]*\)(\.to\([^)]*\))?")
PIXELS = 32
"""Height and width of the tiny checkpoint's images."""


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    """1-based line of the opening fence."""
    language: str
    code: str
    skip: str | None
    output: str | None
    """The ``text`` block that follows it: what it prints."""

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def page_blocks(page: Path) -> list[Block]:
    """The code blocks of ``page`` with their skip reasons and printed outputs."""
    lines = page.read_text().splitlines()
    assert not [n for n, line in enumerate(lines, 1) if line.lstrip().startswith("```") and not line.startswith("`")], (
        f"{page.name}: an indented fence (in a list item?) would go untested"
    )
    raw: list[tuple[int, str, str, str | None]] = []  # (line, language, code, skip reason)
    index = 0
    while index < len(lines):
        opened = FENCE.match(lines[index])
        if opened is None:
            index += 1
            continue
        end = lines.index("```", index + 1)
        previous = next((line for line in reversed(lines[:index]) if line.strip()), "")
        skipped = SKIP.match(previous)
        if opened[1] == "text" and previous.strip() == DRAWING:
            index = end + 1
            continue
        raw.append((index + 1, opened[1], "\n".join(lines[index + 1 : end]) + "\n", skipped and skipped[1]))
        index = end + 1
    blocks: list[Block] = []
    for number, language, code, skip in raw:
        if language == "text":
            assert blocks and blocks[-1].output is None, f"{page.name}:{number}: a text block follows no code block"
            last = blocks[-1]
            blocks[-1] = Block(last.page, last.line, last.language, last.code, last.skip, code)
            continue
        assert language in ("python", "bash"), f"{page.name}:{number}: code blocks are python, bash or text"
        blocks.append(Block(page, number, language, code, skip, None))
    return blocks


BLOCKS = [block for page in PAGES for block in page_blocks(page)]


def matches(expected: str, printed: str) -> bool:
    """``printed`` has ``expected``'s lines, ``...`` standing for any text (a line of only ``...``: any lines)."""
    pattern = "".join(
        r"(?:[^\n]*\n)*?" if line.strip() == "..." else ".*?".join(map(re.escape, line.split("..."))) + r"\n"
        for line in expected.splitlines()
    )
    return re.fullmatch(pattern, printed if printed.endswith("\n") else printed + "\n") is not None


@dataclass
class Page:
    """What the blocks of one page share."""

    folder: Path
    checkpoint: Path
    namespace: dict[str, Any] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)


_PAGES: dict[Path, Page] = {}


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from meancache.testing import tiny_flux_pipeline_with_text_encoders

    path = tmp_path_factory.mktemp("checkpoint") / "FLUX.1-dev"
    tiny_flux_pipeline_with_text_encoders().save_pretrained(path)
    return path


def _page(page: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Page:
    if page not in _PAGES:
        folder = tmp_path_factory.mktemp(page.stem)
        checkpoint = Path(shutil.copytree(tiny_checkpoint, folder / "checkpoint" / "FLUX.1-dev"))
        _PAGES[page] = Page(folder / "work", checkpoint, {"_reader_checkpoint": _loader(checkpoint)})
        _PAGES[page].folder.mkdir()
    return _PAGES[page]


def _loader(checkpoint: Path) -> Any:
    def load(pipeline_class: Any) -> Any:
        pipe = pipeline_class.from_pretrained(checkpoint)
        pipe.default_sample_size = PIXELS // pipe.vae_scale_factor
        pipe.set_progress_bar_config(disable=True)
        return pipe

    return load


def _python(block: Block, page: Page) -> str:
    code = LOADING.sub(r"_reader_checkpoint(\1)", block.code).replace('"cuda"', '"cpu"')
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, block.name, "exec"), page.namespace)
    return printed.getvalue()


def _commands(code: str) -> list[list[str]]:
    """The commands of a bash block: continuation lines joined, comments dropped."""
    return [shlex.split(line, comments=True) for line in code.replace("\\\n", " ").splitlines() if line.strip()]


def _bash(block: Block, page: Page) -> str:
    from meancache.cli.main import main

    printed = io.StringIO()
    for words in _commands(block.code):
        assert words[0] == "meancache", f"{block.name}: {words[0]!r} is not a meancache command: mark it skipped"
        args = [word.replace(READER_CHECKPOINT, str(page.checkpoint)) for word in words[1:]]
        if str(page.checkpoint) in args:
            args = [{"1024": str(PIXELS), "bfloat16": "float32"}.get(word, word) for word in args]
            if "--height" not in args and args[0] in ("generate", "calibrate"):
                args += ["--height", str(PIXELS), "--width", str(PIXELS)]
        with contextlib.redirect_stdout(printed):
            code = main(args)
        assert code == 0, f"{block.name}: `meancache {shlex.join(args)}` exited {code}"
    return printed.getvalue().replace(str(page.checkpoint), READER_CHECKPOINT)


@pytest.mark.parametrize("block", BLOCKS, ids=[block.name for block in BLOCKS])
def test_code_block(block: Block, tiny_checkpoint, tmp_path_factory, monkeypatch):
    if block.skip is not None:
        pytest.skip(block.skip)
    page = _page(block.page, tiny_checkpoint, tmp_path_factory)
    monkeypatch.chdir(page.folder)
    monkeypatch.setenv("MEANCACHE_HOME", str(page.folder.parent / "home"))
    for earlier in BLOCKS:  # the page's blocks before this one, when it runs alone (pytest -k)
        ran = earlier.skip is not None or earlier.line in page.done
        if earlier.page == block.page and earlier.line < block.line and not ran:
            (_python if earlier.language == "python" else _bash)(earlier, page)
            page.done.add(earlier.line)
    printed = (_python if block.language == "python" else _bash)(block, page)
    page.done.add(block.line)
    if block.output is not None:
        assert matches(block.output, printed), f"{block.name} printed:\n{printed}\nThe page says:\n{block.output}"


def test_matches_reads_ellipses_as_any_text():
    assert matches("a ... c\n", "a b c\n") and matches("x\n...\nz\n", "x\ny\ny\nz\n") and matches("x\n...\n", "x\n")
    assert not matches("a ... c\n", "a b d\n") and not matches("x\nz\n", "x\ny\nz\n")


def test_every_docs_page_is_in_the_site_and_the_site_builds_strict(tmp_path):
    """``make docs``: mkdocs in strict mode (a broken link, anchor or API reference fails)."""
    pytest.importorskip("mkdocs", reason="the docs site needs the docs extra: pip install -e '.[docs]'")
    import subprocess
    import sys

    import yaml

    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    listed = {next(iter(entry.values())) for entry in nav}
    assert listed == {page.name for page in PAGES[1:]}, "mkdocs.yml's nav and docs/*.md differ"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "site" / "api" / "index.html").is_file()
