"""Alt-text language identification: ``language``, ``language_score`` and ``language_group``.

Three backends sit behind one :class:`LanguageModel` protocol and all return *normalised*
probabilities, so one ``min_confidence`` means the same thing whichever runs:

- ``py3langid`` (default): py3langid >= 0.4, a retrained langid.py model (142 languages) whose
  softmax is tempered by text length, about 14x faster than langid and more accurate on short
  alt texts (``benchmarks/RESULTS-language.md``).
- ``langid``: the original langid.py model (97 languages) with ``norm_probs=True``, scored in
  batches with one matrix product instead of one slow mixed-dtype dot product per text.
- ``lingua``: lingua-language-detector (75 languages, high-accuracy mode, about 1.3 GB per
  process); imported only when chosen (``pip install 'laion-dask[lingua]'``).

Short English alt texts are the hardest case: English words occur in every language's training
text, so detectors spread English probability over many languages and English would fall into
``nolang`` far more often than other languages. ``english_prior`` multiplies the English
probability by a prior odds factor (Bayes' rule with a non-uniform prior: English is the
largest language of web alt text) and renormalises; the benchmark chose it and the default
``min_confidence`` together.

Labels are ISO 639-1 codes where one exists; regional varieties map to their macrolanguage
(``yue`` -> ``zh``, ``arz`` -> ``ar``); languages without a 639-1 code keep their ISO 639-3 code.
Text without a single letter (empty, whitespace, digits, emoji) is not sent to the model: it is
``und`` with score 0.0, group ``nolang``.
"""

from __future__ import annotations

import functools
import logging
import random
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import scipy.sparse

from laion_dask.ground import schema
from laion_dask.ground.config import LanguageConfig

__all__ = [
    "BACKENDS",
    "NO_LANGUAGE_LABELS",
    "UNDETERMINED",
    "LanguageModel",
    "LangidModel",
    "LinguaModel",
    "Py3langidModel",
    "add_language",
    "alt_text_windows",
    "apply_english_prior",
    "language_group",
    "load_language_model",
]

log = logging.getLogger(__name__)

BACKENDS = ("py3langid", "langid", "lingua")
#: label for text the model never saw (no letters) or could not place
UNDETERMINED = "und"
#: labels that mean "no language" whatever their score (``zxx``: no linguistic content)
NO_LANGUAGE_LABELS = frozenset({UNDETERMINED, "zxx"})

# regional varieties / individual languages -> the ISO 639-1 code of their macrolanguage
_TO_ISO639_1 = {
    "ary": "ar",  # Moroccan Arabic
    "arz": "ar",  # Egyptian Arabic
    "fuv": "ff",  # Nigerian Fulfulde
    "gug": "gn",  # Paraguayan Guarani
    "kik": "ki",  # Kikuyu
    "ltg": "lv",  # Latgalian
    "sdh": "ku",  # Southern Kurdish
    "uzs": "uz",  # Southern Uzbek
    "wuu": "zh",  # Wu Chinese
    "yue": "zh",  # Cantonese
}
# "has at least one letter": \w minus digits and underscore, so it holds for every script
_HAS_LETTER = r"[^\W\d_]"
_LETTER = re.compile(_HAS_LETTER)


