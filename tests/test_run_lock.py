"""A run directory is owned by one live run: an OS lock (flock) that a second run meets and a dead one does not hold."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from gp_lightning import __version__
from gp_lightning.runtime.errors import RunDirectoryError
from gp_lightning.runtime.io import LOCK_FILE, check_run_dir, lock_new_run_dir


def _prune(checkpoint: Path, wikitext: Path, output: Path, ratio: str) -> subprocess.Popen:
    args = ["--model", str(checkpoint), "--output", str(output), "--pruning_ratio", ratio, "--num_samples", "4",
            "--seq_len", "32", "--batch_size", "4", "--dataset", str(wikitext / "valid.txt"), "--precision",
            "32-true", "--test_before_prune", "false", "--test_after_prune", "false", "--save_model", "false",
            "--compensation", "none"]
    return subprocess.Popen([sys.executable, str(ROOT / "prune.py"), *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_runs_started_at_once_into_one_directory(tmp_path: Path, tiny_checkpoint: Path, wikitext: Path) -> None:
    """Exactly one runs; the other stops with one line naming the winner's pid and writes or deletes nothing."""
    race = tmp_path / "race"
    runs = {ratio: _prune(tiny_checkpoint, wikitext, race, ratio) for ratio in ("0.001", "0.002")}
    done = {ratio: (run, *run.communicate(timeout=300)) for ratio, run in runs.items()}
    codes = sorted(run.returncode for run, _, _ in done.values())
    assert codes[0] == 0 and codes[1] != 0, {r: (run.returncode, err[-2000:]) for r, (run, _, err) in done.items()}
    ratio = next(r for r, (run, _, _) in done.items() if run.returncode == 0)
    winner, loser = done[ratio][0], next(err for run, _, err in done.values() if run.returncode != 0)
    errors = [line for line in loser.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in loser, loser[-2000:]
    assert re.search(rf"Output directory '.*race' .*\(pid {winner.pid}\).*--output", errors[0]), errors[0]
    assert f"pruning_ratio: {ratio}" in (race / "config.yaml").read_text()
    assert (race / "training.log").read_text().count(f"gp-lightning {__version__}:") == 1  # one run.s lines
    manifest = json.loads((race / "run.json").read_text())
    assert manifest["status"] == "complete" and manifest["pid"] == winner.pid and manifest["preexisting"] == []
    written = sorted(str(p.relative_to(race)) for p in race.rglob("*") if p.is_file())
    assert written == sorted([*manifest["files"], "run.json"])  # no lock left, nothing of the loser


def test_a_lock_held_by_a_dead_process_does_not_block(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from gp_lightning.runtime.io import lock_run_dir; lock = lock_run_dir(Path(sys.argv[1])); "
                               "print('locked', flush=True); time.sleep(120)", str(run)],
                              cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError, match=rf"being written by another run \(pid {holder.pid}\): wait for "
                                                    "it, or choose another --output"):
            check_run_dir(run, overwrite=False)
        with pytest.raises(RunDirectoryError, match=rf"being written by another run \(pid {holder.pid}\)"):
            lock_new_run_dir(run)  # the first write of a run that found no directory when it started
        assert (run / LOCK_FILE).read_text().strip() == str(holder.pid)  # the refused runs removed nothing
    finally:
        holder.kill()
        holder.wait()
    assert (run / LOCK_FILE).exists()  # killed: its lock file stays, its lock went with it
    lock = check_run_dir(run, overwrite=False)
    assert lock is not None and (run / LOCK_FILE).read_text().strip() != str(holder.pid)
    lock.release()
    assert list(run.iterdir()) == []


def test_a_directory_another_run_made_while_this_one_loaded_is_refused(tmp_path: Path) -> None:
    """It finished (or died) before this run's first write: refused naming it, and nothing of it is touched."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "complete", "pid": 4242, "files": []}))
    with pytest.raises(RunDirectoryError, match=r"was taken by another run \(pid 4242\) while this one was loading: "
                                                "choose another --output"):
        lock_new_run_dir(run)
    assert [p.name for p in run.iterdir()] == ["run.json"]
