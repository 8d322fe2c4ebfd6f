"""The course's repository URL: read it, and move the course to another one.

The URL is written once, in _config.yml (`repo_url: &repo_url ...`, which `repository.url`
and the pages' {{ repo_url }} use). What cannot read _config.yml carries a copy that this
script writes and tests/test_repo_files.py checks: the first cell of every notebook (the
Colab install cell, which runs before kvlab exists) and the literal URLs in README.md and
book/*.md.

    python scripts/set_repository.py                                # print the URL in use
    python scripts/set_repository.py https://github.com/ORG/REPO    # publish elsewhere
    make set-repository URL=https://github.com/ORG/REPO             # the same

Only the notebooks' first code cells are rewritten; every other cell is left as it is.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "_config.yml"
# The one line that holds the URL; `repository: url: *repo_url` refers to it.
URL_LINE = re.compile(r"^([ \t]*repo_url:[ \t]*&repo_url[ \t]+)(\S+)[ \t]*$", re.M)
URL_FORM = re.compile(r"^https://github\.com/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")
# The extra that brings what the chapters import beyond kvlab's own needs (pyproject.toml).
EXTRA = "notebooks"


def repository_url(root: Path = ROOT) -> str:
    """The repository URL _config.yml names (its `repo_url` anchor)."""
    found = URL_LINE.findall((root / "_config.yml").read_text())
    if len(found) != 1:
        raise SystemExit("_config.yml must have exactly one line `repo_url: &repo_url https://github.com/...`")
    return found[0][1]


def install_cell(url: str) -> str:
    """The source of every notebook's first code cell: installs kvlab from `url`, on Colab only."""
    return (
        "import sys\n"
        'if "google.colab" in sys.modules:  # on Colab, install the course library first\n'
        f'    %pip install -q "kvlab[{EXTRA}] @ git+{url}"'
    )


def notebooks(root: Path = ROOT) -> list[Path]:
    return sorted((root / "notebooks").glob("*.ipynb"))


def first_code_cell(nb: dict) -> dict:
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            return cell
    raise ValueError("no code cell")


def text_files(root: Path = ROOT) -> list[Path]:
    """Pages that write the URL out literally (where {{ repo_url }} does not reach: code blocks)."""
    return [root / "README.md", *sorted((root / "book").glob("*.md"))]


def literal_url(url: str) -> re.Pattern:
    """`url` written out in a page, not as the start of a longer name (`.../kvlab-extra`)."""
    return re.compile(re.escape(url) + r"(?![A-Za-z0-9_-])")


def set_repository(new_url: str, root: Path = ROOT) -> list[Path]:
    """Point the course at `new_url`; returns the files changed."""
    if not URL_FORM.match(new_url):
        raise SystemExit(f"the URL must look like https://github.com/ORG/REPO (Colab opens notebooks from GitHub), got {new_url!r}")
    old_url = repository_url(root)
    changed = []
    config = root / "_config.yml"
    text = config.read_text()
    new_text = URL_LINE.sub(lambda m: m.group(1) + new_url, text)
    if new_text != text:
        config.write_text(new_text)
        changed.append(config)
    for path in notebooks(root):
        raw = path.read_text(encoding="utf-8")
        nb = json.loads(raw)
        cell = first_code_cell(nb)
        cell["source"] = install_cell(new_url).splitlines(keepends=True)
        out = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"  # as nbformat writes it
        if out != raw:
            path.write_text(out, encoding="utf-8")
            changed.append(path)
    for path in text_files(root):
        text = path.read_text(encoding="utf-8")
        new_text = literal_url(old_url).sub(new_url, text)
        if new_text != text:
            path.write_text(new_text, encoding="utf-8")
            changed.append(path)
    return changed


if __name__ == "__main__":
    if len(sys.argv) == 1:
        print(repository_url())
    elif len(sys.argv) == 2 and not sys.argv[1].startswith("-"):
        for changed in set_repository(sys.argv[1].rstrip("/")):
            print("updated", changed.relative_to(ROOT))
        print("repository:", repository_url())
    else:
        raise SystemExit(__doc__)
