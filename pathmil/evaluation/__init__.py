"""Evaluation across folds: metrics with bootstrap confidence intervals, plots and heatmaps."""
