"""gp-lightning: global structured pruning of Llama-style LLMs as an ordinary (distributed) PyTorch job.

The pipeline, one module each: ``data`` -> ``calibration`` -> ``table`` -> ``selection`` ->
``surgery`` -> ``evaluation`` / ``export``; ``pipeline`` runs them in order.
"""

__version__ = "0.1.0"
