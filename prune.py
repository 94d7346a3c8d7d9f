"""Global structured pruning entry point: ``python prune.py --config configs/smollm2-135m.yaml``.

Works under any launcher (python, torchrun, accelerate launch); ``--help`` lists every option.
"""

import sys

from gp_lightning.cli import prune_main

if __name__ == "__main__":
    sys.exit(prune_main())
