"""Recovery fine-tuning of a pruned model: LoRA (peft) or full, under the same Lightning plumbing.

The step after surgery: :mod:`.data` turns text or instruction data into training examples,
:mod:`.lora` attaches adapters to whatever projections survived pruning, :mod:`.module` is the
LightningModule that trains, :mod:`.recipe` runs setup -> evaluate -> train -> evaluate -> save.
"""
