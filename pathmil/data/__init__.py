"""Bags of tile features as datasets, and patient-level cross-validation splits."""
