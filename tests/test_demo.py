"""`make demo` as a user's fresh clone runs it: WikiText-2 from the hub, or from a local copy (DEMO_DATA) when there
is one, and with neither one line that names both ways on."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLONE_FILES = ("Makefile", "prune.py", "configs", "setup.cfg", "pyproject.toml")

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make(clone: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``make -s -o model <args>`` in ``clone`` with this interpreter's environment: the model (and the install it
    depends on) is taken as done, so nothing is installed or downloaded."""
    clean = {k: v for k, v in (env or os.environ).items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-s", "-o", "model", *args, f"VENV={sys.prefix}"], cwd=clone, env=clean,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A checkout beside which there is no ../shared folder (its files linked to this one's)."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for name in CLONE_FILES:
        (clone / name).symlink_to(ROOT / name)
    assert not (tmp_path / "shared").exists()
    return clone


def test_demo_reads_the_local_copy_when_there_is_one_else_the_config_s_hub_dataset(clone: Path, tmp_path: Path
                                                                                  ) -> None:
    def command(*args: str) -> str:  # what `make demo` would run, as one line
        return " ".join(_make(clone, "-n", "demo", *args).stdout.replace("\\\n", " ").split())

    assert command().endswith("--overwrite")  # configs/smollm2-135m.yaml: wikitext2 from the hub
    copy = tmp_path / "shared" / "data" / "wikitext-2"
    copy.mkdir(parents=True)
    (copy / "valid.txt").write_text("v")
    assert command().endswith("--overwrite")  # valid.txt without test.txt is no copy
    (copy / "test.txt").write_text("t")
    assert command().endswith("--overwrite --dataset ../shared/data/wikitext-2/valid.txt --eval_dataset "
                              "../shared/data/wikitext-2/test.txt")
    assert command(f"DEMO_DATA={copy}").endswith(f"--dataset {copy}/valid.txt --eval_dataset {copy}/test.txt")


def test_demo_without_hub_or_local_copy_stops_in_one_line(clone: Path, tmp_path: Path) -> None:
    """Offline, with empty Hugging Face caches: the data is checked before the model loads or a run directory is
    made, and the user reads one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_DATASETS_CACHE=str(tmp_path / "hf" / "datasets"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    done = _make(clone, "demo", env=env)
    assert done.returncode != 0 and done.stdout == ""
    error, *make_lines = done.stderr.splitlines()
    assert [re.sub(r"\[.*\]", "[...]", line) for line in make_lines] == ["make: *** [...] Error 2"], done.stderr
    assert error == (
        "error: Dataset 'wikitext2' (wikitext, split train): the Hugging Face hub could not be reached (offline mode "
        "is on: HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) and the datasets cache has no copy. Connect to the hub, or "
        "pass local text with --dataset (calibration) and --eval_dataset (evaluation), e.g. the valid.txt and "
        "test.txt of a WikiText-2 copy (make demo DEMO_DATA=<its folder> passes them).")
    assert not (clone / "runs").exists()
