"""Atomic file output and the run directory.

Every result is written to a temporary file next to its destination and renamed into place, so a
crash never leaves a half-written table or model, and a run never silently replaces another run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
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
    """Yield an empty staging directory; on success it replaces ``target``, on any error it is removed (a failed
    safetensors write raised as a :class:`WriteError` naming its file)."""
    staging = staging_dir(target)
    try:
        yield staging
        replace_dir(staging, target)
    except BaseException as exc:
        named = _named_write_error(exc, staging, target)
        shutil.rmtree(staging, ignore_errors=True)
        if named is not None:
            raise named from exc
        raise


#: The errno values of a write the file system refused: full, over quota, read-only, no permission.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class WriteError(OSError):
    """A library's failed write as an :class:`OSError` that names the file (safetensors' own error names none)."""


def _named_write_error(exc: BaseException, staging: Path, target: Path) -> WriteError | None:
    """A ``SafetensorError`` of a write into ``staging`` as a :class:`WriteError` naming the file (as it would be
    called in ``target``) and the system's reason; None for any other error."""
    if type(exc).__name__ != "SafetensorError":
        return None
    text = " ".join(str(exc).split())
    code, reason = re.search(r"code: (\d+)", text), re.search(r'message: "([^"]*)"', text)
    written = sorted(staging.rglob("*.safetensors"), key=lambda path: path.stat().st_mtime)
    name = target / written[-1].relative_to(staging) if written else target / "*.safetensors"
    return WriteError(int(code.group(1)) if code else errno.EIO, reason.group(1) if reason else text, str(name))


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


def check_run_dir(path: Path, overwrite: bool, config: dict[str, Any] | None = None,
                  resume: bool = False) -> RunLock | None:
    """Make ``path`` ready for a run, or refuse with one line (see :mod:`.run_manifest`).

    Refused even with ``overwrite``: places whose contents a run must never touch (``/``, home, a project root).
    Refused without it: a finished run, an unfinished run of other settings, a directory of other files.
    ``--overwrite`` removes exactly what the previous run wrote; ``resume`` keeps everything (the statistics
    checkpoint is continued) but only for an unfinished run of the same settings. An existing directory is
    locked first (refused while another live run holds it) and stays locked: the returned lock. A directory
    that does not exist yet is made and locked by the run's first write (:func:`lock_new_run_dir`), so a run
    stopped by bad input before then leaves nothing behind.
    """
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
        if resume:
            raise RunDirectoryError(f"--resume: output directory '{path}' does not exist, so there is no run to "
                                    "resume. Pass the --output of the interrupted run, or start without --resume.")
        return None
    lock = lock_run_dir(path)
    try:
        _claim(path, overwrite, config, resume)
    except BaseException:
        lock.release()
        raise
    return lock


def _claim(path: Path, overwrite: bool, config: dict[str, Any] | None, resume: bool) -> None:
    """:func:`check_run_dir` for an existing directory this process holds the lock of."""
    from gp_lightning.runtime import run_manifest

    manifest = run_manifest.read(path)
    kind = run_manifest.state(manifest)
    if resume:
        if kind == "running":
            raise in_use(path, manifest["pid"], "wait for it before resuming")
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


#: The lock file of a run directory: ``fcntl.flock``-ed by the live run that owns the directory (its pid inside).
LOCK_FILE = ".gp-lightning.lock"


def in_use(path: Path, pid: object, fix: str = "wait for it, or choose another --output") -> RunDirectoryError:
    """The one-line refusal of a directory another live run writes."""
    return RunDirectoryError(f"Output directory '{path}' is being written by another run (pid {pid}): {fix}.")


class RunLock:
    """This process's exclusive hold on a run directory: an ``fcntl.flock`` on its :data:`LOCK_FILE`.

    The operating system releases it when the process ends, however it ends; :meth:`release` also removes the file.
    """

    def __init__(self, file: Path, fd: int) -> None:
        self.file, self._fd = file, fd

    def __del__(self) -> None:  # a recipe dropped without its cleanup (its setup raised) does not keep the lock
        with contextlib.suppress(Exception):  # at interpreter exit: the OS releases it anyway
            self.release()

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            if _is_open_file(self._fd, self.file):
                self.file.unlink()
        os.close(self._fd)
        self._fd = -1


def _is_open_file(fd: int, file: Path) -> bool:
    """Whether ``file`` still names the file open as ``fd`` (its holder may have removed it since we opened it)."""
    try:
        named, held = os.stat(file), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def lock_run_dir(path: Path) -> RunLock:
    """Lock ``path`` (made if missing) for this process, or refuse naming the live run that holds it."""
    file = path / LOCK_FILE
    while True:
        path.mkdir(parents=True, exist_ok=True)
        fd = os.open(file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise in_use(path, holder) from None
        except BaseException:
            os.close(fd)
            raise
        if _is_open_file(fd, file):
            break
        os.close(fd)  # its last holder removed it between our open and our lock: lock the new one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return RunLock(file, fd)


def _holder(fd: int) -> str:
    """The pid written in a lock file another process holds (it writes it just after locking: wait for it)."""
    for _ in range(100):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.02)
    return "unknown"


def lock_new_run_dir(path: Path) -> RunLock:
    """The first write of a run into ``path``, which did not exist when :func:`check_run_dir` looked: make and lock
    it, and refuse (writing nothing) if another run has written into it meanwhile."""
    from gp_lightning.runtime import run_manifest

    lock = lock_run_dir(path)
    if any(not p.name.startswith(".") for p in path.iterdir()):
        lock.release()
        pid = (run_manifest.read(path) or {}).get("pid", "unknown")
        raise RunDirectoryError(f"Output directory '{path}' was taken by another run (pid {pid}) while this one was "
                                "loading: choose another --output.")
    return lock


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
