"""The documentation runs: every ```python block of docs/**/*.md and README.md, and the mkdocs site.

Each page's blocks run in order in one namespace (a later block may use what an earlier one made),
with the repo root as the working directory, as a reader would paste them. A block that must not run
is preceded by a line ``<!-- not-run: reason -->``. A failure names the page and the line of the
block, and the traceback points into the Markdown file itself.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]

_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_NOT_RUN = re.compile(r"^\s*<!--\s*not-run:\s*(\S.*?)\s*-->\s*$")


def python_blocks(text: str) -> list[tuple[int, str, str | None]]:
    """The page's ```python blocks as ``(line of the opening fence, code, not-run reason or None)``.

    Blocks indented under a list item are dedented by the fence's own indentation. The not-run marker
    is the last non-blank line before the fence.
    """
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = match.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        i += 1  # the closing fence
        if language.lower() in ("python", "py"):
            before = next((line for line in reversed(lines[:start]) if line.strip()), "")
            skip = _NOT_RUN.match(before)
            blocks.append((start + 1, "\n".join(body) + "\n", skip.group(1) if skip else None))
    return blocks


def _page_id(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


PAGES_WITH_CODE = [page for page in PAGES if python_blocks(page.read_text())]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=_page_id)
def test_python_blocks_run(page: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The examples read configs/ as a user in the repository would; what they write (loss.png, ...)
    # lands in a scratch directory, not in the repository.
    (tmp_path / "configs").symlink_to(ROOT / "configs", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(page)])
    name = _page_id(page)
    namespace: dict = {"__name__": "__docs__"}
    for line, code, skip in python_blocks(page.read_text()):
        if skip is not None:
            continue
        # Pad with blank lines so tracebacks give the block's line numbers in the .md file itself.
        compiled = compile("\n" * line + code, str(page), "exec")
        try:
            exec(compiled, namespace)
        except Exception as error:
            failure = "".join(traceback.format_exception(type(error), error, error.__traceback__.tb_next))
        else:
            continue
        pytest.fail(
            f"{name}: the python block at line {line} failed "
            f"(fix it, or put '<!-- not-run: reason -->' on the line before its fence):\n{failure}",
            pytrace=False,
        )


def test_block_parser() -> None:
    text = "\n".join(
        [
            "intro",
            "```python",
            "x = 1",
            "```",
            "<!-- not-run: needs a GPU -->",
            "",
            "```python",
            "y = cuda()",
            "```",
            "- item",
            "",
            "    ```py",
            "    z = x + 1",
            "    ```",
            "```bash",
            "echo no",
            "```",
        ]
    )
    assert python_blocks(text) == [(2, "x = 1\n", None), (7, "y = cuda()\n", "needs a GPU"), (12, "z = x + 1\n", None)]


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (it is in the dev extras: pip install -e '.[dev]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
