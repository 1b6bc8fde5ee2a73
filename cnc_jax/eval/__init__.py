"""Evaluation: the paper's metrics (metrics), the networks as batched functions (nets), and evaluate.py's
inputs (inputs) and loop (run)."""
