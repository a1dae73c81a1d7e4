"""Prediction and metrics shared by training, evaluation, prediction and export: one rule for how an image is
predicted (evaluation/inference.py) and one metric code (evaluation/metrics.py)."""
