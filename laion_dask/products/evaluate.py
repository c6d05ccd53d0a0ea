"""Choose thresholds with evidence: train the small CLIP on each candidate subset at equal
compute, measure it on a held-out labelled set, compare.

DataComp's finding, at the scale of one run: fix the training budget, vary only the filter, and
let downstream quality rank the filters. ``evaluate(RUN, thresholds=[...], fractions=[...])``:

1. **Candidates.** Always ``no-clip-filter`` (the run's ``[filters]`` with every similarity
   threshold off: the baseline); one per thresholds file, read as ``materialize`` reads it
   (:func:`laion_dask.stages.filters.load_thresholds`); one per fraction ``X``: "keep the top X
   %", the ``X`` share of highest-similarity rows among the rows that pass every non-CLIP rule
   of the baseline (one global cut over all language groups, as DataComp's CLIP-score filter),
   written as the thresholds file that keeps them (every group's similarity threshold = the
   similarity of the last row kept; rows tied with it are kept too).
2. **Selection** from stored scores, never rescoring: a candidate's rows are the rows
   :meth:`laion_dask.products.explore.RunView.kept_at` counts for its thresholds (the
   final-reason engine materialize calls). A candidate that keeps fewer than 2 rows is refused
   before any training.
3. **Held-out set**, never in any candidate: on a demo run (``RUN/corpus/corpus.json``),
   pictures freshly drawn with a seed no other part of laion-dask uses, labelled by their
   object (colour and shape, e.g. ``red circle``: 48 classes) and captioned with their true
   English caption; on other runs a user's labelled folder (:func:`read_heldout`: a folder per
   class, images inside, optional same-name ``.txt`` captions). Drawn pictures rather than
   held-out corpus rows: removing ground-truth rows from the run would change what every
   candidate selects, and fresh pictures are as many as wanted. Held-out images are resized and
   encoded as the run stores its training images. Every one is checked against every
   candidate's training images by what it shows (:func:`thumbnail_vector`: a re-encoded or
   resized copy is caught) and by the sha256 of its original bytes against the download's;
   any overlap is refused.
4. **Training**: :func:`laion_dask.products.train.train_clip` with one fixed budget (steps,
   batch, architecture, learning-rate schedule) for every candidate, once per seed; the seeds
   are the same for every candidate. One Dask task per (candidate, seed) through
   :func:`laion_dask.orchestration.runner.run_tasks`: the candidates train in parallel.
5. **Measures** on the held-out set: zero-shot top-1 accuracy (each class's prompt embeddings
   averaged, as CLIP's prompt ensembles) and image->text / text->image recall@k over the
   held-out captions. Each comes with a 95 % interval from a paired bootstrap that resamples
   the held-out images and the training seeds together (the same resamples for every
   candidate), and so does each candidate's difference from ``no-clip-filter``.
6. **Results**: ``RUN/evaluate/results.json`` (everything: budget, held-out set, per-candidate
   size and composition, per-seed values, intervals, the winner) and
   ``RUN/evaluate/results.parquet`` (one row per candidate and measure), plus
   ``RUN/evaluate/thresholds/NAME.toml`` per candidate (``laion-dask materialize RUN
   --thresholds`` takes the winner's as it is) and the held-out set as a shard. The same run,
   candidates and seed give the same results.

The caveat travels with the numbers: a 1.5M-parameter CLIP trained for a few hundred steps on
one run is a proxy for what the data would do to a real model, good for ranking filters on this
corpus, not for predicting ImageNet accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import random
import re
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from laion_dask.ground import schema
from laion_dask.ground.config import ConfigError, DownloadConfig, FilterConfig
from laion_dask.ground.shards import ShardSample, iter_shard, make_key, read_images, write_shard
from laion_dask.orchestration.cluster import scoring_resources
from laion_dask.orchestration.rundir import RunDir
from laion_dask.orchestration.runner import get_client, run_tasks
from laion_dask.products.explore import RunView, open_run
from laion_dask.products.synthetic.corpus import CorpusSpec
from laion_dask.products.synthetic.draw import (
    Scene,
    all_scenes,
    caption,
    draw_scene,
    encode_image,
    random_scene,
)
from laion_dask.products.train import TrainConfig, encode, train_clip
from laion_dask.stages.filters import dump_thresholds, load_thresholds
from laion_dask.stages.imaging import process_image

__all__ = [
    "EvaluateConfig",
    "EvaluateError",
    "Candidate",
    "HeldoutSet",
    "EvaluatePlan",
    "BASELINE",
    "MEASURES",
    "CAVEAT",
    "thumbnail_vector",
    "demo_heldout",
    "read_heldout",
    "plan_evaluation",
    "run_evaluation",
    "evaluate",
    "read_results",
    "format_results",
]

log = logging.getLogger(__name__)

#: the candidate every evaluation has: the run's filters without any CLIP-similarity cut
BASELINE = "no-clip-filter"
#: what every evaluation says next to its numbers
CAVEAT = (
    "A small CLIP (about 1.5M parameters, a few hundred steps) trained on one run is a proxy: "
    "it ranks filters on this corpus at equal compute; it does not predict what a full-size "
    "model trained on billions of pairs would score."
)
_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
#: a similarity threshold no cosine falls under: "no CLIP filter"
_OFF = -1.0
#: zero-shot prompts per class label (``{a}``: the label's article), averaged per class
PROMPTS = ("{a} {label}", "a photo of {a} {label}")
#: never used by any other part of laion-dask: the demo's held-out pictures are its own draw
_HELDOUT_SEED = "laion-dask-evaluate-heldout-{seed}"


class EvaluateError(ValueError):
    """An evaluation that cannot be meant as asked (a candidate without rows, a held-out set that
    overlaps the training rows, ...): raised before any training, one line saying why."""


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """The fixed budget every candidate trains with, and how results are measured."""

    #: optimizer steps per training (the same for every candidate: equal compute)
    steps: int = 100
    batch_size: int = 64
    #: trainings per candidate, seeds ``seed, seed + 1, ...`` (the same for every candidate)
    seeds: int = 2
    seed: int = 0
    #: pictures drawn for a demo run's held-out set
    heldout_size: int = 400
    #: bootstrap resamples for the intervals
    bootstrap: int = 2000
    recall_k: tuple[int, ...] = (1, 5, 10)
    #: torch threads per training (one training per Dask worker thread)
    torch_threads: int = 1
    #: ``auto`` = cuda when the worker has it, else cpu
    device: str = "auto"
    #: the measure that names the winner. Retrieval, not zero-shot: on the demo at this budget
    #: the small CLIP learns the backgrounds before the objects, and zero-shot over 48 object
    #: classes stays near chance for every candidate while recall@5 separates them
    primary: str = "image_to_text_r@5"

    def __post_init__(self) -> None:
        object.__setattr__(self, "recall_k", tuple(int(k) for k in self.recall_k))
        for key in ("steps", "batch_size", "seeds", "heldout_size", "bootstrap", "torch_threads"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"evaluate.{key} must be a positive integer, got {value!r}")
        if self.batch_size < 2:
            raise ConfigError("evaluate.batch_size must be at least 2 (a contrastive batch)")
        if not self.recall_k or min(self.recall_k) < 1:
            raise ConfigError(f"evaluate.recall_k must be positive integers, got {self.recall_k}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"evaluate.device must be auto, cpu or cuda, got {self.device!r}")
        if self.primary not in measure_names(self.recall_k):
            known = ", ".join(measure_names(self.recall_k))
            raise ConfigError(f"evaluate.primary must be one of {known}, got {self.primary!r}")

    def train_config(self, seed: int) -> TrainConfig:
        """The training every candidate gets (only ``seed`` varies, and it varies alike)."""
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            warmup_steps=max(1, self.steps // 10),
            seed=seed,
            threads=self.torch_threads,
            device=self.device,
            log_every=max(1, self.steps // 4),
        )

    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


def measure_names(recall_k: Sequence[int]) -> list[str]:
    """The measures an evaluation reports, in order."""
    names = ["zero_shot_top1"]
    names += [f"image_to_text_r@{k}" for k in recall_k]
    names += [f"text_to_image_r@{k}" for k in recall_k]
    return names


#: the measures of the default :class:`EvaluateConfig`
MEASURES = tuple(measure_names(EvaluateConfig.recall_k))


# --- held-out set -------------------------------------------------------------------------------


@dataclass
class HeldoutSet:
    """Labelled images no candidate trains on: ``images[i]`` is of class ``labels[i]`` and,
    when ``captions[i]`` is not None, captioned by it.

    ``images`` are stored as the run stores its training images (the download stage's resize
    and encoding, :func:`laion_dask.stages.imaging.process_image`), so both are seen alike;
    ``sha256[i]`` is the sha256 of the original bytes, as the download records it.
    """

    images: list[bytes]
    labels: list[str]
    captions: list[str | None]
    sha256: list[str]
    source: str
    #: where each image came from (a file path, or ``drawn:<i>``), for error messages
    names: list[str]
    #: class -> zero-shot prompts; None = :data:`PROMPTS` filled with the class name
    class_prompts: dict[str, list[str]] | None = None
    #: images left out and why (an unreadable file, ...)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def prompts(self) -> dict[str, list[str]]:
        """Zero-shot prompts per class; their embeddings are averaged per class."""
        if self.class_prompts is not None:
            return {c: list(self.class_prompts[c]) for c in self.classes}
        return {c: [p.format(a=_article(c), label=c) for p in PROMPTS] for c in self.classes}

    def summary(self) -> dict[str, Any]:
        prompts = self.prompts()
        return {
            "source": self.source,
            "images": len(self.images),
            "classes": len(self.classes),
            "captioned": sum(c is not None for c in self.captions),
            "chance_top1": 1 / len(self.classes),
            "prompts_per_class": sum(map(len, prompts.values())) / len(prompts),
            "prompt_example": {c: prompts[c][:2] for c in self.classes[:1]},
            "skipped": dict(self.skipped),
        }


def _article(label: str) -> str:
    return "an" if label[:1].lower() in "aeiou" else "a"


def _as_stored(data: bytes, cfg: DownloadConfig) -> tuple[bytes | None, str]:
    """``data`` resized and encoded as the download stage stores it (None, status) on failure."""
    result = process_image(data, cfg)
    return result.image, result.status


def demo_heldout(n: int, seed: int = 0, download: DownloadConfig | None = None) -> HeldoutSet:
    """``n`` freshly drawn demo pictures, labelled ``colour shape`` (48 classes), captioned with
    their true English caption.

    The draw's seed string is used nowhere else (not by the demo corpus, not by the demo CLIP's
    training set), so these are new pictures of the demo's vocabulary. A class's prompts are
    the English captions of every scene of that colour and shape (one per background): CLIP's
    prompt ensembling, in the words the corpus uses.
    """
    download = download or DownloadConfig()
    rng = random.Random(_HELDOUT_SEED.format(seed=seed))
    lo, hi = CorpusSpec.image_size
    images, labels, captions, shas, names = [], [], [], [], []
    for i in range(n):
        scene = random_scene(rng)
        raw = encode_image(
            draw_scene(scene, (rng.randint(lo, hi), rng.randint(lo, hi)), rng), "JPEG"
        )
        stored, status = _as_stored(raw, download)
        if stored is None:  # pragma: no cover - a drawn JPEG always decodes
            raise RuntimeError(f"drawn picture {i} failed the download's processing: {status}")
        images.append(stored)
        labels.append(_label(scene))
        captions.append(caption(scene, "en"))
        shas.append(hashlib.sha256(raw).hexdigest())
        names.append(f"drawn:{i}")
    prompts: dict[str, list[str]] = {}
    for scene in all_scenes():
        prompts.setdefault(_label(scene), []).append(caption(scene, "en"))
    return HeldoutSet(
        images, labels, captions, shas, f"demo draw (seed {seed})", names, class_prompts=prompts
    )


def _label(scene: Scene) -> str:
    return f"{scene.colour} {scene.shape}"


def read_heldout(folder: str | Path, download: DownloadConfig | None = None) -> HeldoutSet:
    """A labelled image folder: ``FOLDER/CLASS/IMAGE`` (as torchvision's ImageFolder).

    The class is the sub-folder's name (``_`` read as a space). An image may have a caption
    beside it, ``IMAGE`` with the suffix ``.txt``; captioned images count for recall@k. Each
    image is resized and encoded as ``download`` stores the run's images; one that fails
    (unreadable, unsupported format, ...) is skipped and counted by status. Fewer than 2
    classes is an error.
    """
    download = download or DownloadConfig()
    root = Path(folder)
    if not root.is_dir():
        raise EvaluateError(f"held-out folder not found: {folder}")
    images, labels, captions, shas, names = [], [], [], [], []
    skipped: Counter[str] = Counter()
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        label = sub.name.replace("_", " ").strip()
        for path in sorted(sub.iterdir()):
            if path.suffix.lower() not in _IMAGE_EXTS:
                continue
            raw = path.read_bytes()
            stored, status = _as_stored(raw, download)
            if stored is None:
                skipped[status] += 1
                log.warning("held-out image %s skipped: %s", path, status)
                continue
            text_path = path.with_suffix(".txt")
            text = text_path.read_text(encoding="utf-8").strip() if text_path.is_file() else ""
            images.append(stored)
            labels.append(label)
            captions.append(text or None)
            shas.append(hashlib.sha256(raw).hexdigest())
            names.append(str(path))
    if len(set(labels)) < 2:
        raise EvaluateError(
            f"held-out folder {folder}: needs readable images in at least 2 class folders "
            f"(FOLDER/CLASS/IMAGE.jpg), found {len(set(labels))} class(es), {len(images)} "
            f"images{f' ({dict(skipped)} skipped)' if skipped else ''}"
        )
    return HeldoutSet(images, labels, captions, shas, str(root), names, skipped=dict(skipped))


#: side of the thumbnail two images are compared by (:func:`thumbnail_vector`)
THUMB_SIDE = 16
#: RMS difference (0-255 scale) of two thumbnails under which two images are the same picture:
#: a re-encoded or resized copy differs by 1-2, two different demo pictures by tens
SAME_PICTURE_RMS = 4.0


def thumbnail_vector(data: bytes) -> np.ndarray | None:
    """What an image shows, not its bytes: RGB box-averaged to 16 x 16, as float32 (768
    values); None when it does not decode. A re-encoded or resized copy lands next to it."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            small = im.convert("RGB").resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX)
    except (OSError, ValueError, Image.DecompressionBombError):  # Unidentified.. is an OSError
        return None
    return np.asarray(small, dtype=np.float32).reshape(-1)


def nearest_rms(queries: np.ndarray, pool: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """For each row of ``queries``, the RMS difference to its nearest row of ``pool``."""
    best = np.full(len(queries), np.inf)
    q2 = (queries.astype(np.float64) ** 2).sum(1)
    for start in range(0, len(pool), chunk):
        p = pool[start : start + chunk].astype(np.float64)
        d2 = q2[:, None] + (p**2).sum(1)[None, :] - 2 * queries.astype(np.float64) @ p.T
        best = np.minimum(best, d2.min(1))
    return np.sqrt(np.maximum(best, 0) / queries.shape[1])


# --- candidates ---------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One way to filter the run, and the rows it keeps.

    ``positions`` are row numbers of the :class:`~laion_dask.products.explore.RunView`;
    ``keys``/``shards``/``texts`` are what training reads for them.
    """

    name: str
    kind: str  # "baseline", "thresholds" or "top_fraction"
    source: str
    thresholds: FilterConfig
    fraction: float | None = None
    positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="int64"), repr=False)
    keys: list[str] = field(default_factory=list, repr=False)
    shards: list[str] = field(default_factory=list, repr=False)
    texts: list[str] = field(default_factory=list, repr=False)
    composition: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def rows(self) -> int:
        return len(self.positions)


def _baseline(view: RunView) -> FilterConfig:
    return dataclasses.replace(
        view.thresholds, similarity_en=_OFF, similarity_multi=_OFF, similarity_nolang=_OFF
    )


def kept_positions(view: RunView, thresholds: FilterConfig) -> np.ndarray:
    """Row numbers of ``view`` that ``thresholds`` keep: what ``kept_at`` counts."""
    return np.flatnonzero(view.reasons_at(thresholds).isna().to_numpy(dtype=bool))


def top_fraction_thresholds(view: RunView, fraction: float) -> FilterConfig:
    """The thresholds that keep the top ``fraction`` by similarity of the rows that pass every
    non-CLIP rule (one cut over all language groups; rows tied at the cut are kept too)."""
    if not 0 < fraction <= 1:
        raise EvaluateError(f"--fraction must be in (0, 1], got {fraction}")
    base = _baseline(view)
    pool = kept_positions(view, base)
    sims = np.sort(view.rows[schema.SIMILARITY].to_numpy(dtype="float32")[pool])[::-1]
    k = int(round(fraction * len(pool)))
    if k == 0:
        raise EvaluateError(
            f"top {fraction:.0%}: {len(pool)} rows pass the non-CLIP rules, "
            f"{fraction:.0%} of them is no row; use a larger fraction"
        )
    cut = float(sims[k - 1])  # a float32 value exactly: the filter compares in float32
    return dataclasses.replace(base, similarity_en=cut, similarity_multi=cut, similarity_nolang=cut)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "candidate"


def build_candidates(
    view: RunView,
    thresholds: Sequence[str | Path] = (),
    fractions: Sequence[float] = (),
    filters: Mapping[str, FilterConfig] | None = None,
) -> list[Candidate]:
    """The baseline, one candidate per thresholds file, one per fraction, one per named
    ``filters`` entry (thresholds set in Python or the dashboard); names unique."""
    out = [Candidate(BASELINE, "baseline", "the run's [filters], similarity off", _baseline(view))]
    for path in thresholds:
        cfg = load_thresholds(path)  # as `materialize RUN --thresholds PATH` reads it
        out.append(Candidate(_slug(Path(path).stem), "thresholds", str(path), cfg))
    for name, cfg in (filters or {}).items():
        out.append(Candidate(_slug(name), "thresholds", "thresholds given in Python", cfg))
    for fraction in fractions:
        cfg = top_fraction_thresholds(view, float(fraction))
        name = f"top-{float(fraction) * 100:g}pct"
        out.append(Candidate(name, "top_fraction", f"top {fraction:.0%}", cfg, float(fraction)))
    seen: Counter[str] = Counter()
    for cand in out:
        seen[cand.name] += 1
        if seen[cand.name] > 1:
            cand.name = f"{cand.name}-{seen[cand.name]}"
    return out


def _composition(view: RunView, positions: np.ndarray) -> dict[str, Any]:
    rows = view.rows.iloc[positions]
    groups = rows[schema.LANGUAGE_GROUP].astype("string").fillna("nolang").value_counts()
    langs = rows[schema.LANGUAGE].astype("string").fillna("<none>").value_counts().head(8)
    sim = rows[schema.SIMILARITY].astype("float64")
    out: dict[str, Any] = {
        "language_groups": {str(k): int(v) for k, v in groups.items()},
        "languages": {str(k): int(v) for k, v in langs.items()},
        "similarity_mean": _num(sim.mean()),
        "similarity_min": _num(sim.min()),
    }
    for tag in (schema.PUNSAFE, schema.PWATERMARK):
        values = rows[tag].astype("float64")
        out[f"{tag}_mean"] = _num(values.mean())
        out[f"{tag}_over_0.5"] = int((values > 0.5).sum())
    return out


def _num(value: Any) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value


# --- the plan: everything checked before any training ------------------------------------------


@dataclass
class EvaluatePlan:
    """What :func:`run_evaluation` trains and measures; made (and checked) by
    :func:`plan_evaluation` without writing anything."""

    run: RunDir
    cfg: EvaluateConfig
    candidates: list[Candidate]
    heldout: HeldoutSet
    overlap: dict[str, Any]
    rows_in: int


def plan_evaluation(
    run: str | Path | RunDir,
    thresholds: Sequence[str | Path] = (),
    fractions: Sequence[float] = (),
    *,
    filters: Mapping[str, FilterConfig] | None = None,
    heldout: str | Path | HeldoutSet | None = None,
    cfg: EvaluateConfig | None = None,
    client: Any | None = None,
) -> EvaluatePlan:
    """Candidates, their rows and the held-out set, checked; nothing is written.

    Raises :class:`EvaluateError` (or :class:`~laion_dask.ground.config.ConfigError` for a bad
    thresholds file) for what cannot be meant: a candidate keeping fewer than 2 rows, a
    held-out image that is also a training image, a run that is not a demo run without
    ``heldout``.
    """
    cfg = cfg or EvaluateConfig()
    run = run if isinstance(run, RunDir) else RunDir(str(run))
    if not run.has_markers("scores"):
        raise EvaluateError(f"{run.path} has no scores yet; run `laion-dask score {run.path}`")
    for fraction in fractions:
        if not 0 < float(fraction) <= 1:
            raise EvaluateError(f"--fraction must be in (0, 1], got {fraction}")
    for path in thresholds:  # a missing or bad file: named before the run is read
        load_thresholds(path)
    download = run.read_config().download  # held-out images are stored as the run's are
    if isinstance(heldout, HeldoutSet):
        held = heldout
    elif heldout is not None:
        held = read_heldout(heldout, download)
    elif run.exists(run.join("corpus", "corpus.json")):
        held = demo_heldout(cfg.heldout_size, cfg.seed, download)
    else:
        raise EvaluateError(
            f"{run.path} is not a demo run: give a labelled held-out set with --heldout DIR "
            "(a folder per class, images inside)"
        )
    view = open_run(run, client=client)
    candidates = build_candidates(view, thresholds, fractions, filters)
    for cand in candidates:
        cand.positions = kept_positions(view, cand.thresholds)
        if cand.rows < 2:
            funnel = view.kept_at(cand.thresholds)
            top = sorted(funnel.dropped.items(), key=lambda kv: -kv[1])[:3]
            why = ", ".join(f"{r} {n}" for r, n in top) or "no rows in the run"
            raise EvaluateError(
                f"candidate {cand.name} ({cand.source}) keeps {cand.rows} of {funnel.rows_in} "
                f"rows (dropped: {why}); training needs at least 2"
            )
        cand.composition = _composition(view, cand.positions)
        truth = run.join("corpus", "ground_truth.parquet")
        if run.exists(truth):
            pr = view.precision_recall(cand.thresholds, truth)
            cand.composition["ground_truth"] = {
                k: pr[k] for k in ("precision", "recall", "true_kept", "kept")
            }
    union = np.unique(np.concatenate([c.positions for c in candidates]))
    cols = (schema.KEY, schema.SHARD, schema.TEXT, schema.SHA256)
    details = view.details(union, cols).set_axis(union)
    for cand in candidates:
        d = details.loc[cand.positions]
        cand.keys = d[schema.KEY].astype("string").fillna("").tolist()
        cand.shards = d[schema.SHARD].astype("string").fillna("").tolist()
        cand.texts = d[schema.TEXT].astype("string").fillna("").tolist()
    overlap = check_overlap(run, details, held, candidates)
    return EvaluatePlan(run, cfg, candidates, held, overlap, rows_in=len(view))


def check_overlap(
    run: RunDir, details: pd.DataFrame, held: HeldoutSet, candidates: Sequence[Candidate]
) -> dict[str, Any]:
    """Refuse a held-out image that is any candidate's training image.

    Compared: the thumbnail of every held-out image against that of every training image as
    stored in the run's shards (:func:`thumbnail_vector`; the same picture when the RMS
    difference is under :data:`SAME_PICTURE_RMS`), and the sha256 of every held-out original
    against the sha256 the download recorded of each training row's original bytes.
    """
    stored = read_images(run.join("images"), details[schema.KEY], details[schema.SHARD])
    pos_of, vectors = [], []
    for pos, data in zip(details.index, stored, strict=True):
        v = None if data is None else thumbnail_vector(data)
        if v is not None:
            pos_of.append(int(pos))
            vectors.append(v)
    held_vectors = [thumbnail_vector(b) for b in held.images]
    hits: dict[int, int] = {}
    if vectors:
        pool = np.stack(vectors)
        ok = [i for i, v in enumerate(held_vectors) if v is not None]
        queries = np.stack([held_vectors[i] for i in ok])
        rms = nearest_rms(queries, pool)
        for i, r in zip(ok, rms, strict=True):
            if r < SAME_PICTURE_RMS:
                d2 = ((pool - queries[ok.index(i)]) ** 2).mean(1)
                hits[i] = pos_of[int(d2.argmin())]
        min_rms = float(rms.min()) if len(rms) else None
    else:
        min_rms = None
    original = details[schema.SHA256].astype("string").dropna()
    train_sha = dict(zip(original.to_numpy(), original.index, strict=True))
    for i, sha in enumerate(held.sha256):
        if sha in train_sha:
            hits.setdefault(i, int(train_sha[sha]))
    if hits:
        i, pos = next(iter(sorted(hits.items())))
        users = [c.name for c in candidates if pos in set(c.positions.tolist())]
        key = details.at[pos, schema.KEY]
        raise EvaluateError(
            f"held-out set overlaps the training rows: {len(hits)} image(s), e.g. "
            f"{held.names[i]} is row {key} of {', '.join(users)}; remove them from the held-out "
            "set"
        )
    return {
        "training_images_checked": len(vectors),
        "heldout_images_checked": len(held.images),
        "overlap": 0,
        "nearest_rms": min_rms,
        "same_picture_rms": SAME_PICTURE_RMS,
        "by": [
            f"{THUMB_SIDE}x{THUMB_SIDE} RGB thumbnails (RMS difference)",
            "sha256 of the original download",
        ],
    }


# --- training and measuring: one Dask task per (candidate, seed) --------------------------------


def _image_ext(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


_IMPORT_LOCK = threading.Lock()
_TRAIN_LOCK = threading.Lock()


def _import_transformers() -> None:
    """Resolve transformers' lazy attributes once per process, one thread at a time: two
    trainings starting together in one worker's threads can otherwise see a half-made module
    (``ImportError: cannot import name 'CLIPTokenizer'``)."""
    with _IMPORT_LOCK:
        # heavy optional dependency (seconds to import): only where a model trains
        from transformers import (  # noqa: F401
            CLIPConfig,
            CLIPModel,
            CLIPProcessor,
            CLIPTokenizer,
        )


def train_and_measure(job: dict[str, Any]) -> dict[str, Any]:
    """Train one candidate with one seed, measure it on the held-out shard (a Dask task).

    ``job``: ``name``, ``seed``, ``images`` (the run's image folder), ``keys``, ``shards``,
    ``texts``, ``train`` (a :class:`TrainConfig`), ``heldout`` (the held-out shard),
    ``prompts`` (class -> prompts), ``recall_k``. Returns per-item outcomes, so intervals can
    be bootstrapped over held-out images by the caller.
    """
    t0 = time.perf_counter()
    _import_transformers()
    data = read_images(job["images"], job["keys"], job["shards"])
    samples = [
        ShardSample(key=make_key(0, i), image=img, text=text, meta={}, ext=_image_ext(img))
        for i, (img, text) in enumerate(zip(data, job["texts"], strict=True))
        if img is not None
    ]
    missing = len(data) - len(samples)
    with tempfile.TemporaryDirectory(prefix="laion-dask-evaluate-") as tmp:
        shard = str(Path(tmp) / "00000.tar")
        write_shard(shard, samples)
        del samples, data
        model_dir = Path(tmp) / "model"
        # train_clip seeds torch's process-wide RNG and thread count: two trainings in one
        # process at once would draw each other's initial weights. One at a time per process
        # (a worker per core, as the CLI starts them, trains in parallel all the same)
        with _TRAIN_LOCK:
            report = train_clip([shard], model_dir, job["train"])
        outcome = measure(model_dir, job["heldout"], job["prompts"], job["recall_k"])
    return {
        "name": job["name"],
        "seed": job["seed"],
        "samples": report.samples,
        "skipped": {**report.skipped, **({"missing_image": missing} if missing else {})},
        "first_loss": report.first_loss,
        "final_loss": report.final_loss,
        "train_seconds": report.seconds,
        "seconds": round(time.perf_counter() - t0, 2),
        **outcome,
    }


def read_heldout_shard(path: str) -> tuple[list[bytes], list[str], list[str | None]]:
    """Images, labels and captions of the held-out shard, in order."""
    images, labels, captions = [], [], []
    for _key, members in iter_shard(path):
        ext = next(e for e in ("jpg", "png", "webp") if e in members)
        meta = json.loads(members["json"])
        images.append(members[ext])
        labels.append(meta["label"])
        captions.append(meta.get("caption"))
    return images, labels, captions


def measure(
    model_dir: str | Path, heldout: str, prompts: dict[str, list[str]], recall_k: Sequence[int]
) -> dict[str, Any]:
    """Per held-out image: zero-shot hit, and the rank of the right caption (image->text) and of
    the best image for its caption (text->image); -1 where an image has no caption."""
    images, labels, captions = read_heldout_shard(heldout)
    img, _ = encode(model_dir, images=[_decode(b) for b in images])
    classes = sorted(prompts)
    flat = [p for c in classes for p in prompts[c]]
    _, txt = encode(model_dir, texts=flat)
    per = np.array([len(prompts[c]) for c in classes])
    owner = np.repeat(np.arange(len(classes)), per)
    centroids = np.zeros((len(classes), txt.shape[1]), dtype=np.float64)
    np.add.at(centroids, owner, txt.astype(np.float64))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    index = {c: i for i, c in enumerate(classes)}
    truth = np.array([index[label] for label in labels])
    zero_shot = (img.astype(np.float64) @ centroids.T).argmax(1) == truth
    i2t = np.full(len(images), -1, dtype=np.int64)
    t2i = np.full(len(images), -1, dtype=np.int64)
    have = np.array([c is not None for c in captions])
    if have.any():
        texts = sorted({c for c in captions if c is not None})
        _, cap = encode(model_dir, texts=texts)
        which = np.array([texts.index(c) for c in captions if c is not None])
        sims = img[have].astype(np.float64) @ cap.T.astype(np.float64)  # images x captions
        right = sims[np.arange(len(which)), which]
        # ties count against the model (a collapsed model ranks nothing first)
        i2t[have] = (sims >= right[:, None]).sum(1) - 1
        # text -> image: a caption's best-scoring image among those it describes
        best = np.full(len(texts), -np.inf)
        np.maximum.at(best, which, right)
        rank_of_text = (sims.T >= best[:, None]).sum(1) - 1
        t2i[have] = rank_of_text[which]
    return {
        "zero_shot": zero_shot.astype(np.int8).tolist(),
        "i2t_rank": i2t.tolist(),
        "t2i_rank": t2i.tolist(),
        "recall_k": list(recall_k),
    }


def _per_item(outcome: dict[str, Any], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Per held-out image values of each measure (NaN where an image has no caption)."""
    out = {"zero_shot_top1": np.asarray(outcome["zero_shot"], dtype=np.float64)}
    for prefix, key in (("image_to_text", "i2t_rank"), ("text_to_image", "t2i_rank")):
        ranks = np.asarray(outcome[key], dtype=np.float64)
        for k in outcome["recall_k"]:
            values = (ranks < k).astype(np.float64)
            values[ranks < 0] = np.nan
            out[f"{prefix}_r@{k}"] = values
    return {n: out[n] for n in names}


# --- running ------------------------------------------------------------------------------------


def _write_heldout(run: RunDir, held: HeldoutSet) -> str:
    path = run.join("evaluate", "heldout", "00000.tar")
    run.fs.makedirs(run.join("evaluate", "heldout"), exist_ok=True)
    samples = [
        ShardSample(
            key=make_key(0, i),
            image=img,
            text=cap or label,
            meta={"label": label, "caption": cap, "source": name, "sha256": sha},
            ext=_image_ext(img),
        )
        for i, (img, label, cap, name, sha) in enumerate(
            zip(held.images, held.labels, held.captions, held.names, held.sha256, strict=True)
        )
    ]
    write_shard(path, samples)
    return path


def run_evaluation(
    plan: EvaluatePlan, *, client: Any | None = None, show_progress: bool = False
) -> dict[str, Any]:
    """Train every (candidate, seed) as one Dask task, measure, write ``RUN/evaluate``.

    Returns the results (what ``RUN/evaluate/results.json`` holds). A failed training fails
    the evaluation (``StageError``): a comparison without one of its candidates is none.
    """
    client = get_client(client)
    run, cfg = plan.run, plan.cfg
    t0 = time.perf_counter()
    run.fs.makedirs(run.join("evaluate", "thresholds"), exist_ok=True)
    heldout_path = _write_heldout(run, plan.heldout)
    for cand in plan.candidates:
        text = dump_thresholds(cand.thresholds)
        run.write_bytes_atomic(
            run.join("evaluate", "thresholds", f"{cand.name}.toml"), text.encode()
        )
    prompts = plan.heldout.prompts()
    tasks = []
    for cand in plan.candidates:
        for seed in cfg.seed_list():
            job = {
                "name": cand.name,
                "seed": seed,
                "images": run.join("images"),
                "keys": cand.keys,
                "shards": cand.shards,
                "texts": cand.texts,
                "train": cfg.train_config(seed),
                "heldout": heldout_path,
                "prompts": prompts,
                "recall_k": list(cfg.recall_k),
            }
            tasks.append((f"{cand.name}-seed{seed}", train_and_measure, (job,)))
    outcomes, _ = run_tasks(
        client,
        "evaluate",
        tasks,
        strict=True,
        resources=scoring_resources(client),
        show_progress=show_progress,
    )
    results = summarize(plan, outcomes)
    # wall-clock facts apart: everything else is the same for the same run, candidates and seed
    results["timing"] = {
        "seconds": round(time.perf_counter() - t0, 1),
        "train_seconds": {f"{o['name']}-seed{o['seed']}": o["train_seconds"] for o in outcomes},
    }
    run.write_json_atomic(run.join("evaluate", "results.json"), results)
    run.write_parquet_atomic(run.join("evaluate", "results.parquet"), results_frame(results))
    return results


def summarize(plan: EvaluatePlan, outcomes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Point estimates, paired-bootstrap intervals and differences from the baseline."""
    cfg = plan.cfg
    names = measure_names(cfg.recall_k)
    seeds = cfg.seed_list()
    by = {(o["name"], o["seed"]): o for o in outcomes}
    n = len(plan.heldout.images)
    rng = np.random.default_rng(cfg.seed)
    # the same resamples for every candidate: intervals of differences are paired
    item_w = np.stack(
        [np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(cfg.bootstrap)]
    )
    seed_w = np.stack(
        [
            np.bincount(rng.integers(0, len(seeds), len(seeds)), minlength=len(seeds))
            for _ in range(cfg.bootstrap)
        ]
    ).astype(np.float64)
    seed_w /= seed_w.sum(1, keepdims=True)
    boots: dict[tuple[str, str], np.ndarray] = {}
    entries = []
    for cand in plan.candidates:
        runs = [by[(cand.name, s)] for s in seeds]
        items = [_per_item(o, names) for o in runs]
        measures = {}
        for m in names:
            values = np.stack([it[m] for it in items])  # seeds x images
            have = ~np.isnan(values[0])
            if not have.any():
                continue
            v = values[:, have]
            w = item_w[:, have].astype(np.float64)
            w /= np.maximum(w.sum(1, keepdims=True), 1)
            boot = ((v @ w.T) * seed_w.T).sum(0)  # one value per resample
            boots[(cand.name, m)] = boot
            per_seed = v.mean(1)
            lo, hi = np.percentile(boot, [2.5, 97.5])
            measures[m] = {
                "mean": float(per_seed.mean()),
                "ci_low": float(lo),
                "ci_high": float(hi),
                "per_seed": [float(x) for x in per_seed],
                "n": int(have.sum()),
            }
        entries.append(
            {
                "name": cand.name,
                "kind": cand.kind,
                "source": cand.source,
                "fraction": cand.fraction,
                "thresholds": {
                    g: cand.thresholds.similarity_for(g) for g in schema.LANGUAGE_GROUPS
                },
                "thresholds_file": plan.run.join("evaluate", "thresholds", f"{cand.name}.toml"),
                "rows": cand.rows,
                "share_of_run": cand.rows / max(plan.rows_in, 1),
                "trained_samples": [o["samples"] for o in runs],
                "skipped": runs[0]["skipped"],
                "final_loss": [o["final_loss"] for o in runs],
                "composition": cand.composition,
                "measures": measures,
            }
        )
    for entry in entries:
        for m, values in entry["measures"].items():
            base = boots.get((BASELINE, m))
            if base is None:
                continue
            diff = boots[(entry["name"], m)] - base
            lo, hi = np.percentile(diff, [2.5, 97.5])
            baseline_mean = entries[0]["measures"][m]["mean"]
            values["vs_baseline"] = {
                "difference": values["mean"] - baseline_mean,
                "ci_low": float(lo),
                "ci_high": float(hi),
                "excludes_zero": bool(lo > 0 or hi < 0),
            }
    primary = cfg.primary
    best = max(entries, key=lambda e: (e["measures"][primary]["mean"], -e["rows"]))
    return {
        "run": plan.run.path,
        "caveat": CAVEAT,
        "budget": {
            **{k: v for k, v in dataclasses.asdict(cfg.train_config(cfg.seed)).items()},
            "seed": seeds,
        },
        "bootstrap": {
            "resamples": cfg.bootstrap,
            "level": 0.95,
            "over": "held-out images and training seeds, paired across candidates",
        },
        "heldout": {**plan.heldout.summary(), "overlap_check": plan.overlap},
        "measures": names,
        "primary": primary,
        "candidates": entries,
        "winner": {
            "name": best["name"],
            "measure": primary,
            **best["measures"][primary],
        },
    }


def results_frame(results: dict[str, Any]) -> pd.DataFrame:
    """One row per (candidate, measure): size, mean, interval, difference from the baseline."""
    rows = []
    for e in results["candidates"]:
        for m, v in e["measures"].items():
            d = v.get("vs_baseline", {})
            rows.append(
                {
                    "candidate": e["name"],
                    "kind": e["kind"],
                    "source": e["source"],
                    "rows": e["rows"],
                    "share_of_run": e["share_of_run"],
                    "measure": m,
                    "mean": v["mean"],
                    "ci_low": v["ci_low"],
                    "ci_high": v["ci_high"],
                    "seeds": len(v["per_seed"]),
                    "heldout_n": v["n"],
                    "vs_baseline": d.get("difference", np.nan),
                    "vs_baseline_low": d.get("ci_low", np.nan),
                    "vs_baseline_high": d.get("ci_high", np.nan),
                }
            )
    return pd.DataFrame(rows)


def evaluate(
    run: str | Path | RunDir,
    thresholds: Sequence[str | Path] = (),
    fractions: Sequence[float] = (),
    *,
    filters: Mapping[str, FilterConfig] | None = None,
    heldout: str | Path | HeldoutSet | None = None,
    cfg: EvaluateConfig | None = None,
    client: Any | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Compare candidate filters of ``run`` by the small CLIP each trains (module docstring).

    Parameters
    ----------
    run
        A scored run directory.
    thresholds
        Thresholds files (``[filters]`` tables), one candidate each.
    fractions
        "Keep the top X" shares in (0, 1], one candidate each.
    filters
        Named thresholds, one candidate each (the dashboard passes its sliders' as
        ``{"dashboard": cfg}``).
    heldout
        A labelled folder (:func:`read_heldout`); default on a demo run: a fresh draw.
    cfg
        The training budget and measures.
    client
        A ``distributed.Client``; None uses the default one.

    Returns
    -------
    dict
        What ``RUN/evaluate/results.json`` holds.

    Example
    -------
    >>> evaluate("demo-run", ["laion.toml"], [0.3, 0.1])        # doctest: +SKIP
    """
    plan = plan_evaluation(
        run, thresholds, fractions, filters=filters, heldout=heldout, cfg=cfg, client=client
    )
    return run_evaluation(plan, client=client, show_progress=show_progress)


def read_results(run: str | Path | RunDir) -> tuple[dict[str, Any], pd.DataFrame]:
    """``RUN/evaluate/results.json`` and ``results.parquet``; FileNotFoundError when the run
    has not been evaluated."""
    run = run if isinstance(run, RunDir) else RunDir(str(run))
    path = run.join("evaluate", "results.json")
    if not run.exists(path):
        raise FileNotFoundError(
            f"{run.path} has no evaluation yet; run `laion-dask evaluate {run.path}`"
        )
    return run.read_json(path), run.read_parquet(run.join("evaluate", "results.parquet"))


def format_results(results: dict[str, Any], measures: Sequence[str] | None = None) -> str:
    """The comparison as a text table (what ``laion-dask evaluate`` prints)."""
    primary = results["primary"]
    default = [primary, "zero_shot_top1", *[m for m in results["measures"] if m.endswith("r@5")]]
    shown = list(dict.fromkeys(measures or [m for m in default if m in results["measures"]]))
    head = f"{'candidate':<18} {'rows':>6}  " + "  ".join(f"{m:>24}" for m in shown)
    head += f"  {'vs ' + BASELINE + ' (' + primary + ')':>34}"
    lines = [head]
    for e in results["candidates"]:
        cells = []
        for m in shown:
            v = e["measures"].get(m)
            cells.append(
                f"{'-':>24}"
                if v is None
                else f"{v['mean']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]".rjust(24)
            )
        d = e["measures"].get(primary, {}).get("vs_baseline")
        diff = (
            ""
            if d is None or e["name"] == BASELINE
            else (f"{d['difference']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
        )
        lines.append(f"{e['name']:<18} {e['rows']:>6}  " + "  ".join(cells) + f"  {diff:>34}")
    w = results["winner"]
    held = results["heldout"]
    lines.append("")
    lines.append(
        f"best by {primary}: {w['name']} ({w['mean']:.3f}); 95 % intervals from a paired "
        f"bootstrap over {held['images']} held-out images and {len(results['budget']['seed'])} "
        "seeds"
    )
    lines.append(results["caveat"])
    return "\n".join(lines)
