"""Train a small CLIP from webdataset shards: the small-scale "reproduce CLIP on the data" step.

``train_clip(shards, out_dir, cfg)`` reads ``KEY.{jpg,png,webp}`` + ``KEY.txt`` samples, trains
a transformers :class:`~transformers.CLIPModel` with the symmetric InfoNCE loss and a learned
temperature (as CLIP and OpenCLIP do), and saves model, tokenizer and processor with
``save_pretrained``: the result loads with ``CLIPModel.from_pretrained(path)`` and
``AutoProcessor.from_pretrained(path)``, the same calls that load ``openai/clip-vit-base-patch32``.
The tokenizer is a byte-level BPE trained offline on the training captions with CLIP's own
normalisation and pre-tokenisation, wrapped as :class:`~transformers.CLIPTokenizer`.

``train_tag_head(parquet, label, out)`` trains a ``punsafe``/``pwatermark`` probe over image
embeddings and writes it in the tag-head format that :mod:`laion_dask.stages.tags` reads.

``build_demo_model(out_dir, seed=...)`` draws a synthetic training set (never the demo corpus:
its own seed, its own pictures), writes it as shards, trains, and evaluates zero-shot accuracy on
held-out pictures. The demo model committed under ``laion_dask/data/demo-clip`` is rebuilt by::

    python -m laion_dask.products.train build-demo --out laion_dask/data/demo-clip --seed 1234
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from scipy.stats import rankdata

from laion_dask.ground import schema
from laion_dask.ground.shards import ShardSample, iter_shard, make_key, write_shard
from laion_dask.products.synthetic.corpus import CorpusSpec, generate_corpus, load_corpus_info
from laion_dask.products.synthetic.draw import (
    COLOURS,
    SHAPES,
    all_scenes,
    caption,
    draw_scene,
    encode_image,
    random_scene,
)
from laion_dask.stages.clip import load_encoder, resolve_device
from laion_dask.stages.embeddings import read_embeddings
from laion_dask.stages.tags import PROMPTS, TagHead, load_tag_head, save_tag_head

__all__ = [
    "TrainConfig",
    "TrainReport",
    "train_clip",
    "train_tokenizer",
    "load_shard_samples",
    "write_synthetic_shards",
    "build_demo_model",
    "evaluate_model",
    "zero_shot_accuracy",
    "corpus_auc",
    "roc_auc",
    "encode",
    "train_tag_head",
    "DEMO_MODEL_DIR",
    "demo_model_dir",
    "DEMO_SEED",
    "main",
]

log = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "data" / "demo-clip"
DEMO_SEED = 1234
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Model shape and optimisation of :func:`train_clip` (defaults: ~1.5M parameters)."""

    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 128
    vision_layers: int = 3
    text_width: int = 128
    text_layers: int = 2
    heads: int = 4
    projection_dim: int = 128
    max_text_tokens: int = 32
    #: target BPE vocabulary (bytes, specials and merges included)
    vocab_size: int = 1024
    batch_size: int = 128
    steps: int = 800
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    #: initial temperature as CLIP: logit_scale = log(1 / 0.07); clamped at log(100)
    init_temperature: float = 0.07
    seed: int = 0
    #: torch intra-op threads (0 = leave torch's default)
    threads: int = 0
    #: ``auto`` = cuda when available, else cpu
    device: str = "auto"
    #: use at most this many samples from the shards (None = all)
    max_samples: int | None = None
    log_every: int = 50

    def __post_init__(self) -> None:
        # every integer setting is a size or a count; seed, threads and warmup_steps may be 0
        zero_ok = ("seed", "threads", "warmup_steps")
        for key in [f.name for f in dataclasses.fields(self) if f.type == "int"]:
            value = getattr(self, key)
            if key not in zero_ok and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.vision_width % self.heads or self.text_width % self.heads:
            raise ValueError("widths must be multiples of heads")
        if self.vocab_size < 300:
            raise ValueError("vocab_size must be >= 300 (256 bytes + specials + merges)")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ValueError("lr must be > 0, weight_decay and warmup_steps >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not 0 < self.init_temperature < 1:
            raise ValueError("init_temperature must be in (0, 1)")


@dataclass
class TrainReport:
    """What a training run did."""

    out_dir: str
    samples: int
    skipped: dict[str, int]
    steps: int
    seconds: float
    first_loss: float
    final_loss: float
    temperature: float
    vocab_size: int
    parameters: int
    losses: list[float] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return dataclasses.asdict(self)


# --- data ---------------------------------------------------------------------------------------
def load_shard_samples(
    shards: Sequence[str], max_samples: int | None = None
) -> tuple[list[bytes], list[str], dict[str, int]]:
    """Image bytes and captions of every complete sample in ``shards``, plus skip counts.

    A sample without an image member (``jpg``/``jpeg``/``png``/``webp``) or with an empty or
    non-UTF-8 ``txt`` is skipped and counted by reason.
    """
    images: list[bytes] = []
    texts: list[str] = []
    skipped: dict[str, int] = {}
    for shard in shards:
        for key, members in iter_shard(str(shard)):
            ext = next((e for e in _IMAGE_EXTS if e in members), None)
            try:
                text = members.get("txt", b"").decode("utf-8").strip()
                reason = None if text else "no_text"
            except UnicodeDecodeError:
                reason = "bad_text"
            if ext is None:  # the first reason: no image, whatever the caption
                reason = "no_image"
            if reason is not None:
                skipped[reason] = skipped.get(reason, 0) + 1
                log.debug("skipping %s in %s: %s", key, shard, reason)
                continue
            images.append(members[ext])  # type: ignore[index]
            texts.append(text)
            if max_samples is not None and len(images) >= max_samples:
                return images, texts, skipped
    return images, texts, skipped


def train_tokenizer(texts: Iterable[str], vocab_size: int, max_length: int) -> Any:
    """A byte-level BPE with CLIP's normalisation, trained on ``texts``, as a ``CLIPTokenizer``.

    Every byte and every byte + ``</w>`` is in the vocabulary, so no text maps to unknown tokens.
    """
    # heavy optional dependencies (seconds to import): only where a model trains
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import CLIPTokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix="</w>", unk_token=_EOS))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                    r"""[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    ends = sorted(a + "</w>" for a in alphabet)
    base = [_BOS, _EOS] + sorted(alphabet) + ends
    trainer = BpeTrainer(
        vocab_size=max(vocab_size, len(base) + 1),
        # the word-final symbols as special tokens: the trainer then gives them ids in this
        # order, before it reads a word. Otherwise it numbers them as it meets them in a hash
        # map, whose order changes per process, and count ties between merges break by those
        # ids: two trainings on the same texts could differ (huggingface/tokenizers#1794)
        special_tokens=[_BOS, _EOS, *ends],
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        continuing_subword_prefix="",
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    data = json.loads(tok.to_str())["model"]
    trained_vocab: dict[str, int] = data["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["merges"]]
    # fixed base symbols first (ids 0..513), then what the trainer added, in its order
    vocab = {t: i for i, t in enumerate(base)}
    for token, _ in sorted(trained_vocab.items(), key=lambda kv: kv[1]):
        if token not in vocab:
            vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)  # type: ignore[arg-type]


def _make_processor(tokenizer: Any, image_size: int) -> Any:
    # heavy optional dependencies (seconds to import): only where a model trains
    from transformers import CLIPProcessor

    try:  # transformers 5 without torchvision: name the PIL backend to avoid a fallback warning
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover - transformers 4.x
        from transformers import CLIPImageProcessor as ImageProcessor  # type: ignore[assignment]
    image_processor = ImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _pixels(processor: Any, images: Sequence[Any], batch: int = 256) -> Any:
    # heavy optional dependencies (seconds to import): only where a model trains
    import torch

    out = []
    for i in range(0, len(images), batch):
        px = processor.image_processor(images=list(images[i : i + batch]), return_tensors="pt")
        out.append(px["pixel_values"].to(torch.float16))
    return torch.cat(out) if out else torch.empty(0)


def _decode(data: bytes) -> Any:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


# --- training -----------------------------------------------------------------------------------
def _build_model(cfg: TrainConfig, tokenizer: Any) -> Any:
    # heavy optional dependencies (seconds to import): only where a model trains
    from transformers import CLIPConfig, CLIPModel

    def tower(width: int, layers: int, **extra: Any) -> dict[str, Any]:
        return dict(
            hidden_size=width,
            intermediate_size=width * 4,
            num_hidden_layers=layers,
            num_attention_heads=cfg.heads,
            projection_dim=cfg.projection_dim,
            **extra,
        )

    config = CLIPConfig(
        text_config=tower(
            cfg.text_width,
            cfg.text_layers,
            vocab_size=len(tokenizer),
            max_position_embeddings=cfg.max_text_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=tower(
            cfg.vision_width,
            cfg.vision_layers,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
        ),
        projection_dim=cfg.projection_dim,
        logit_scale_init_value=math.log(1 / cfg.init_temperature),
    )
    return CLIPModel(config)


def train_clip(
    shards: Sequence[str], out_dir: str | Path, cfg: TrainConfig | None = None
) -> TrainReport:
    """Train a small CLIP on webdataset ``shards`` and save it to ``out_dir``.

    Parameters
    ----------
    shards
        Tar shards with ``KEY.{jpg,png,webp}`` and ``KEY.txt`` members (img2dataset layout).
    out_dir
        Written with ``save_pretrained``: model, tokenizer, processor, and ``train_report.json``.
    cfg
        Model shape and optimisation; defaults train ~1.5M parameters in 1-3 minutes on 2 cores.

    Returns
    -------
    TrainReport
        Sample and skip counts, losses, time, final temperature.

    Example
    -------
    >>> train_clip(["shards/00000.tar"], "model", TrainConfig(steps=3))    # doctest: +SKIP
    """
    # heavy optional dependencies (seconds to import): only where a model trains
    import torch

    cfg = cfg or TrainConfig()
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    raw_images, texts, skipped = load_shard_samples(shards, cfg.max_samples)
    if len(raw_images) < 2:
        raise ValueError(
            f"need at least 2 usable samples in {list(shards)}, found {len(raw_images)}"
            f" (skipped: {skipped})"
        )
    tokenizer = train_tokenizer(texts, cfg.vocab_size, cfg.max_text_tokens)
    processor = _make_processor(tokenizer, cfg.image_size)
    images: list[Any] = []
    for i, data in enumerate(raw_images):
        try:
            images.append(_decode(data))
        except (OSError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError
            skipped["bad_image"] = skipped.get("bad_image", 0) + 1
            log.debug("undecodable image in sample %d: %s", i, err)
            texts[i] = ""
    texts = [t for t in texts if t]
    pixels = _pixels(processor, images)
    del images, raw_images
    tokens = tokenizer(
        texts,
        padding="max_length",
        truncation=True,
        max_length=cfg.max_text_tokens,
        return_tensors="pt",
    )
    n = len(texts)
    device = resolve_device(cfg.device)
    model = _build_model(cfg, tokenizer).to(device)
    model.train()
    decays: dict[bool, list[Any]] = {True: [], False: []}
    for name, p in model.named_parameters():  # no decay on biases, norms and embeddings
        decays[p.ndim >= 2 and "embedding" not in name].append(p)
    opt = torch.optim.AdamW(
        [
            {"params": decays[True], "weight_decay": cfg.weight_decay},
            {"params": decays[False], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-6,
    )

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    gen = torch.Generator().manual_seed(cfg.seed)
    batch = min(cfg.batch_size, n)
    order = torch.randperm(n, generator=gen)
    cursor = 0
    losses: list[float] = []
    running: list[float] = []
    for step in range(cfg.steps):
        if cursor + batch > n:  # a new epoch: reshuffle, never a short batch
            order, cursor = torch.randperm(n, generator=gen), 0
        idx = order[cursor : cursor + batch]
        cursor += batch
        px = pixels[idx].float()
        flip = torch.rand(len(idx), generator=gen) < 0.5  # captions say nothing about left/right
        px[flip] = px[flip].flip(-1)
        px = px.to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        # CLIPModel's own loss: the symmetric InfoNCE (image->text and text->image, averaged)
        loss = model(
            input_ids=tokens["input_ids"][idx].to(device),
            attention_mask=tokens["attention_mask"][idx].to(device),
            pixel_values=px,
            return_loss=True,
        ).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():  # as CLIP: the temperature never goes below 1/100
            model.logit_scale.clamp_(0, math.log(100))
        running.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step == cfg.steps - 1:
            losses.append(sum(running) / len(running))
            log.info(
                "step %d/%d loss %.4f T %.4f",
                step + 1,
                cfg.steps,
                losses[-1],
                1 / model.logit_scale.exp().item(),
            )
            running = []
    model = model.to("cpu").eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    report = TrainReport(
        out_dir=str(out),
        samples=n,
        skipped=skipped,
        steps=cfg.steps,
        seconds=round(time.perf_counter() - t0, 2),
        first_loss=losses[0] if losses else float("nan"),
        final_loss=losses[-1] if losses else float("nan"),
        temperature=float(1 / model.logit_scale.exp().item()),
        vocab_size=len(tokenizer),
        parameters=sum(p.numel() for p in model.parameters()),
        losses=[round(x, 4) for x in losses],
    )
    _write_report(out, report, cfg)
    return report


def _write_report(out: Path, report: TrainReport, cfg: TrainConfig, **extra: Any) -> None:
    data = {"report": report.to_dict(), "config": dataclasses.asdict(cfg), **extra}
    (out / "train_report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")


# --- synthetic data and evaluation --------------------------------------------------------------
def write_synthetic_shards(
    out_dir: str | Path,
    n: int,
    *,
    seed: int,
    shard_size: int = 2000,
    size_range: tuple[int, int] = (80, 160),
    languages: Sequence[str] = ("en", "de", "fr", "es"),
) -> list[str]:
    """Draw ``n`` captioned pictures (caption language drawn per sample) as webdataset shards.

    The pictures come from :mod:`laion_dask.products.synthetic.draw` with ``seed``; the demo
    corpus draws with
    its own seed, so the sets are disjoint draws of the same vocabulary.
    """
    rng = random.Random(f"laion-dask-train-{seed}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard_id in range((n + shard_size - 1) // shard_size):
        samples = []
        for i in range(min(shard_size, n - shard_id * shard_size)):
            scene = random_scene(rng)
            img = draw_scene(scene, (rng.randint(*size_range), rng.randint(*size_range)), rng)
            lang = rng.choice(list(languages))
            text = caption(scene, lang, rng.randrange(3))
            samples.append(
                ShardSample(
                    key=make_key(shard_id, i),
                    image=encode_image(img, "JPEG", 90),
                    text=text,
                    meta={"caption_en": caption(scene, "en"), "language": lang},
                )
            )
        path = str(out / f"{shard_id:05d}.tar")
        write_shard(path, samples)
        paths.append(path)
    return paths


def encode(
    model_dir: str | Path,
    *,
    images: Sequence[Any] | None = None,
    texts: Sequence[str] | None = None,
    batch_size: int = 256,
) -> tuple[Any, Any]:
    """L2-normalised image and text embeddings (numpy float32) from a saved model directory,
    made by the scoring stage's encoder: what a run's similarities would be."""
    enc = load_encoder(str(model_dir), device="cpu")

    def batched(fn: Any, items: Sequence[Any]) -> np.ndarray:
        parts = [fn(list(items[i : i + batch_size])) for i in range(0, len(items), batch_size)]
        return np.concatenate(parts) if parts else np.zeros((0, enc.dim), np.float32)

    img_emb = None if images is None else batched(enc.encode_images, images)
    txt_emb = (
        None if texts is None else batched(lambda t: enc.encode_texts(t, ["en"] * len(t)), texts)
    )
    return img_emb, txt_emb


def zero_shot_accuracy(model_dir: str | Path, *, n: int = 300, seed: int = 99) -> dict[str, float]:
    """Zero-shot accuracy on ``n`` held-out drawn pictures.

    Each picture is classified by the nearest of all canonical English captions of the
    vocabulary (~1,500 classes), per language with that language's captions; the attributes
    of the chosen caption are scored on their own too (shape: 6 classes, colour: 8).
    """
    rng = random.Random(f"laion-dask-heldout-{seed}")
    scenes = [random_scene(rng) for _ in range(n)]
    images = [draw_scene(s, (rng.randint(256, 640), rng.randint(256, 640)), rng) for s in scenes]
    classes = all_scenes()
    index = {c: i for i, c in enumerate(classes)}
    truth = np.array([index[s] for s in scenes])
    img, _ = encode(model_dir, images=images)
    result: dict[str, float] = {
        "n": float(n),
        "classes": float(len(classes)),
        "chance_caption": 1 / len(classes),
        "chance_shape": 1 / len(SHAPES),
        "chance_colour": 1 / len(COLOURS),
    }
    for lang in ("en", "de", "fr", "es"):
        _, txt = encode(model_dir, texts=[caption(c, lang) for c in classes])
        pred = (img @ txt.T).argmax(1)
        result[f"caption_top1_{lang}"] = float((pred == truth).mean())
        if lang == "en":
            for name, attr in _ATTRIBUTES.items():
                hits = [attr(classes[p]) == attr(s) for p, s in zip(pred, scenes, strict=True)]
                result[f"{name}_top1"] = float(np.mean(hits))
    return result


#: the parts of a scene that zero-shot accuracy also scores on their own
_ATTRIBUTES: dict[str, Any] = {
    "shape": lambda s: s.shape,
    "colour": lambda s: s.colour,
    "background": lambda s: (s.background, s.bg_colour),
}


def roc_auc(scores: Any, labels: Any) -> float:
    """ROC AUC of ``scores`` against boolean ``labels`` (Mann-Whitney U, ties counted half)."""
    return _auc(np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool))


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs at least one positive and one negative label")
    ranks = rankdata(scores)  # ties share their average rank
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def corpus_auc(model_dir: str | Path, corpus_dir: str | Path) -> dict[str, Any]:
    """Cosine similarity of every demo-corpus link that has a picture, and its ROC AUC.

    Reads the picture files directly (no HTTP) for the ground-truth rows with ``has_image`` and
    an alt text, and scores them against ``matches``: overall and per text language.
    """
    info = load_corpus_info(corpus_dir)
    gt = pd.read_parquet(info.ground_truth)
    rows = gt[gt["has_image"] & gt["text"].notna()].reset_index(drop=True)
    names = rows["url"].str.rsplit("/", n=1).str[1]
    paths = [
        info.images_dir / f"host{h}" / "img" / name
        for h, name in zip(rows["host"], names, strict=True)
    ]
    unique = sorted(set(paths))
    pos = {p: i for i, p in enumerate(unique)}
    img, txt = encode(
        model_dir, images=[_decode(p.read_bytes()) for p in unique], texts=rows["text"].tolist()
    )
    sims = np.einsum("ij,ij->i", img[[pos[p] for p in paths]], txt)
    labels = rows["matches"].to_numpy(dtype=bool)
    out: dict[str, Any] = {
        "pairs": len(rows),
        "auc": _auc(sims, labels),
        "mean_true": float(sims[labels].mean()),
        "mean_false": float(sims[~labels].mean()),
    }
    for lang in ("en", "de", "fr", "es"):
        sel = (rows["language"] == lang).fillna(False).to_numpy(dtype=bool)
        if labels[sel].any() and (~labels[sel]).any():
            out[f"auc_{lang}"] = _auc(sims[sel], labels[sel])
    for kind in ("mismatched", "near_miss", "generic"):
        sel = ((rows["noise"] == kind) | rows["matches"]).to_numpy(dtype=bool)
        if (~labels[sel]).any():
            out[f"auc_vs_{kind}"] = _auc(sims[sel], labels[sel])
    return out


def evaluate_model(model_dir: str | Path, seed: int = DEMO_SEED) -> dict[str, Any]:
    """Zero-shot accuracy on held-out pictures and ROC AUC on a small demo corpus.

    Both are drawn with seeds derived from ``seed`` (``seed + 2`` for the held-out pictures,
    ``seed + 1`` for the corpus) that the training set never uses. The result is merged into
    ``model_dir/train_report.json`` under ``metrics``.
    """
    metrics: dict[str, Any] = {"zero_shot": zero_shot_accuracy(model_dir, seed=seed + 2)}
    with tempfile.TemporaryDirectory(prefix="laion-dask-eval-") as tmp:
        # the URLs are never fetched here: corpus_auc reads the picture files from disk
        generate_corpus(
            tmp,
            CorpusSpec(n_pages=150, n_images=120, seed=seed + 1),
            base_urls=["http://127.0.0.1:9", "http://127.0.0.2:9", "http://127.0.0.3:9"],
        )
        metrics["corpus"] = corpus_auc(model_dir, tmp)
    path = Path(model_dir) / "train_report.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("report", {})["metrics"] = metrics
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return metrics


def build_demo_model(
    out_dir: str | Path,
    seed: int = DEMO_SEED,
    *,
    n_train: int = 24_000,
    cfg: TrainConfig | None = None,
    evaluate: bool = True,
) -> TrainReport:
    """Draw a synthetic training set (seed ``seed``), train the demo CLIP on it, evaluate it.

    The training pictures are never the demo corpus's: they are drawn by
    :func:`write_synthetic_shards` with their own seed. With ``evaluate``,
    :func:`evaluate_model` stores held-out metrics in ``TrainReport.metrics``.
    """
    cfg = cfg or TrainConfig(seed=seed)
    with tempfile.TemporaryDirectory(prefix="laion-dask-train-") as tmp:
        shards = write_synthetic_shards(Path(tmp) / "shards", n_train, seed=seed)
        report = train_clip(shards, out_dir, cfg)
    _write_report(
        Path(out_dir),
        report,
        cfg,
        build={
            "command": "python -m laion_dask.products.train build-demo "
            f"--out {out_dir} --seed {seed} "
            f"--n-train {n_train} --steps {cfg.steps} --batch-size {cfg.batch_size} "
            f"--lr {cfg.lr} --warmup-steps {cfg.warmup_steps} --device {cfg.device}",
            "seed": seed,
            "n_train": n_train,
        },
    )
    if evaluate:
        report.metrics = evaluate_model(out_dir, seed)
    return report


def demo_model_dir(cache_dir: str | Path | None = None) -> Path:
    """The demo CLIP's directory: the committed weights, else a cached build (trained once).

    The committed ``laion_dask/data/demo-clip`` is used when present. Otherwise the model is
    built by :func:`build_demo_model` into ``cache_dir`` (default ``~/.cache/laion-dask/demo-clip``,
    or ``$LAION_DASK_CACHE/demo-clip``) on first use and reused afterwards; no hub is contacted.
    """
    if (DEMO_MODEL_DIR / "model.safetensors").is_file():
        return DEMO_MODEL_DIR
    root = (
        Path(cache_dir)
        if cache_dir is not None
        else Path(os.environ.get("LAION_DASK_CACHE", Path.home() / ".cache" / "laion-dask"))
    )
    target = root / "demo-clip"
    if not (target / "model.safetensors").is_file():
        log.warning("no committed demo model: training one into %s (minutes on a CPU)", target)
        build_demo_model(target, DEMO_SEED, evaluate=False)
    return target


# --- safety tag heads (the format lives in laion_dask.stages.tags) -----------------------------
def _load_training_data(
    parquet_path: str,
    label_col: str,
    embedding_col: str,
    embeddings_dir: str | None,
    key_col: str,
) -> tuple[np.ndarray, np.ndarray]:
    df = pd.read_parquet(parquet_path)
    if label_col not in df.columns:
        raise ValueError(f"{parquet_path}: no label column {label_col!r}")
    if embeddings_dir is not None:
        img, _txt, meta = read_embeddings(embeddings_dir)
        pos = pd.Index(meta[key_col].astype("string")).get_indexer(df[key_col].astype("string"))
        if (pos < 0).any():
            log.warning("%d labelled rows have no embedding and are skipped", int((pos < 0).sum()))
        df, x = df[pos >= 0], img[pos[pos >= 0]].astype(np.float32)
    else:
        if embedding_col not in df.columns:
            raise ValueError(f"{parquet_path}: no embedding column {embedding_col!r}")
        x = np.stack([np.asarray(v, np.float32) for v in df[embedding_col]])
    y = pd.to_numeric(df[label_col].astype("Float64"), errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )
    keep = ~np.isnan(y)
    if (~keep).any():
        log.warning("%d rows without a label are skipped", int((~keep).sum()))
    x, y = x[keep], y[keep]
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"{label_col}: labels must be 0/1 or booleans")
    return x, y.astype(np.float32)


def train_tag_head(
    parquet_path: str,
    label_col: str,
    out_path: str,
    *,
    tag: str = schema.PUNSAFE,
    embedding_col: str = "image_embedding",
    embeddings_dir: str | None = None,
    key_col: str = schema.KEY,
    hidden: Sequence[int] = (),
    activation: str = "relu",
    epochs: int = 200,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> dict[str, float]:
    """Train a probe for ``tag`` from a labelled parquet and write it to ``out_path``.

    Parameters
    ----------
    parquet_path
        Rows with a 0/1 (or boolean) ``label_col`` and either an ``embedding_col`` of float
        lists, or a ``key_col`` joined to the clip-retrieval folder ``embeddings_dir``.
    out_path
        Where the head is written (format in the module docstring).
    tag
        ``punsafe`` or ``pwatermark``: the output name the scoring stage fills from this head.
    hidden
        Hidden layer sizes; empty is a linear (logistic regression) probe.

    Returns
    -------
    dict
        ``n``, ``positives``, ``train_accuracy`` and ``train_loss`` of the trained head.
    """
    # heavy optional dependency (seconds to import): only where a model trains
    import torch

    if tag not in PROMPTS:
        raise ValueError(f"tag must be one of {sorted(PROMPTS)}, got {tag!r}")
    x, y = _load_training_data(parquet_path, label_col, embedding_col, embeddings_dir, key_col)
    if len(x) == 0 or len(np.unique(y)) < 2:
        raise ValueError(f"{parquet_path}: need labelled rows of both classes, got {len(x)}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    gen = torch.Generator().manual_seed(seed)
    sizes = [x.shape[1], *[int(h) for h in hidden], 1]
    layers = [torch.nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=1.0 / np.sqrt(layer.in_features), generator=gen)
        torch.nn.init.zeros_(layer.bias)
    act = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "tanh": torch.nn.Tanh}[activation]
    modules: list[torch.nn.Module] = []
    for layer in layers:
        modules += [layer, act()]
    net = torch.nn.Sequential(*modules[:-1])  # no activation after the last layer
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    pos_weight = torch.tensor((len(y) - y.sum()) / max(y.sum(), 1.0))
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    loss = torch.tensor(0.0)
    for _ in range(epochs):  # full batch: probes train on thousands of rows, not millions
        opt.zero_grad()
        loss = loss_fn(net(xt).squeeze(1), yt)
        loss.backward()
        opt.step()
    config = {
        "version": 1,
        "input_dim": int(x.shape[1]),
        "hidden": [int(h) for h in hidden],
        "activation": activation,
        "outputs": [tag],
        "embedding": "image",
        "normalize_input": True,
        "label_col": label_col,
    }
    head = TagHead([(m.weight.detach().numpy(), m.bias.detach().numpy()) for m in layers], config)
    save_tag_head(out_path, head)
    load_tag_head.cache_clear()
    pred = head.predict(x)[tag] >= 0.5
    return {
        "n": float(len(y)),
        "positives": float(y.sum()),
        "train_accuracy": float((pred == (y == 1)).mean()),
        "train_loss": float(loss.item()),
    }


# --- command line -------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``train-clip SHARDS... --out DIR`` or ``build-demo --out DIR [--seed N]``."""
    parser = argparse.ArgumentParser(prog="laion-dask", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tc = sub.add_parser("train-clip", help="train a small CLIP on webdataset shards")
    tc.add_argument("shards", nargs="+", help="tar shards (KEY.jpg + KEY.txt)")
    bd = sub.add_parser("build-demo", help="draw a synthetic set and train the demo CLIP on it")
    bd.add_argument("--seed", type=int, default=DEMO_SEED, help="seed of the synthetic draw")
    bd.add_argument("--n-train", type=int, default=24_000, help="synthetic training pairs")
    bd.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    for p in (tc, bd):
        p.add_argument("--out", required=True, help="model directory (save_pretrained)")
        p.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimizer steps")
        p.add_argument(
            "--batch-size", type=int, default=TrainConfig.batch_size, help="pairs per step"
        )
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        p.add_argument(
            "--device", default="auto", choices=("auto", "cpu", "cuda"), help="where to train"
        )
        p.add_argument("--lr", type=float, default=TrainConfig.lr, help="peak learning rate")
        p.add_argument(
            "--warmup-steps", type=int, default=TrainConfig.warmup_steps, help="linear warm-up"
        )
    tc.add_argument("--seed", type=int, default=0, help="seed of the initial weights and order")
    tc.add_argument("--max-samples", type=int, default=None, help="use at most N pairs")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if args.command == "train-clip":
        report = train_clip(args.shards, args.out, cfg)
    else:
        report = build_demo_model(
            args.out, args.seed, n_train=args.n_train, cfg=cfg, evaluate=not args.no_eval
        )
    print(json.dumps(report.to_dict(), indent=2))  # the CLI's output, not the library's
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
