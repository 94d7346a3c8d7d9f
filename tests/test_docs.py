"""README.md is a short front page and docs/ holds the rest: no relative link (file or #anchor) may break, the
README stays at most 200 lines, and every docs page is reachable from it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 200

INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s{0,3}(```|~~~)")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def links(text: str) -> list[str]:
    """Every link target of a markdown text (inline and reference-style), outside code."""
    found = []
    for line in _prose_lines(text):
        reference = REFERENCE_LINK.match(line)
        if reference:
            found.append(reference.group(1))
            continue
        found.extend(match.group(1) for match in INLINE_LINK.finditer(INLINE_CODE.sub("", line)))
    return found


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: its text (link targets dropped), lowercase, punctuation except '-' and '_'
    removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    text = "".join(char for char in text if char.isalnum() or char in " -_")
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a markdown text, with GitHub's -1, -2, ... suffixes for repeated headings."""
    seen: dict[str, int] = {}
    result = set()
    for line in _prose_lines(text):
        match = HEADING.match(line)
        if not match:
            continue
        base = anchor(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file does not exist, or whose #anchor names no heading of it."""
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if not target or EXTERNAL.match(target):
            continue
        path_part, _, fragment = target.partition("#")
        path = (page.parent / path_part).resolve() if path_part else page
        if not path.exists():
            broken.append(f"{page.name}: {target} (no such file)")
        elif fragment and path.suffix == ".md" and fragment not in anchors(path.read_text(encoding="utf-8")):
            broken.append(f"{page.name}: {target} (no such heading)")
    return broken


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def test_no_relative_link_is_broken() -> None:
    assert [problem for page in _pages() for problem in broken_links(page)] == []


def test_the_readme_is_at_most_200_lines() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= MAX_README_LINES


def test_every_docs_page_is_linked_from_the_readme() -> None:
    targets = {(ROOT / target.partition("#")[0]).resolve() for target in links(README.read_text(encoding="utf-8"))
               if target and not EXTERNAL.match(target) and not target.startswith("#")}
    unlinked = [page.name for page in sorted(DOCS.glob("*.md")) if page.resolve() not in targets]
    assert sorted(DOCS.glob("*.md")) and unlinked == []


def test_the_checker_finds_broken_files_and_anchors(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Title\n\n## Compensation after selection (`within_layer`)\n## Two-step\n"
                                       "## Two-step\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#compensation-after-selection-within_layer) [ok](other.md#two-step-1) [ok](#here)\n"
                    "## Here\n[web](https://example.org/x.md) `[code](missing.md)`\n```\n[fenced](missing.md)\n```\n"
                    "[gone](missing.md) [bad anchor](other.md#title-2) [bad here](#nowhere)\n", encoding="utf-8")
    assert broken_links(page) == ["page.md: missing.md (no such file)", "page.md: other.md#title-2 (no such heading)",
                                  "page.md: #nowhere (no such heading)"]
