"""Fixtures and fakes for the language stage (imported by tests/test_language.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from laion_dask.ground import schema

# marker word -> (label, probability); the first marker found in a text decides
FAKE_RULES = {
    "hello": ("en", 0.95),
    "maybe": ("en", 0.40),
    "bonjour": ("fr", 0.90),
    "hallo": ("de", 0.55),
    "edge": ("it", 0.50),
}


class FakeLanguageModel:
    """Deterministic stand-in: labels by marker word, records every batch it is given.

    Module-level (not a closure) so Dask can pickle it into tasks.
    """

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def predict(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        self.batches.append(list(texts))
        labels, scores = [], []
        for text in texts:
            label, score = "zz", 0.10
            for word, (lab, sc) in FAKE_RULES.items():
                if word in text.lower():
                    label, score = lab, sc
                    break
            labels.append(label)
            scores.append(score)
        return labels, np.asarray(scores, dtype=np.float64)


class WrongLengthModel:
    """Returns one label too few: add_language must refuse it, not misalign rows."""

    def predict(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        return ["en"] * (len(texts) - 1), np.full(len(texts) - 1, 0.9)


class OutOfRangeModel:
    """Returns raw log-probabilities instead of probabilities."""

    def predict(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        return ["en"] * len(texts), np.full(len(texts), -12.5)


def pairs_frame(texts: list[object], *, start: int = 0) -> pd.DataFrame:
    """A pairs partition (schema dtypes) around ``texts``; a non-default index on purpose."""
    n = len(texts)
    df = pd.DataFrame(
        {
            schema.UID: [f"u{i:04d}" for i in range(start, start + n)],
            schema.URL: [f"https://img.example/{i}.jpg" for i in range(start, start + n)],
            schema.TEXT: texts,
            schema.PAGE_URL: ["https://page.example/"] * n,
            schema.SOURCE_FILE: ["file-0.warc.wat.gz"] * n,
            schema.RECORD_OFFSET: list(range(start, start + n)),
            schema.HASH: list(range(start, start + n)),
            schema.PAGE_ROBOTS: [None] * n,
            schema.PAGE_TDM: [False] * n,
        },
        index=pd.RangeIndex(100 + start, 100 + start + n),
    )
    return schema.conform(df, schema.PAIRS_DTYPES)


def sentences_dir(corpus: Path) -> Path:
    """The Leipzig sentence files in the shared corpus (24 languages)."""
    return corpus / "pemistahl-lingua-py" / "sentences"
