"""Recovery fine-tuning entry point (LoRA / full). Not implemented yet: exits with a clear message."""

import sys

MESSAGE = (
    "train.py: recovery fine-tuning (LoRA / full) is not implemented yet; it is tracked in the "
    "recovery fine-tuning issue. Prune with prune.py; the pruned model in <run>/model loads with "
    "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) for any trainer meanwhile."
)

if __name__ == "__main__":
    print(MESSAGE, file=sys.stderr)
    sys.exit(2)
