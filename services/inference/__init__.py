"""Inference: runs parts through models on Triton."""
