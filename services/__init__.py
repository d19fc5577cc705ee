"""Loom: six services over NATS, models on Triton."""
