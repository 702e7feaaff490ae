"""Evaluation: per-attribute metrics for the toy world (`toy_metrics`)."""
