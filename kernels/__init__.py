"""Triton kernels (installed as ``qlab.kernels``)."""
