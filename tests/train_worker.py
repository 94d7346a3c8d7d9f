"""Fine-tune several times in one process group: ``torchrun ... train_worker.py ARGS [--next ARGS ...]``.

Each ARGS is a command line of ``train.py`` (the same ``train_main``), run one after the other, so one
launch of two ranks serves the DDP and the FSDP cases of tests/test_finetune.py (a launch costs more
than a tiny fine-tune).
"""

from __future__ import annotations

import sys

from gp_lightning.cli import train_main


def main(argv: list[str]) -> int:
    runs: list[list[str]] = [[]]
    for arg in argv:
        if arg == "--next":
            runs.append([])
        else:
            runs[-1].append(arg)
    for args in runs:
        code = train_main(args)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
