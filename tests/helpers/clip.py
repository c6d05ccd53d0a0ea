"""Builders for CLIP-stage tests and benchmarks: real transformers models saved to disk.

``save_tiny_clip(dir)`` writes a tiny random ``CLIPModel`` + a byte-level ``CLIPTokenizer`` +
image processor that ``load_encoder(dir)`` reads through ``from_pretrained``;
``save_tiny_multilingual(dir)`` writes a DistilBERT + mean pooling + Dense text tower in the
``sentence-transformers`` folder layout of ``clip-ViT-B-32-multilingual-v1``;
``save_vit_b32(dir)`` writes the ViT-B/32 shape (``CLIPConfig()``) with random weights;
``save_tiny_siglip(dir)`` a tiny ``SiglipModel`` with a real ``SiglipTokenizer`` (sentencepiece
model trained here; needs ``sentencepiece`` + ``protobuf``) and ``save_tiny_altclip(dir)`` a tiny
``AltCLIPModel`` with an ``XLMRobertaTokenizer`` built from a unigram vocabulary.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image

TINY_IMAGE = 32


def byte_level_vocab() -> dict[str, int]:
    """A character-level CLIP BPE vocabulary (every byte, with and without ``</w>``)."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    for c in chars:
        vocab.setdefault(c + "</w>", len(vocab))
    return vocab


