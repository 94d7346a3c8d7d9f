"""Keep the code shipped inside pruned checkpoints current: detect stale copies, rewrite them in place.

A pruned checkpoint carries ``configuration_gp_pruned.py`` and ``modeling_gp_pruned.py`` so that any
process with transformers can load it (``trust_remote_code``). Those copies are frozen at save
time; when transformers changes an API they rely on, every checkpoint saved before the fix is
affected. :func:`upgrade_checkpoint` replaces the two files with this release's (atomically, the
weights and config untouched), and :func:`warn_if_stale` tells whoever loads an old checkpoint.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

from gp_lightning.errors import CheckpointError
from gp_lightning.io import write_text

#: The files a pruned checkpoint ships, and where the current ones come from (read as text: no torch needed).
SHIPPED_CODE = {name: Path(__file__).with_name(name) for name in ("configuration_gp_pruned.py", "modeling_gp_pruned.py")}
_REVISION = re.compile(r"^MODELING_REVISION\s*=\s*(\d+)\s*$", re.MULTILINE)


class StaleCheckpointCodeWarning(UserWarning):
    """A pruned checkpoint ships modeling code older than the installed gp-lightning's."""


def code_revision(path: Path) -> int | None:
    """Revision of a modeling file (1 for files from before revisions were numbered); None if there is none."""
    if not path.is_file():
        return None
    found = _REVISION.search(path.read_text(encoding="utf-8", errors="replace"))
    return int(found.group(1)) if found else 1


def shipped_revision(directory: str | Path) -> int | None:
    """Revision of the modeling code a checkpoint ships; None when it ships none (no remote-code loading)."""
    return code_revision(Path(directory) / "modeling_gp_pruned.py")


CURRENT_REVISION = code_revision(SHIPPED_CODE["modeling_gp_pruned.py"]) or 1


def is_pruned_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` holds a gp-lightning pruned checkpoint (its config says ``gp_pruned``)."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "gp_pruned"
    except (ValueError, AttributeError):
        return False


def upgrade_hint(directory: str | Path) -> str:
    return f"gp-lightning upgrade-checkpoint {directory}"


def warn_if_stale(directory: str | Path) -> None:
    """Warn, with the command that repairs it, when a pruned checkpoint ships older modeling code."""
    if not is_pruned_checkpoint(directory):
        return
    revision = shipped_revision(directory)
    if revision is not None and revision < CURRENT_REVISION:
        warnings.warn(
            f"The pruned checkpoint {directory} ships modeling code revision {revision}; this gp-lightning has "
            f"revision {CURRENT_REVISION}. Loaded with trust_remote_code (transformers, serving stacks) it may "
            f"generate wrong tokens on current transformers. Repair it with `{upgrade_hint(directory)}` "
            "(rewrites only its two .py files).",
            StaleCheckpointCodeWarning, stacklevel=3,
        )


def upgrade_checkpoint(directory: str | Path) -> tuple[int | None, int]:
    """Rewrite the shipped code files of a pruned checkpoint with this release's; return (old, new) revision.

    Each file is written to a temporary file and renamed over the old one; weights, config and
    tokenizer are not touched. A directory that is not a gp-lightning pruned checkpoint is refused.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"'{directory}' is not a directory: pass the directory of a pruned checkpoint "
                              "(e.g. runs/x/model).")
    if not is_pruned_checkpoint(directory):
        raise CheckpointError(
            f"'{directory}' is not a gp-lightning pruned checkpoint (its config.json is missing or its model_type "
            "is not gp_pruned); only pruned checkpoints ship gp-lightning code. Pass the model/ directory of a run."
        )
    before = shipped_revision(directory)
    for name, source in SHIPPED_CODE.items():
        write_text(directory / name, source.read_text(encoding="utf-8"))
    return before, CURRENT_REVISION


def main(argv: list[str] | None = None) -> int:
    """``gp-lightning upgrade-checkpoint DIR [DIR ...]``: repair the code of older pruned checkpoints."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="gp-lightning upgrade-checkpoint", description=main.__doc__)
    parser.add_argument("checkpoints", nargs="+", help="pruned checkpoint directories (e.g. runs/x/model)")
    args = parser.parse_args(argv)
    for directory in args.checkpoints:
        try:
            before, after = upgrade_checkpoint(directory)
        except CheckpointError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        state = "already current, rewritten" if before == after else f"revision {before} -> {after}"
        print(f"{directory}: modeling code {state} ({', '.join(SHIPPED_CODE)}; weights untouched)")
    return 0
