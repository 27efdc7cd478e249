"""Pruning algorithms: masks from scores (unstructured, N:M), magnitude, first-order Taylor, Wanda,
SparseGPT, learned hard-concrete (L0) gates, and structured removal of heads, MLP channels and layers.

Unstructured and N:M methods return boolean masks (True = keep) that `nn.masked_linear.apply_mask`
turns into MaskedLinear layers; structured methods physically shrink the model and its config.
"""