@runtime_checkable
class LanguageModel(Protocol):
    """Anything that labels a batch of texts with a language and a probability."""

    def predict(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Return ISO 639-1 labels and their normalised probabilities in [0, 1]."""
        ...


def apply_english_prior(
    labels: np.ndarray, top: np.ndarray, p_en: np.ndarray, prior: float
) -> tuple[np.ndarray, np.ndarray]:
    """Reweight English by prior odds ``prior`` and renormalise, from the top class and p(en).

    Multiplying p(en) by ``prior`` and dividing everything by ``1 + (prior - 1) * p(en)`` keeps a
    distribution; the new best class is English or the old best class, so the top label, its
    probability and p(en) are enough.

    Parameters
    ----------
    labels, top, p_en
        Best label per text, its probability, and the probability of English.
    prior
        Odds factor for English, >= 1 (1.0 leaves everything unchanged; below 1 the new best
        class could be one the top-1 view cannot see).

    Returns
    -------
    tuple
        New labels (object array) and probabilities (float64).
    """
    if not prior >= 1.0:
        raise ValueError(f"english_prior must be >= 1, got {prior!r}")
    labels = np.asarray(labels, dtype=object)
    top = np.asarray(top, dtype=np.float64)
    p_en = np.asarray(p_en, dtype=np.float64)
    if prior == 1.0:
        return labels, top
    norm = 1.0 + (prior - 1.0) * p_en
    en_score = prior * p_en / norm
    other_score = np.where(labels == "en", 0.0, top / norm)
    pick_en = en_score >= other_score
    return np.where(pick_en, "en", labels).astype(object), np.where(pick_en, en_score, other_score)


class _PriorModel:
    """Shared ``predict`` for the real backends: full distribution -> top label + prior."""

    #: texts per backend call: bounds the (texts x languages) probability block to a few MB
    chunk = 4096
    _labels: np.ndarray  # ISO 639-1 label per class of the model
    _en: int  # the class index of English

    def __init__(self, english_prior: float = 1.0) -> None:
        self.english_prior = english_prior

    def _use_classes(self, classes: Sequence[str]) -> None:
        self._labels = np.array([_TO_ISO639_1.get(c, c) for c in classes], dtype=object)
        self._en = list(classes).index("en")

    def _probs(self, texts: Sequence[str]) -> np.ndarray:
        """The (texts x classes) probabilities."""
        raise NotImplementedError

    def _top_and_english(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        probs = self._probs(texts)
        best = probs.argmax(axis=1)
        return self._labels[best], probs[np.arange(len(texts)), best], probs[:, self._en]

    def predict(self, texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
        """Return labels and normalised probabilities for ``texts`` (English prior applied)."""
        if len(texts) == 0:
            return [], np.zeros(0, dtype=np.float64)
        parts = [
            self._top_and_english(texts[i : i + self.chunk])
            for i in range(0, len(texts), self.chunk)
        ]
        labels, top, p_en = (np.concatenate(column) for column in zip(*parts, strict=True))
        labels, top = apply_english_prior(labels, top, p_en, self.english_prior)
        return labels.tolist(), np.clip(top, 0.0, 1.0)


class Py3langidModel(_PriorModel):
    """py3langid >= 0.4 with normalised (length-tempered) probabilities, a chunk at a time.

    py3langid walks its byte n-gram automaton over one text at a time in Python and scores each
    text with its own small product. Here every text of a chunk steps through the automaton
    together (one numpy gather per byte position), the feature counts form one sparse matrix and
    one product scores the chunk; the rest is py3langid's own arithmetic (log1p counts, the
    sqrt(bytes) temperature, softmax, aliased classes folded). Same labels as its per-text
    ``_decide`` and probabilities within 1e-5 (tests/test_language.py). On 60,000 alt-text-length
    strings in 24 languages (the lingua corpus cut into 1-30 words): 0.41 s CPU against 3.95 s
    per text.
    """

    def __init__(self, english_prior: float = 1.0) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        super().__init__(english_prior)
        ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        classes = list(ident.nb_classes)
        self._use_classes(classes)
        # the identifier itself is not kept: these arrays are all the walk and the product read
        # (per process: 39 MB of transitions, 57 MB of float32 table)
        self._next = np.asarray(ident.tk_nextmove, dtype=np.int32)  # state ids fit in int32
        self._row = np.asarray(ident.tk_row, dtype=np.int64) << 8
        self._feature = np.asarray(ident.tk_output, dtype=np.int32)  # -1: no feature ends here
        self._table = np.asarray(ident.nb_ptc, dtype=np.float32)  # float16 in the model file
        self._bias = np.asarray(ident.nb_pc, dtype=np.float32)
        self._aliases = [
            (classes.index(c), j) for j, c in enumerate(classes) if classes[:j].count(c)
        ]

    def _probs(self, texts: Sequence[str]) -> np.ndarray:
        data = [_py3langid_bytes(t) for t in texts]
        lens = np.fromiter(map(len, data), dtype=np.int64, count=len(data))
        buf = np.frombuffer(b"".join(data), dtype=np.uint8)
        order = np.argsort(-lens, kind="stable")  # longest first: the texts still walking lead
        starts = (np.cumsum(lens) - lens)[order]
        still = -lens[order]  # ascending: searchsorted counts the texts longer than a position
        state = np.zeros(len(data), dtype=np.int64)
        rows, features = [], []
        for pos in range(int(lens.max(initial=0))):
            n = int(np.searchsorted(still, -pos))
            state[:n] = self._next[self._row[state[:n]] + buf[starts[:n] + pos]]
            f = self._feature[state[:n]]
            hit = np.flatnonzero(f >= 0)
            rows.append(order[hit])
            features.append(f[hit])
        rows_at = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        features_at = np.concatenate(features) if features else np.zeros(0, np.int64)
        counts = scipy.sparse.csr_matrix(
            (np.ones(len(rows_at), np.float32), (rows_at, features_at)),
            shape=(len(data), len(self._table)),
        )
        counts.sum_duplicates()
        counts.data = np.log1p(counts.data)
        scores = np.asarray(counts @ self._table, dtype=np.float32) + self._bias
        scores[np.diff(counts.indptr) == 0] = 0.0  # no feature: uniform, py3langid's abstention
        scores *= (1.0 / np.sqrt(np.maximum(lens, 1))).astype(np.float32)[:, None]
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
        for first, dupe in self._aliases:
            scores[:, first] += scores[:, dupe]
            scores[:, dupe] = 0.0
        return scores


def _py3langid_bytes(text: str) -> bytes:
    """What py3langid's automaton reads of a text: all-caps lowered, NFC, UTF-8."""
    if text.isupper():
        text = text.lower()
    return unicodedata.normalize("NFC", text).encode("utf8", errors="surrogatepass")


