"""Triton kernels; each has a torch reference in engine/attention.py or engine/layers.py."""
