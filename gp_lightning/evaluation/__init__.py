"""Evaluation: perplexity on non-overlapping windows, of one model or several checkpoints side by side."""
