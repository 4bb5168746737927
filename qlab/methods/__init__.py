"""Quantization methods beyond round-to-nearest: one module per algorithm."""
