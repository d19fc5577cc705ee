import numpy as np
import pytest

from services.common.errors import InvalidArgument
from services.postprocess.labels import LabelIndex, l2_normalise
from services.preprocess.text import TextTokenizer

pytestmark = pytest.mark.unit


def test_l2_normalise() -> None:
    v = l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    np.testing.assert_allclose(v, [[0.6, 0.8], [0.0, 0.0]])


def test_top_labels_best_first() -> None:
    index = LabelIndex(["a", "b", "c"], np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    top = index.top(l2_normalise(np.array([1.0, 0.2])), k=2)
    assert [name for name, _ in top] == ["a", "c"]
    assert top[0][1] > top[1][1]
    with pytest.raises(InvalidArgument):
        index.top(np.zeros(3), k=1)


def test_tokenizer_shapes_stats_and_truncation() -> None:
    tok = TextTokenizer(max_tokens=16)
    tensors, stats = tok.encode("Hello world")
    assert tensors["input_ids"][0] == 101 and tensors["input_ids"][-1] == 102  # [CLS] ... [SEP]
    assert tensors["attention_mask"].tolist() == [1] * len(tensors["input_ids"])
    assert stats["text_tokens"] == len(tensors["input_ids"]) and stats["text_truncated"] == 0.0
    tensors, stats = tok.encode("word " * 100)
    assert len(tensors["input_ids"]) == 16 and stats["text_truncated"] == 1.0
    with pytest.raises(InvalidArgument):
        tok.encode("\u200b ")  # nothing but a zero-width space: no tokens
