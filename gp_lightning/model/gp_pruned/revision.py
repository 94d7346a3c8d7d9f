"""Which revision of the gp_pruned code a checkpoint ships, and a warning when it is older than this release's.

A pruned checkpoint carries ``configuration_gp_pruned.py`` and ``modeling_gp_pruned.py`` so that any
process with transformers can load it (``trust_remote_code``). Those copies are frozen at save
time; when transformers changes an API they rely on, every checkpoint saved before the fix is
affected, and ``gp-lightning upgrade-checkpoint`` (:mod:`gp_lightning.export.upgrade`) repairs it.
Files are read as text, so none of this needs torch.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

#: The files a pruned checkpoint ships, and where the current ones are.
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
