"""``gp-lightning upgrade-checkpoint DIR``: rewrite the code a pruned checkpoint ships with this release's.

The weights, config and tokenizer are not touched; each code file is replaced atomically. Loading
a checkpoint with older code warns with this command (:mod:`gp_lightning.model.gp_pruned.revision`).
"""

from __future__ import annotations

from pathlib import Path

from gp_lightning.model.gp_pruned.revision import CURRENT_REVISION, SHIPPED_CODE, is_pruned_checkpoint, shipped_revision
from gp_lightning.runtime import run_manifest
from gp_lightning.runtime.errors import CheckpointError, GPLightningError
from gp_lightning.runtime.io import write_text


def upgrade_checkpoint(directory: str | Path) -> tuple[int | None, int]:
    """Rewrite the shipped code files of a pruned checkpoint with this release's; return (old, new) revision.

    Each file is written to a temporary file and renamed over the old one; weights, config and
    tokenizer are not touched. A directory that is not a gp-lightning pruned checkpoint, or that a run which did not
    finish wrote, is refused.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"'{directory}' is not a directory: pass the directory of a pruned checkpoint "
                              "(e.g. runs/x/model).")
    run_manifest.require_complete(directory, "upgrade-checkpoint")
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
        except GPLightningError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        state = "already current, rewritten" if before == after else f"revision {before} -> {after}"
        print(f"{directory}: modeling code {state} ({', '.join(SHIPPED_CODE)}; weights untouched)")
    return 0
