"""Quantization: schemes, quantizers, error reconstruction."""
