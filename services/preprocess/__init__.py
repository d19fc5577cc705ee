"""Preprocess: turns raw inputs into model tensors (text: tokenization)."""
