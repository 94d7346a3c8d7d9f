"""A run directory belongs to one run: ``run.json`` says which files that run wrote and whether it finished.

Written when the run writes its first file (status ``running``, with its pid and the names that were
already there), rewritten last when it finishes (``complete``, with the files it wrote) or fails
(``failed``). ``--overwrite`` then removes exactly what the previous run wrote before the new one starts,
so two runs never mix; an unfinished run (failed, or killed: ``running`` with a dead pid) may be redone
by the same command without ``--overwrite``; ``compare`` and ``--from_table`` refuse unfinished runs.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from pathlib import Path
from typing import Any

from gp_lightning.runtime.errors import RunDirectoryError
from gp_lightning.runtime.io import process_alive, write_json

MANIFEST = "run.json"

#: What runs of earlier releases (without a manifest) wrote: removed by ``--overwrite`` of such a run.
LEGACY_OUTPUTS = ("config.yaml", "training.log", "description.txt", "global_group_table.csv",
                  "global_group_table.csv.sha256", "groups_to_prune.csv", "pruning_plan.json", "evaluation_results.json",
                  "analysis", "visualization", "model", "model.gguf", "calibration_state", "finetune", "adapter",
                  "lightning_logs")


def read(path: Path) -> dict[str, Any] | None:
    """The manifest of the run in ``path`` (None: no manifest, or an unreadable one)."""
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def state(manifest: dict[str, Any] | None) -> str:
    """complete | running (a live process writes it) | unfinished (failed or killed) | none."""
    if manifest is None:
        return "none"
    status = manifest.get("status")
    if status == "complete":
        return "complete"
    pid = int(manifest.get("pid", -1))
    if status == "running" and process_alive(pid) and pid != os.getpid():
        return "running"
    return "unfinished"


def _write(path: Path, data: dict[str, Any]) -> None:
    write_json(path / MANIFEST, data)


def begin(path: Path) -> None:
    """Mark ``path`` as written by this process from now on (call before the run's first file)."""
    path.mkdir(parents=True, exist_ok=True)
    before = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and not p.name.startswith("."))
    _write(path, {"status": "running", "pid": os.getpid(), "started": _now(), "preexisting": before})


def finish(path: Path, status: str = "complete") -> None:
    """Mark the run complete (or failed) and list the files it wrote; written last."""
    manifest = read(path) or {}
    keep = set(manifest.get("preexisting", []))
    files = sorted(p.name for p in path.iterdir() if p.name not in keep and p.name != MANIFEST
                   and not p.name.startswith("."))
    _write(path, {**manifest, "status": status, "finished": _now(), "files": files})


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def remove_previous(path: Path, manifest: dict[str, Any] | None) -> None:
    """Delete what the previous run in ``path`` wrote (its manifest's files, or a legacy run's known outputs)."""
    if manifest is None:
        names = list(LEGACY_OUTPUTS)
    elif "files" in manifest:
        names = list(manifest["files"])
    else:  # killed before it listed its files: everything that appeared since it started
        keep = set(manifest.get("preexisting", []))
        names = [p.name for p in path.iterdir() if p.name not in keep and not p.name.startswith(".")]
    for name in [*names, MANIFEST]:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def claim(path: Path, overwrite: bool, same_settings: bool | None, has_legacy_run: bool) -> None:
    """Make ``path`` ready for a new run, or refuse: one line naming what is there and the way out.

    ``same_settings``: whether the previous run's config.yaml equals the new run's (None: there is none).
    """
    manifest = read(path)
    kind = state(manifest)
    if kind == "running":
        raise RunDirectoryError(f"Output directory '{path}' is being written by another run (pid {manifest['pid']}): "
                                "wait for it, or choose another --output.")
    if kind == "complete" or (kind == "none" and has_legacy_run):
        if not overwrite:
            return  # the caller's "already holds a run" refusal applies
        remove_previous(path, manifest)
    elif kind == "unfinished":
        if not (overwrite or same_settings):
            raise RunDirectoryError(f"Output directory '{path}' holds an unfinished run started with other settings: "
                                    "rerun it with its own settings (its config.yaml), or pass --overwrite to replace "
                                    "it.")
        remove_previous(path, manifest)
    elif overwrite and path.is_dir():
        taken = [name for name in LEGACY_OUTPUTS if (path / name).exists()]
        if taken:
            raise RunDirectoryError(f"Output directory '{path}' holds {', '.join(taken)} that no gp-lightning run "
                                    "wrote; a run would replace them. Choose another --output.")
