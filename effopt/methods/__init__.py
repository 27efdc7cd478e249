"""Compression algorithms as plain functions on tensors and modules (no CLI, recipe or run dir)."""
