"""Triton kernels (installed as ``meancache.kernels``)."""
