"""Postprocess: turns model outputs into answers (normalised embedding + labels)."""
