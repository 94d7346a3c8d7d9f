"""Out-of-domain evaluation texts: real English that no calibration, compensation or fine-tune of the project reads.

Two texts, each built from a Debian package (downloaded with ``apt-get download``, unpacked with ``dpkg-deb``, so any
Debian or Ubuntu machine builds the same files for the same package versions; the versions and SHA-256 of what was
built are written next to the texts in ``sources.json``):

- ``technical``: the prose of GNU manuals (the Info manuals of coreutils, grep, sed and diffutils). Info markup
  (node headers, menus, index entries, directory entries) is dropped and wrapped lines are joined; a paragraph is
  kept when it has at least 20 words and at least 85% of its characters are letters or spaces (code examples and
  tables fail that), and only its first time (the licence notice every manual repeats).
- ``quotations``: quotations and short literary pieces from the ``fortunes`` package (its ``wisdom``, ``people``,
  ``humorists``, ``love``, ``education`` and ``science`` files): each entry between ``%`` lines becomes one
  paragraph (whitespace collapsed, the attribution line kept); entries under 8 words are dropped.

Paragraphs are kept in package and file order and separated by blank lines, so the first windows of a text are
always the same. ``python bench/ood_texts.py`` builds them (into ``~/.cache/gp_lightning/ood``) and prints where.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE = Path.home() / ".cache" / "gp_lightning" / "ood"
MANUALS = {"coreutils": ["coreutils.info"], "grep": ["grep.info"], "sed": ["sed.info"],
           "diffutils": ["diffutils.info"]}
FORTUNES = ["wisdom", "people", "humorists", "love", "education", "science"]
NAMES = ("technical", "quotations")


def ood_texts(cache: Path = CACHE) -> dict[str, Path]:
    """The out-of-domain texts by name, built once into ``cache``."""
    paths = {name: cache / f"{name}.txt" for name in NAMES}
    if not all(path.is_file() for path in paths.values()):
        build(cache)
    return paths


def build(cache: Path = CACHE) -> dict[str, Path]:
    """Download the packages, extract and clean their text, write ``<name>.txt`` and ``sources.json``."""
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        versions = {package: _unpack(package, root) for package in [*MANUALS, "fortunes"]}
        texts = {"technical": _manual_paragraphs(root), "quotations": _fortune_paragraphs(root)}
    sources = {"packages": versions}
    for name, paragraphs in texts.items():
        data = "\n\n".join(paragraphs) + "\n"
        path = cache / f"{name}.txt"
        tmp_path = path.with_suffix(".tmp")
        tmp_path.write_text(data, encoding="utf-8")
        tmp_path.replace(path)
        sources[name] = {"paragraphs": len(paragraphs), "words": len(data.split()),
                         "sha256": hashlib.sha256(data.encode()).hexdigest()}
    (cache / "sources.json").write_text(json.dumps(sources, indent=2) + "\n", encoding="utf-8")
    return {name: cache / f"{name}.txt" for name in NAMES}


def _unpack(package: str, root: Path) -> str:
    """``apt-get download`` the package into ``root`` and unpack it there; its version."""
    try:
        subprocess.run(["apt-get", "download", package], cwd=root, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        sys.exit(f"error: apt-get download {package} failed ({detail.strip()}): the out-of-domain texts need a "
                 "Debian or Ubuntu machine with its package index (apt-get update).")
    deb = next(root.glob(f"{package}_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root / "tree")], check=True)
    return deb.name.split("_")[1].replace("%3a", ":")


def _manual_paragraphs(root: Path) -> list[str]:
    """Prose paragraphs of the Info manuals, in package order."""
    paragraphs: list[str] = []
    for manuals in MANUALS.values():
        for manual in manuals:
            for path in sorted((root / "tree" / "usr/share/info").glob(f"{manual}*.gz")):
                paragraphs += [p for p in _info_paragraphs(gzip.decompress(path.read_bytes()).decode("utf-8"))
                               if _is_prose(p)]
    return list(dict.fromkeys(paragraphs))  # the licence notice every manual repeats, once


def _info_paragraphs(text: str) -> list[str]:
    """Blocks of an Info file between blank lines, markup dropped, wrapped lines joined."""
    blocks = []
    for block in re.split(r"\n\s*\n", text.replace("\x1f", "\n\n")):
        lines = [line.strip() for line in block.splitlines()]
        if not lines or lines[0].startswith(("File:", "* Menu:", "Tag Table:", "End Tag Table", "INFO-DIR-SECTION")):
            continue
        lines = [line for line in lines if line and not re.match(r"^\*+ .*::", line) and not set(line) <= set("=*-.")]
        blocks.append(" ".join(" ".join(lines).split()))
    return blocks


def _is_prose(paragraph: str) -> bool:
    letters = sum(ch.isalpha() or ch == " " for ch in paragraph)
    return len(paragraph.split()) >= 20 and letters >= 0.85 * len(paragraph)


def _fortune_paragraphs(root: Path) -> list[str]:
    """One paragraph per fortune entry of the chosen files, in file order."""
    paragraphs: list[str] = []
    for name in FORTUNES:
        text = (root / "tree" / "usr/share/games/fortunes" / name).read_text(encoding="utf-8", errors="replace")
        entries = (" ".join(entry.split()) for entry in re.split(r"^%\s*$", text, flags=re.MULTILINE))
        paragraphs += [entry for entry in entries if len(entry.split()) >= 8]
    return paragraphs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the texts are written")
    args = parser.parse_args()
    for name, path in build(args.cache).items():
        print(f"{name}: {path}")
    print((args.cache / "sources.json").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
