"""Tasks: classification, survival and regression (targets, losses, scores and metrics)."""
