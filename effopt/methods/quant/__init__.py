"""Quantization algorithms."""
