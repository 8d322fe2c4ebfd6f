"""The glossary and the references: every term a page links with MyST's `term` role exists in
book/glossary.md, and every paper a chapter links is listed in book/references.md.

Sphinx resolves `` {term}`KV cache` `` (or `` {term}`the cache <KV cache>` ``, whose target is
the part in angle brackets) against the terms of every `{glossary}` directive. The target's
whitespace is collapsed, and a target that matches no term exactly is looked up again in lower
case, so the match is case-insensitive. The book build reports a missing term as a warning;
this test names the page and the term without building anything.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GLOSSARY = ROOT / "book" / "glossary.md"

# `label <target>`, as Sphinx splits a role's text (sphinx.util.nodes.explicit_title_re).
EXPLICIT_TITLE = re.compile(r"^(.+?)\s*(?<!\x00)<([^<]*?)>$", re.DOTALL)
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,}|:{3,})(?P<info>.*)$")
ROLE_NAME = re.compile(r"\{(?P<name>[A-Za-z0-9_+:.-]+)\}$")
# Directives whose content is code, not markup.
CODE_DIRECTIVES = {"code", "code-block", "code-cell", "sourcecode", "literalinclude", "math"}


def markup_lines(text: str) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Split MyST text into the lines that are markup and the content of each directive.

    Code fences (```python, ```text, {code-block} ...) are dropped with their content; the
    fence lines of other directives are dropped and their content kept, so that roles inside
    an {exercise} or a {glossary} count. Returns (markup lines, [(directive, its lines)]).
    """
    out: list[str] = []
    directives: list[tuple[str, list[str]]] = []
    stack: list[tuple[str, int, bool, list[str] | None]] = []  # (char, length, is code, lines)
    for line in text.splitlines():
        m = FENCE.match(line)
        if m:
            char, length, info = m["fence"][0], len(m["fence"]), m["info"].strip()
            if stack and char == stack[-1][0] and length >= stack[-1][1] and not info:
                stack.pop()  # the innermost open fence closes
                continue
            if not (stack and stack[-1][2]) and (char != ":" or info.startswith("{")):
                name = re.match(r"\{([^}]*)\}", info)
                is_code = name is None or name[1] in CODE_DIRECTIVES
                lines: list[str] | None = None
                if name is not None and not is_code:
                    lines = []
                    directives.append((name[1], lines))
                stack.append((char, length, is_code, lines))
                continue
        if stack and stack[-1][2]:
            continue  # inside code
        for entry in stack:
            if entry[3] is not None:
                entry[3].append(line)
        out.append(line)
    return out, directives


def roles(text: str, role: str = "term") -> list[str]:
    """The targets of every `{role}` in MyST text, whitespace-collapsed, in order.

    Inline code spans are skipped (`` {term}`x` `` written as code is not a role), and a role's
    content is delimited like a code span: a run of backticks closed by a run of the same length.
    """
    source = "\n".join(markup_lines(text)[0])
    found, i = [], 0
    while True:
        m = re.compile(r"`+").search(source, i)
        if m is None:
            return found
        run = m.group()
        close = re.compile(rf"(?<!`){run}(?!`)").search(source, m.end())
        if close is None:
            i = m.end()
            continue
        content = source[m.end():close.start()]
        name = ROLE_NAME.search(source, 0, m.start())
        if name is not None and name.end() == m.start() and name["name"] == role:
            content = content.strip()
            explicit = EXPLICIT_TITLE.match(content)
            target = explicit[2] if explicit else content
            found.append(" ".join(target.split()))
        i = close.end()


def glossary_terms(text: str) -> list[str]:
    """Every term of every {glossary} directive: its unindented lines (` : classifier` cut off)."""
    terms = []
    for name, lines in markup_lines(text)[1]:
        if name != "glossary":
            continue
        options_done = False
        for line in lines:
            if not line.strip():
                options_done = True
                continue
            if not options_done and re.match(r"^:[\w-]+:", line):
                continue  # a directive option such as :sorted:
            options_done = True
            if not line[0].isspace():
                terms.append(" ".join(line.split(" : ")[0].split()))
    return terms


