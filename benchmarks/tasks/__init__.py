"""Synthetic tasks with exact answers for the project's models: arith, recall and text.

See `benchmarks.tasks.mixture` for the training/evaluation interface and
docs/models_and_tasks.md for the formats, seeds and the held-out guarantee.
"""
