"""Evaluation: generation, task metrics and the held-out loss."""
