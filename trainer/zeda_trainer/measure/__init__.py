"""Measurements of trained models: evaluation, the per-prompt analysis, the baseline comparison."""
