"""OCR results as text lines in reading order, with boxes in the original image's pixels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from services.common.errors import Internal

Box = tuple[float, float, float, float, float, float, float, float]


@dataclass(frozen=True)
class OcrLine:
    """One recognised line; ``box`` is four (x, y) corners, flattened, clockwise from top left."""

    text: str
    score: float
    box: Box

    @property
    def centre(self) -> tuple[float, float]:
        xs, ys = self.box[0::2], self.box[1::2]
        return sum(xs) / 4, sum(ys) / 4

    @property
    def height(self) -> float:
        ys = self.box[1::2]
        return max(ys) - min(ys)


def _rows(lines: list[OcrLine]) -> list[list[OcrLine]]:
    """Lines grouped into rows: top to bottom, each row left to right.

    A line joins the current row when its centre lies within half a line height
    (the mean of the row's and its own) of the row's first line; this keeps
    slightly tilted or uneven boxes of one row together.
    """
    rows: list[list[OcrLine]] = []
    for line in sorted(lines, key=lambda ln: (ln.centre[1], ln.centre[0])):
        if rows:
            row = rows[-1]
            row_height = sum(ln.height for ln in row) / len(row)
            if abs(line.centre[1] - row[0].centre[1]) <= (row_height + line.height) / 4:
                row.append(line)
                continue
        rows.append([line])
    return [sorted(row, key=lambda ln: ln.centre[0]) for row in rows]


def ocr_lines(
    texts: Sequence[str],
    scores: np.ndarray,
    boxes: np.ndarray,
    *,
    scale: tuple[float, float] = (1.0, 1.0),
    min_score: float = 0.5,
) -> list[OcrLine]:
    """Recognised lines in reading order, without empty texts and those scored below ``min_score``.

    ``boxes`` is [N, 4, 2] (or [N, 8]) in the resized image's pixels; ``scale``
    (sx, sy) from the image preprocessor maps them back to the original.
    """
    score_arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    box_arr = np.asarray(boxes, dtype=np.float64)
    if len(score_arr) != len(texts) or len(box_arr) != len(texts) or box_arr.size != 8 * len(texts):
        # Model output, not caller input: a mismatch is our bug, so INTERNAL.
        raise Internal(
            f"OCR output mismatch: {len(texts)} texts, {len(score_arr)} scores, boxes of shape {list(box_arr.shape)}"
        )
    box_arr = box_arr.reshape(len(texts), 4, 2) * np.asarray(scale, dtype=np.float64)
    kept = [
        OcrLine(text.strip(), float(score), cast(Box, tuple(float(v) for v in box.reshape(-1))))
        for text, score, box in zip(texts, score_arr, box_arr, strict=True)
        if text.strip() and score >= min_score  # also drops NaN scores
    ]
    return [line for row in _rows(kept) for line in row]


def joined_text(lines: Sequence[OcrLine]) -> str:
    """The lines' texts, in the given (reading) order, separated by spaces."""
    return " ".join(line.text for line in lines)