class LangidModel(_PriorModel):
    """The original langid.py model, normalised, scored ``chunk`` texts per product.

    ``langid.classify`` multiplies a uint32 feature vector by a float64 matrix, which numpy
    cannot hand to BLAS; stacking the vectors and doing one float64 product per chunk gives the
    same probabilities (tested against ``classify``) several times faster.
    """

    chunk = 256  # rows scored per matrix product (keeps the dense block under ~16 MB)

    def __init__(self, english_prior: float = 1.0) -> None:
        from langid.langid import LanguageIdentifier, model

        super().__init__(english_prior)
        self._identifier = LanguageIdentifier.from_modelstring(model, norm_probs=True)
        self._use_classes(self._identifier.nb_classes)

    def _probs(self, texts: Sequence[str]) -> np.ndarray:
        ident = self._identifier
        fv = np.stack([ident.instance2fv(t) for t in texts]).astype(np.float64)
        logp = fv @ ident.nb_ptc + ident.nb_pc
        # softmax == langid's 1 / sum(exp(pd - pd_i)), without its overflow warnings
        logp -= logp.max(axis=1, keepdims=True)
        probs = np.exp(logp)
        probs /= probs.sum(axis=1, keepdims=True)
        return probs


class LinguaModel(_PriorModel):
    """lingua-language-detector, all 75 languages, high-accuracy mode, models loaded lazily."""

    def __init__(self, english_prior: float = 1.0) -> None:
        try:
            from lingua import Language, LanguageDetectorBuilder
        except ImportError as err:
            raise ImportError(
                "language backend 'lingua' needs lingua-language-detector: "
                "pip install 'laion-dask[lingua]'"
            ) from err
        super().__init__(english_prior)
        self._english = Language.ENGLISH
        self._detector = LanguageDetectorBuilder.from_all_languages().build()

    def _top_and_english(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ranked = self._detector.compute_language_confidence_values_in_parallel(list(texts))
        labels = np.empty(len(texts), dtype=object)
        top = np.zeros(len(texts), dtype=np.float64)
        p_en = np.zeros(len(texts), dtype=np.float64)
        for i, values in enumerate(ranked):
            if not values:  # lingua found no letters it knows
                labels[i] = UNDETERMINED
                continue
            labels[i] = values[0].language.iso_code_639_1.name.lower()
            top[i] = values[0].value
            p_en[i] = next((v.value for v in values if v.language == self._english), 0.0)
        return labels, top, p_en


_BACKEND_CLASSES: dict[str, type[_PriorModel]] = {
    "py3langid": Py3langidModel,
    "langid": LangidModel,
    "lingua": LinguaModel,
}


@functools.lru_cache(maxsize=4)
def load_language_model(backend: str, english_prior: float = 1.0) -> LanguageModel:
    """Load a language backend once per worker process (cached).

    Parameters
    ----------
    backend
        ``py3langid``, ``langid`` or ``lingua``.
    english_prior
        Prior odds factor for English (see :func:`apply_english_prior`).

    Returns
    -------
    LanguageModel
        A model whose ``predict`` returns ISO 639-1 labels and normalised probabilities.

    Example
    -------
    >>> load_language_model("py3langid").predict(["a red bicycle"])[0]
    ['en']
    """
    try:
        cls = _BACKEND_CLASSES[backend]
    except KeyError:
        raise ValueError(f"unknown language backend {backend!r} (known: {BACKENDS})") from None
    log.debug("loading language backend %s (english_prior=%s)", backend, english_prior)
    return cls(english_prior=english_prior)


def language_group(labels: pd.Series, scores: pd.Series, min_confidence: float) -> pd.Series:
    """``en`` / ``multi`` / ``nolang`` from labels and scores (string dtype).

    Parameters
    ----------
    labels, scores
        Language labels and their probabilities, aligned.
    min_confidence
        Rows scoring below this are ``nolang``; so are ``und`` / ``zxx`` and missing labels.

    Returns
    -------
    pandas.Series
        The group per row, dtype ``string``.
    """
    labels = labels.astype("string")
    confident = (scores.astype("float64") >= min_confidence).to_numpy()
    is_lang = ~labels.isin(NO_LANGUAGE_LABELS).fillna(True).to_numpy(dtype=bool)
    is_lang &= labels.notna().to_numpy()
    is_en = labels.eq("en").fillna(False).to_numpy(dtype=bool)
    group = np.where(confident & is_lang, np.where(is_en, "en", "multi"), "nolang")
    return pd.Series(group, index=labels.index, dtype="string")


def add_language(
    df: pd.DataFrame, cfg: LanguageConfig, *, model: LanguageModel | None = None
) -> pd.DataFrame:
    """Return ``df`` with ``language``, ``language_score`` and ``language_group`` added.

    Each distinct text is scored once (alt texts repeat a lot within a file). Rows whose text
    has no letter (NA, empty, whitespace, digits, emoji) get ``und``, 0.0, ``nolang`` without a
    model call. Below ``cfg.min_confidence`` the row keeps the detector's label and its group is
    ``nolang``.

    Parameters
    ----------
    df
        A partition with a ``text`` column.
    cfg
        Backend, English prior and confidence threshold.
    model
        Injected model (tests); ``None`` loads ``cfg.backend`` once per process.

    Returns
    -------
    pandas.DataFrame
        A new frame; ``df`` is not modified.

    Example
    -------
    >>> add_language(pd.DataFrame({"text": ["a red bicycle", ""]}), LanguageConfig())[
    ...     "language_group"].tolist()
    ['en', 'nolang']
    """
    if model is None:
        model = load_language_model(cfg.backend, cfg.english_prior)
    # the letter test and the model see each distinct text once, as Python strings taken in one
    # conversion (iterating the string array was 0.2 s per 200,000 texts)
    codes, distinct = pd.factorize(df[schema.TEXT].astype("string"))  # NA: code -1
    distinct = distinct.to_numpy(dtype=object)
    search = _LETTER.search
    lettered = np.fromiter((search(t) is not None for t in distinct), bool, len(distinct))
    has_letter = np.zeros(len(df), dtype=bool)
    has_letter[codes >= 0] = lettered[codes[codes >= 0]]
    labels = np.full(len(df), UNDETERMINED, dtype=object)
    scores = np.zeros(len(df), dtype=np.float32)
    if has_letter.any():
        uniques = distinct[lettered]  # in order of first appearance, as before
        codes = (np.cumsum(lettered) - 1)[codes[has_letter]]
        raw_labels, raw_scores = model.predict(uniques.tolist())
        u_labels = np.asarray(raw_labels, dtype=object)
        u_scores = np.asarray(raw_scores, dtype=np.float64)
        if len(u_labels) != len(uniques) or len(u_scores) != len(uniques):
            raise ValueError(
                f"language model returned {len(u_labels)} labels / {len(u_scores)} scores "
                f"for {len(uniques)} texts"
            )
        if np.isnan(u_scores).any() or (u_scores < 0).any() or (u_scores > 1).any():
            raise ValueError("language model returned scores outside [0, 1]")
        labels[has_letter] = u_labels[codes]
        scores[has_letter] = u_scores[codes].astype(np.float32)
    language = pd.Series(labels, index=df.index, dtype="string")
    score = pd.Series(scores, index=df.index, dtype="float32")
    return df.assign(
        **{
            schema.LANGUAGE: language,
            schema.LANGUAGE_SCORE: score,
            schema.LANGUAGE_GROUP: language_group(language, score, cfg.min_confidence),
        }
    )


def alt_text_windows(
    sentences: Iterable[str],
    language: str,
    n: int,
    *,
    seed: int = 0,
    words: tuple[int, int] = (2, 4),
    chars: tuple[int, int] = (4, 10),
) -> list[str]:
    """Cut ``n`` alt-text-length windows from sentences (evaluation sets; seeded).

    Space-separated languages give ``words`` consecutive words; ``ja``, ``zh`` and ``th`` (no
    spaces between words) give ``chars`` consecutive characters. Edge punctuation is stripped.

    Parameters
    ----------
    sentences
        One sentence per item, all in ``language``.
    language
        ISO 639-1 code of the sentences.
    n
        Number of windows.
    seed
        Seed of the sampler: same input and seed, same windows.
    words, chars
        Inclusive ranges of window length.

    Returns
    -------
    list of str
        ``n`` windows (fewer only if no sentence has text).
    """
    pool = [s.strip() for s in sentences if s and s.strip()]
    if not pool:
        return []
    rng = random.Random(f"{seed}:{language}")
    out: list[str] = []
    attempts = 0
    while len(out) < n and attempts < 10 * n:
        attempts += 1
        sentence = rng.choice(pool)
        if language in ("ja", "zh", "th"):
            stream: Any = "".join(sentence.split())
            size, joiner = rng.randint(*chars), ""
        else:
            stream = sentence.split()
            size, joiner = rng.randint(*words), " "
        start = rng.randrange(max(1, len(stream) - size + 1))
        window = joiner.join(stream[start : start + size]).strip(
            " .,;:!?\"'()[]«»“”„‘’-–—…。、，！？"
        )
        if window:
            out.append(window)
    return out