def toc_pages() -> list[Path]:
    """Every page of the book (from _toc.yml) and every chapter notebook."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    names = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                names.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    pages = set(ROOT.glob("notebooks/*.ipynb"))
    for name in names:
        for suffix in ("", ".md", ".ipynb"):
            if (ROOT / f"{name}{suffix}").is_file():
                pages.add(ROOT / f"{name}{suffix}")
                break
    return sorted(pages)


def page_text(path: Path) -> str:
    if path.suffix == ".ipynb":
        nb = nbformat.read(path, as_version=4)
        return "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    return path.read_text(encoding="utf-8")


TERMS = glossary_terms(GLOSSARY.read_text(encoding="utf-8"))
KNOWN = {t.lower() for t in TERMS}
PAGES = toc_pages()


# --- the parsers, on text whose answer is known -------------------------------------------


def test_roles_parser():
    text = (
        "A {term}`KV cache` and {term}`the cache <static cache>`, over\n"
        "two lines: {term}`decode\n  step`. Double backticks: {term}``top-k``.\n"
        "Code is not a role: `` {term}`nothing` `` and `{term}`.\n"
        "```python\nx = '{term}`in code`'\n```\n"
        "````{exercise} Title\nInside a directive, {term}`RoPE`.\n```text\n{term}`inner code`\n```\n````\n"
        "Another role: {doc}`not a term <setup>`.\n"
    )
    assert roles(text) == ["KV cache", "static cache", "decode step", "top-k", "RoPE"]


def test_glossary_parser():
    text = (
        "# Glossary\n\n```{glossary}\n:sorted:\n\nterm one\n  Its definition, with {term}`x`.\n\n"
        "term two\nsynonym\n  Shared definition.\n\nterm three : a classifier\n  Text.\n```\n"
        "```text\nnot a term\n```\n"
    )
    assert glossary_terms(text) == ["term one", "term two", "synonym", "term three"]


# --- the book -----------------------------------------------------------------------------


def test_glossary_has_terms_and_no_duplicates():
    assert len(TERMS) > 50, f"only {len(TERMS)} glossary terms found: is the parser broken?"
    seen, duplicates = set(), []
    for term in TERMS:
        if term.lower() in seen:
            duplicates.append(term)
        seen.add(term.lower())
    assert not duplicates, f"terms defined twice (Sphinx compares them in lower case): {duplicates}"


@pytest.mark.parametrize("term", ["dropout", "perplexity", "nats", "cross-entropy", "AdamW",
                                  "weight decay", "warmup", "gradient clipping", "KV cache"])
def test_glossary_covers(term):
    assert term.lower() in KNOWN, f"book/glossary.md has no entry for {term!r}"


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_linked_term_exists(path):
    missing = sorted({t for t in roles(page_text(path)) if t.lower() not in KNOWN})
    assert not missing, (
        f"{path.relative_to(ROOT)} links glossary terms that book/glossary.md does not define: "
        f"{missing}. Add them to the glossary, or link an existing term with "
        "{term}`text <existing term>`.")


def test_pages_use_the_glossary():
    used = {p.name: roles(page_text(p)) for p in PAGES}
    assert sum(map(len, used.values())) > 50, f"hardly any {{term}} roles found: {used}"


# --- the references -------------------------------------------------------------------------

REFERENCES = ROOT / "book" / "references.md"
# Links to papers: an arXiv abstract (by its number) or a paper hosted elsewhere.
PAPER_LINK = re.compile(r"https?://(?:arxiv\.org/(?:abs|pdf)/(?P<arxiv>\d{4}\.\d{4,5})"
                        r"|(?P<other>(?:transformer-circuits\.pub|jmlr\.org|openreview\.net|aclanthology\.org|"
                        r"proceedings\.\w+\.\w+|cdn\.openai\.com)/[^)\s>]+))")


def cited_papers(text: str) -> set[str]:
    return {m["arxiv"] or m["other"] for m in PAPER_LINK.finditer(text)}


def test_cited_papers_parser():
    text = "([Vaswani et al., 2017](https://arxiv.org/abs/1706.03762)), see https://arxiv.org/pdf/2104.09864 and [x](https://transformer-circuits.pub/2022/a/index.html)."
    assert cited_papers(text) == {"1706.03762", "2104.09864", "transformer-circuits.pub/2022/a/index.html"}


@pytest.mark.parametrize("path", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_cited_papers_are_in_the_references(path):
    listed = cited_papers(REFERENCES.read_text(encoding="utf-8"))
    missing = sorted(cited_papers(page_text(path)) - listed)
    assert not missing, f"{path.relative_to(ROOT)} cites papers that book/references.md does not list: {missing}"


# --- the instructors' page ------------------------------------------------------------------


def test_instructors_student_build_lists_every_chapter():
    """The student-build example shows one `wrote` line per chapter notebook, as the command prints."""
    text = (ROOT / "book" / "instructors.md").read_text(encoding="utf-8")
    shown = re.findall(r"^wrote student/(\S+\.ipynb)$", text, re.M)
    chapters = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert shown == chapters, f"book/instructors.md shows the student build writing {shown}; notebooks/ has {chapters}"
