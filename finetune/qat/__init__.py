"""Quantization-aware training: fake-quant ops with a straight-through estimator, the hooks that attach them,
weight quantizers, and the INT8 deployment they simulate."""
