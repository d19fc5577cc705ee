"""Fusion: collects the parts of one request and answers once, whole or by deadline."""
