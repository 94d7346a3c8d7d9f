"""Recovery fine-tuning entry point: ``python train.py --config configs/finetune-lora.yaml --model runs/x/model``.

LoRA (peft) or full fine-tuning of a pruned (or dense) model; works under any launcher (python,
torchrun, accelerate launch); ``--help`` lists every option.
"""

import sys

from gp_lightning.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
