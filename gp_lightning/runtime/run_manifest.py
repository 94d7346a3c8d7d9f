"""A run directory belongs to one run: ``run.json`` says which files that run wrote and whether it finished.

Written when the run writes its first file (status ``running``, with its pid and the files and directories
that were already there), rewritten last when it finishes (``complete``, with the files it wrote and the
directories it made, as paths relative to the run directory) or fails (``failed``). ``--overwrite`` then
removes exactly the files the previous run wrote, and the directories it made once they are empty (a file
you put into ``analysis/`` stays, and so does ``analysis/``), before the new one starts, so two runs never
mix; an unfinished run (failed, or killed: ``running`` with a dead pid) may be redone
by the same command without ``--overwrite``. Every command that reads a run (``--from_table``, ``compare``,
``evaluate``, ``upgrade-checkpoint``, ``export-gguf``, ``train.py --model``) asks :func:`require_complete` first.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from gp_lightning.runtime.errors import RunDirectoryError
from gp_lightning.runtime.io import in_use, process_alive, write_json

logger = logging.getLogger(__name__)

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


def run_directory_of(path: str | Path) -> Path | None:
    """The run directory ``path`` is, or lies in (``runs/x/model``, ``runs/x/global_group_table.csv``): the nearest of
    it and its parents that holds a run.json; None for a path that does not exist or lies in no run."""
    if not path:  # no path given ("")
        return None
    path = Path(path).expanduser().absolute()
    if not path.exists():
        return None
    return next((folder for folder in (path, *path.parents) if (folder / MANIFEST).is_file()), None)


def require_complete(path: str | Path, reader: str, own_output: str | Path | None = None,
                     allow_unfinished: bool = False) -> None:
    """Refuse to read ``path`` unless the run that wrote it finished: one line naming the run's state and the fix.

    A path in no run (a plain checkpoint, a run of a release before run.json) is read as before. A run reads what
    it writes itself: ``own_output``, the run the reader is a step of (``prune.py --finetune`` reads its model/).
    ``allow_unfinished``: a run that failed or died is only warned about (one that still runs is refused).
    """
    run = run_directory_of(path)
    if run is None or (own_output is not None and Path(own_output).expanduser().absolute().is_relative_to(run)):
        return
    manifest = read(run)
    kind, status, pid = state(manifest), (manifest or {}).get("status"), (manifest or {}).get("pid")
    if kind == "complete":
        return
    if kind == "running":
        raise RunDirectoryError(f"{reader}: {path} belongs to the run in {run}, which is still running (pid {pid}): "
                                "wait for it to finish.")
    how = f"run.json says {status}" if status != "running" else f"run.json says running, but its pid {pid} is gone"
    if manifest is None:
        how = "its run.json is unreadable"
    if allow_unfinished:
        logger.warning("%s: %s belongs to the run in %s, which did not finish (%s): read anyway, as asked", reader,
                       path, run, how)
        return
    raise RunDirectoryError(f"{reader}: {path} belongs to the run in {run}, which did not finish ({how}): finish that "
                            "run first (rerun its command; the same settings redo it), or use a finished run.")


def _write(path: Path, data: dict[str, Any]) -> None:
    write_json(path / MANIFEST, data)


def begin(path: Path) -> None:
    """Mark ``path`` as written by this process from now on (call before the run's first file).

    A manifest still there belongs to the unfinished run that ``--resume`` continues: what was there before *that*
    run started stays the user's."""
    path.mkdir(parents=True, exist_ok=True)
    previous = read(path) or {}
    if "preexisting_dirs" in previous:
        files, dirs = previous["preexisting"], previous["preexisting_dirs"]
    else:
        files, dirs = _tree(path)
    _write(path, {"status": "running", "pid": os.getpid(), "started": _now(), "preexisting": files,
                  "preexisting_dirs": dirs})


def finish(path: Path, status: str = "complete") -> None:
    """Mark the run complete (or failed) and list the files it wrote and the directories it made; written last."""
    manifest = read(path) or {}
    files, dirs = _written_since(path, manifest)
    _write(path, {**manifest, "status": status, "finished": _now(), "files": files, "dirs": dirs})


def _tree(path: Path) -> tuple[list[str], list[str]]:
    """The files (symbolic links included) and the directories under ``path``, as sorted relative POSIX paths;
    hidden ones (the lock, staging directories) and the manifest left out."""
    files, dirs = [], []
    for root, subdirs, names in os.walk(path):
        here = Path(root).relative_to(path)
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        for name in subdirs:  # os.walk lists a link to a directory here and does not enter it
            (files if (Path(root) / name).is_symlink() else dirs).append((here / name).as_posix())
        files += [(here / name).as_posix() for name in names if not name.startswith(".")]
    return sorted(f for f in files if f != MANIFEST), sorted(dirs)


def _written_since(path: Path, manifest: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The files and directories in ``path`` that were not there when ``manifest``'s run began."""
    files, dirs = _tree(path)
    old_files, old_dirs = set(manifest.get("preexisting", [])), set(manifest.get("preexisting_dirs", []))
    return [f for f in files if f not in old_files], [d for d in dirs if d not in old_dirs]


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def remove_previous(path: Path, manifest: dict[str, Any] | None) -> None:
    """Delete what the previous run in ``path`` wrote: the files its manifest lists, then the directories it made
    that are empty now; a run killed before it listed them wrote what appeared since it began. Runs of earlier
    releases listed (or, without a manifest, wrote) whole top-level names: those go whole."""
    if manifest is not None and "preexisting_dirs" in manifest:
        if "files" in manifest:
            files, dirs = manifest["files"], manifest.get("dirs", [])
        else:
            files, dirs = _written_since(path, manifest)
        _remove_files(path, files, dirs)
    else:
        if manifest is None:
            names = list(LEGACY_OUTPUTS)
        else:
            keep = set(manifest.get("preexisting", []))
            names = manifest.get("files", [p.name for p in path.iterdir() if p.name not in keep])
        for name in names:
            target = path / name
            if _inside(path, name) and target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif _inside(path, name) and (target.exists() or target.is_symlink()):
                target.unlink()
    (path / MANIFEST).unlink(missing_ok=True)


def _inside(path: Path, name: str) -> bool:
    """Whether the manifest entry ``name`` is a path below ``path``, not hidden (the lock), and not reached through a
    link: an edited manifest, or a directory replaced by a link, deletes nothing elsewhere."""
    parts = Path(name).parts
    if not parts or Path(name).is_absolute() or ".." in parts or parts[0].startswith("."):
        return False
    return (path / name).parent.resolve() == path.resolve().joinpath(*parts[:-1])


def _remove_files(path: Path, files: list[str], dirs: list[str]) -> None:
    for name in files:
        target = path / name
        if _inside(path, name) and (target.is_symlink() or target.is_file()):
            target.unlink()
    for name in sorted(dirs, key=lambda d: d.count("/"), reverse=True):  # the deepest first
        if _inside(path, name) and not (path / name).is_symlink():
            with contextlib.suppress(OSError):  # not empty: it holds files that run did not write
                (path / name).rmdir()


def claim(path: Path, overwrite: bool, same_settings: bool | None, has_legacy_run: bool) -> None:
    """Make ``path`` ready for a new run, or refuse: one line naming what is there and the way out.

    ``same_settings``: whether the previous run's config.yaml equals the new run's (None: there is none).
    """
    manifest = read(path)
    kind = state(manifest)
    if kind == "running":
        raise in_use(path, manifest["pid"])
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