def _image_processor(size: int):
    try:
        from transformers import CLIPImageProcessorPil as Proc
    except ImportError:  # older transformers, or the name differs
        from transformers import CLIPImageProcessor as Proc
    return Proc(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def _tiny_vision(image_size: int = TINY_IMAGE) -> dict[str, int]:
    """The vision tower every tiny test model shares (a fresh dict: configs may keep it)."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": image_size,
        "patch_size": 8,
    }


def _save_clip(out: Path, config, seed: int) -> Path:
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    CLIPTokenizer(vocab=byte_level_vocab(), merges=[]).save_pretrained(out)
    _image_processor(config.vision_config.image_size).save_pretrained(out)
    return out


def save_tiny_clip(out: Path, *, seed: int = 0, projection_dim: int = 16) -> Path:
    """A tiny CLIP (32 px images, 16-d embeddings) saved with ``save_pretrained``."""
    from transformers import CLIPConfig

    vocab = len(byte_level_vocab())
    config = CLIPConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 40,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config=_tiny_vision(),
        projection_dim=projection_dim,
    )
    return _save_clip(out, config, seed)


def save_vit_b32(out: Path, *, seed: int = 0) -> Path:
    """ViT-B/32-shaped CLIP (``CLIPConfig()`` sizes) with random weights."""
    from transformers import CLIPConfig

    config = CLIPConfig(text_config={"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1})
    return _save_clip(out, config, seed)


WORDS = (
    "[PAD] [UNK] [CLS] [SEP] [MASK] a une ein photo foto of de von the le la der die das "
    "cat chat katze dog chien hund red rouge rot"
).split()


#: sentence-transformers' class names for Dense activations, as its config files spell them
ST_ACTIVATIONS = {
    "identity": "torch.nn.modules.linear.Identity",
    "tanh": "torch.nn.modules.activation.Tanh",
    "relu": "torch.nn.modules.activation.ReLU",
}


def save_tiny_multilingual(
    out: Path,
    *,
    out_features: int = 16,
    seed: int = 1,
    pooling: str = "mean",
    activation: str = "identity",
    bias: bool = False,
    normalize: bool = False,
) -> Path:
    """DistilBERT + mean / CLS / max pooling + Dense(hidden -> out_features) (+ Normalize) in
    the folder layout of ``clip-ViT-B-32-multilingual-v1`` (the defaults are its modules)."""
    import torch
    from safetensors.torch import save_file
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizer

    torch.manual_seed(seed)
    hidden = 24
    cfg = DistilBertConfig(
        vocab_size=len(WORDS),
        dim=hidden,
        hidden_dim=48,
        n_layers=2,
        n_heads=2,
        max_position_embeddings=64,
    )
    out.mkdir(parents=True, exist_ok=True)
    DistilBertModel(cfg).eval().save_pretrained(out)
    DistilBertTokenizer(vocab={w: i for i, w in enumerate(WORDS)}).save_pretrained(out)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"},
    ]
    if normalize:
        modules.append(
            {
                "idx": 3,
                "name": "3",
                "path": "3_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
        (out / "3_Normalize").mkdir(exist_ok=True)
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32}))
    (out / "1_Pooling").mkdir(exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "word_embedding_dimension": hidden,
                "pooling_mode_cls_token": pooling == "cls",
                "pooling_mode_mean_tokens": pooling == "mean",
                "pooling_mode_max_tokens": pooling == "max",
            }
        )
    )
    (out / "2_Dense").mkdir(exist_ok=True)
    (out / "2_Dense" / "config.json").write_text(
        json.dumps(
            {
                "in_features": hidden,
                "out_features": out_features,
                "bias": bias,
                "activation_function": ST_ACTIVATIONS[activation],
            }
        )
    )
    dense = {"linear.weight": (torch.randn(out_features, hidden) / hidden**0.5).contiguous()}
    if bias:
        dense["linear.bias"] = torch.randn(out_features) / 10
    save_file(dense, str(out / "2_Dense" / "model.safetensors"))
    return out


def jpeg(seed: int, size: tuple[int, int] = (48, 40), quality: int = 90) -> bytes:
    """A small, deterministic RGB JPEG (gradient + noise)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack(
        [xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), np.full_like(xx, (seed * 37) % 256)],
        axis=-1,
    )
    arr = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_rgba(seed: int, size: tuple[int, int] = (36, 50)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(arr, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


CAPTIONS = [
    ("a photo of a red cat", "en"),
    ("une photo de chat", "multi"),
    ("ein foto von der katze", "multi"),
    ("the dog", "en"),
    ("xq zz", "nolang"),
    ("a red dog photo", "en"),
]


def downloads_frame(n: int, *, shard_size: int = 4, failed_every: int = 5) -> pd.DataFrame:
    """``n`` download rows (schema.DOWNLOADS columns); every ``failed_every``-th failed."""
    from laion_dask.ground import schema
    from laion_dask.ground.shards import make_key

    rows = []
    for i in range(n):
        text, group = CAPTIONS[i % len(CAPTIONS)]
        ok = failed_every == 0 or i % failed_every != failed_every - 1
        rows.append(
            {
                schema.UID: f"u{i}",
                schema.RECORD_OFFSET: i,
                schema.HASH: i,
                schema.URL: f"http://127.0.0.1/{i}.jpg",
                schema.TEXT: text,
                schema.LANGUAGE_GROUP: group,
                schema.LANGUAGE: {"en": "en", "multi": "fr"}.get(group, "und"),
                schema.STATUS: "success" if ok else "failed_to_download",
                schema.KEY: make_key(i // shard_size, i % shard_size),
                schema.SHARD: f"{i // shard_size:05d}.tar",
            }
        )
    df = pd.DataFrame(rows)
    full = schema.DOWNLOADS.copy()
    out = pd.concat([full, df], ignore_index=True)
    return schema.conform(out, *_all_dtypes())


def _all_dtypes():
    from laion_dask.ground import schema

    return (
        schema.PAIRS_DTYPES,
        schema.LANGUAGE_DTYPES,
        schema.RULES_DTYPES,
        schema.DOWNLOAD_DTYPES,
        schema.SHARD_DTYPES,
    )


def write_shards(df: pd.DataFrame, root: Path, images: dict[str, bytes]) -> None:
    """Write the successful rows' ``images`` into webdataset shards under ``root``."""
    from laion_dask.ground import schema
    from laion_dask.ground.shards import ShardSample, write_shard

    root.mkdir(parents=True, exist_ok=True)
    ok = df[df[schema.STATUS].eq("success").fillna(False)]
    for shard, part in ok.groupby(schema.SHARD, sort=True):
        samples = [
            ShardSample(key=k, image=images[k], text=str(t), meta={"key": k})
            for k, t in zip(part[schema.KEY], part[schema.TEXT], strict=True)
            if k in images
        ]
        write_shard(str(root / str(shard)), samples)


SIGLIP_TEXT_LENGTH = 16
SPM_CORPUS = (
    "a photo of a red cat",
    "une photo de chat",
    "ein foto von der katze",
    "the dog",
    "a red dog photo",
    "le chien rouge",
    "der rote hund",
)


def _train_spm(prefix: Path, vocab_size: int) -> Path:
    """Train a tiny unigram sentencepiece model on ``SPM_CORPUS`` (offline, in-process)."""
    import sentencepiece as spm

    corpus = prefix.with_suffix(".txt")
    corpus.write_text("\n".join(SPM_CORPUS * 20) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    corpus.unlink()
    return prefix.with_suffix(".model")


def save_tiny_siglip(out: Path, *, seed: int = 2) -> Path:
    """A tiny ``SiglipModel`` with its own ``SiglipTokenizer`` (a sentencepiece model trained
    here) and ``SiglipImageProcessor`` (square resize, no crop, mean = std = 0.5).

    As in google/siglip-*: no ``projection_dim`` in the config (the embedding width is the
    hidden size), text is padded to the trained length (``SIGLIP_TEXT_LENGTH`` here) and
    pooled from the last position, and the model has a ``logit_bias``.
    """
    import tempfile

    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipTokenizer

    try:
        from transformers import SiglipImageProcessorPil as Proc
    except ImportError:  # older transformers
        from transformers import SiglipImageProcessor as Proc

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_file = _train_spm(Path(tmp) / "spiece", vocab_size=64)
        tok = SiglipTokenizer(vocab_file=str(model_file), model_max_length=SIGLIP_TEXT_LENGTH)
        tok.save_pretrained(out)
    config = SiglipConfig(
        text_config={
            "vocab_size": tok.vocab_size,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": SIGLIP_TEXT_LENGTH,
            "pad_token_id": tok.pad_token_id,
            "bos_token_id": None,  # SigLIP's text has no BOS (the default is CLIP's 49406)
            "eos_token_id": tok.eos_token_id,
        },
        vision_config=_tiny_vision(image_size=24),
    )
    torch.manual_seed(seed)
    SiglipModel(config).eval().save_pretrained(out)
    Proc(size={"height": 24, "width": 24}).save_pretrained(out)
    return out


def save_tiny_altclip(out: Path, *, seed: int = 3, projection_dim: int = 16) -> Path:
    """A tiny ``AltCLIPModel``: XLM-R-style text tower (``XLMRobertaTokenizer``, a unigram
    vocabulary built here, position ids offset by the pad id) + CLIP vision tower and CLIP
    image processor (shortest-edge resize + center crop)."""
    import torch
    from transformers import AltCLIPConfig, AltCLIPModel, XLMRobertaTokenizer

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    pieces = sorted({p for s in SPM_CORPUS for w in s.split() for p in ("▁" + w, w)})
    chars = sorted({c for s in SPM_CORPUS for c in s if c != " "})
    vocab = [(t, 0.0) for t in specials] + [(p, -1.0 - len(p) / 10) for p in pieces]
    vocab += [(c, -10.0) for c in chars if c not in pieces] + [("▁", -5.0), ("<mask>", 0.0)]
    tok = XLMRobertaTokenizer(vocab=vocab, model_max_length=20)
    config = AltCLIPConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 22,  # model_max_length + pad id + 1, as XLM-R's 514
            "project_dim": projection_dim,
            "pad_token_id": 1,
            "bos_token_id": 0,
            "eos_token_id": 2,
        },
        vision_config=_tiny_vision(),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    AltCLIPModel(config).eval().save_pretrained(out)
    tok.save_pretrained(out)
    _image_processor(TINY_IMAGE).save_pretrained(out)
    return out
