"""Atomic file output and the run directory.

Every result is written to a temporary file next to its destination and renamed into place, so a
crash never leaves a half-written table or model, and a run never silently replaces another run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from gp_lightning.runtime.errors import RunDirectoryError

#: Files whose presence means a directory already holds a run.
RUN_MARKERS = ("config.yaml", "global_group_table.csv", "evaluation_results.json", "model", "adapter")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results get the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(path: Path, frame: Any) -> None:
    atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def checksum_path(path: Path) -> Path:
    """Where :func:`write_checksum` puts ``path``'s digest (``sha256sum -c`` reads it)."""
    return path.with_name(path.name + ".sha256")


def file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksum(path: Path) -> None:
    """``path``'s SHA-256 beside it, so that a copy cut short or changed later is recognized when read back."""
    write_text(checksum_path(path), f"{file_sha256(path)}  {path.name}\n")


def replace_dir(staging: Path, target: Path) -> None:
    """Move a fully written ``staging`` directory onto ``target`` (replacing an older one)."""
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, trash)
        os.replace(staging, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, target)


def staging_dir(target: Path) -> Path:
    """A new empty directory beside ``target`` (the usual mode, not mkdtemp's 0700), named after this process;
    staging directories that processes no longer alive left behind (a killed save) are removed first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*-*"):
        owner = stale.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if owner.isdigit() and not process_alive(int(owner)):
            shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-{os.getpid()}-"))
    os.chmod(staging, 0o777 & ~_umask())
    return staging


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a stale staging directory or run manifest is one whose owner is gone).

    Only a positive pid names one process (0 and negative ones name process groups to ``kill``)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``target``, on any error it is removed."""
    staging = staging_dir(target)
    try:
        yield staging
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _protected(path: Path) -> str | None:
    """Why ``path`` must never be a run directory (its contents are someone else's), or None."""
    resolved = path.expanduser().resolve()
    project = Path(__file__).resolve().parents[2]
    if resolved == Path(resolved.anchor):
        return "the file system root"
    if resolved == Path.home().resolve():
        return "your home directory"
    if resolved == project or (resolved / ".git").exists() or (resolved / "setup.cfg").is_file():
        return "a project's root directory"
    return None


def check_run_dir(path: Path, overwrite: bool, config: dict[str, Any] | None = None, resume: bool = False) -> None:
    """Make ``path`` ready for a run, or refuse with one line (see :mod:`.run_manifest`).

    Refused even with ``overwrite``: places whose contents a run must never touch (``/``, home, a project root).
    Refused without it: a finished run, an unfinished run of other settings, a directory of other files.
    ``--overwrite`` removes exactly what the previous run wrote; ``resume`` keeps everything (the statistics
    checkpoint is continued) but only for an unfinished run of the same settings.
    """
    from gp_lightning.runtime import run_manifest

    if path.exists() and not path.is_dir():
        raise RunDirectoryError(f"Output '{path}' exists and is not a directory: choose another --output.")
    for parent in path.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise RunDirectoryError(f"Output '{path}' is inside '{parent}', which is a file: choose another --output.")
    why = _protected(path)
    if why is not None:
        raise RunDirectoryError(f"Output '{path}' is {why}: a run writes and replaces files there. Choose a "
                                "directory of its own, e.g. --output runs/x.")
    if not path.is_dir():
        return
    manifest = run_manifest.read(path)
    kind = run_manifest.state(manifest)
    if resume:
        if kind == "running":
            raise RunDirectoryError(f"Output directory '{path}' is being written by another run (pid "
                                    f"{manifest['pid']}): wait for it before resuming.")
        if config is not None:
            check_resumable(path, config)
        return
    found = [name for name in RUN_MARKERS if (path / name).exists()]
    # a run of an earlier release (no run.json) always wrote both; a lone model/ may be anybody's
    legacy = kind == "none" and (path / "config.yaml").is_file() and (path / "training.log").is_file()
    if (kind == "complete" or legacy) and not overwrite:
        raise RunDirectoryError(
            f"Output directory '{path}' already holds a run ({', '.join(found) or run_manifest.MANIFEST}). Choose "
            "another --output, or pass --overwrite to replace its results."
        )
    others = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    if others and kind == "none" and not legacy and not overwrite:
        raise RunDirectoryError(
            f"Output directory '{path}' is not empty and holds no gp-lightning run ({', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}). Choose a new or empty --output, or pass --overwrite to write "
            "the run's files beside them.")
    same = None if config is None or not (path / "config.yaml").is_file() else not _config_changes(path, config)
    run_manifest.claim(path, overwrite, same, has_legacy_run=legacy)


#: Keys that may differ between an interrupted run and its resumption (they do not change its results).
_RESUME_FREE_KEYS = ("resume", "overwrite", "log_level", "checkpoint_every", "output")


def check_resumable(path: Path, config: dict[str, Any]) -> None:
    """``--resume`` continues an unfinished run of the same settings, and nothing else: before a file is rewritten."""
    if (path / "evaluation_results.json").exists():
        raise RunDirectoryError(f"--resume: the run in '{path}' has finished (evaluation_results.json); there is "
                                "nothing to resume. Pass --overwrite to run it again.")
    if not (path / "config.yaml").is_file():
        return  # the statistics checkpoint itself says whether there is anything to resume
    differ = _config_changes(path, config)
    if differ:
        shown = ", ".join(differ[:6])
        raise RunDirectoryError(f"--resume: the run in '{path}' was started with other settings ({shown}). Resume it "
                                "with its own settings (its config.yaml), or start again with --overwrite.")


def _config_changes(path: Path, config: dict[str, Any]) -> list[str]:
    """``key old -> new`` for every setting (but the free ones) in which ``config`` differs from ``path``'s config.yaml."""
    previous = path / "config.yaml"
    try:
        before = _flat(yaml.safe_load(previous.read_text(encoding="utf-8")) or {})
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError) as exc:
        raise RunDirectoryError(f"'{previous}' is not readable ({' '.join(str(exc).split())[:120]}); start again "
                                "with --overwrite.") from None
    now = _flat(json.loads(json.dumps(config, default=str)))
    keys = sorted(k for k in set(before) | set(now) if k not in _RESUME_FREE_KEYS and before.get(k) != now.get(k))
    return [f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in keys]


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """Group -> key -> value as key -> value (the flat keys the command line uses)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def open_run_log(run_dir: Path, logger: logging.Logger, config: dict[str, Any]) -> logging.Handler:
    """Start a run directory: its manifest (``running``), ``config.yaml`` (the resolved config) and ``training.log``
    (``logger``'s records)."""
    from gp_lightning.runtime import run_manifest

    run_manifest.begin(run_dir)
    handler = logging.FileHandler(run_dir / "training.log", mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:  # the log gets INFO; debug stays debug
        logger.setLevel(logging.INFO)
    write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    return handler
