"""Triton kernels for effopt: weight-only quantized matmul and fused attention.

This package imports only torch and triton (never effopt), so it can be tested and benchmarked on
its own. Set TRITON_INTERPRET=1 before importing it to run the kernels on CPU tensors.

Modules:
    kernels.qmatmul   -- W4A16 / W8A16 (and W2A16) matmul over effopt's packed layout (LAYOUT.md).
    kernels.attention -- FlashAttention-style forward/backward, split-KV decode, int8-KV decode.
    kernels.int8_matmul -- W8A8 (SmoothQuant): per-token int8 quantization, int8 tensor-core matmul.
    kernels.qmatmul_mma, kernels.qmatmul_wgmma, kernels.attention_ws -- Gluon kernels for Hopper (W4 matmul;
        a warp-specialized attention forward), which the modules above offer to their tuners.
"""
