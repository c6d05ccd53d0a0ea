"""The small CLIP: training loop, save/load through transformers, and the committed demo model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from laion_dask.ground import schema
from laion_dask.ground.shards import ShardSample, write_shard
from laion_dask.products.synthetic.corpus import CorpusSpec, generate_corpus
from laion_dask.products.train import (
    DEMO_MODEL_DIR,
    TrainConfig,
    corpus_auc,
    main,
    roc_auc,
    train_clip,
    train_tag_head,
    train_tokenizer,
    write_synthetic_shards,
    zero_shot_accuracy,
)
from laion_dask.stages import tags
from tests.helpers.demo import FAKE_BASE_URLS

TINY = TrainConfig(
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_layers=1,
    text_width=32,
    text_layers=1,
    heads=2,
    projection_dim=16,
    max_text_tokens=24,
    vocab_size=400,
    batch_size=8,
    steps=3,
    warmup_steps=1,
    threads=1,
    device="cpu",
    log_every=1,
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    out = tmp_path_factory.mktemp("shards")
    paths = write_synthetic_shards(out, 24, seed=5, shard_size=16, size_range=(40, 64))
    # one sample without an image, one with an empty caption, one that is not an image at all
    bad = [
        ShardSample(key="000020000", image=b"", text="a red circle", meta={}, ext="xyz"),
        ShardSample(key="000020001", image=b"\xff\xd8", text="", meta={}),
        ShardSample(key="000020002", image=b"not an image at all", text="a blue square", meta={}),
    ]
    write_shard(str(out / "00002.tar"), bad)
    return [*paths, str(out / "00002.tar")]


def test_train_saves_a_model_transformers_loads(shards: list[str], tmp_path: Path) -> None:
    from PIL import Image
    from transformers import AutoProcessor, AutoTokenizer, CLIPModel

    report = train_clip(shards, tmp_path / "model", TINY)
    assert report.samples == 24
    assert report.skipped == {"no_image": 1, "no_text": 1, "bad_image": 1}
    assert report.steps == 3 and len(report.losses) == 3
    assert all(np.isfinite(report.losses))
    saved = json.loads((tmp_path / "model" / "train_report.json").read_text())
    assert saved["report"]["samples"] == 24 and saved["config"]["steps"] == 3

    model = CLIPModel.from_pretrained(tmp_path / "model")
    processor = AutoProcessor.from_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert model.config.vision_config.image_size == 32
    texts = ["a red circle on a striped blue background", "ein grünes Auto am Strand"]
    assert tokenizer(texts).input_ids == processor.tokenizer(texts).input_ids
    inputs = processor(
        text=texts,
        images=[Image.new("RGB", (300, 200), "red")] * 2,
        return_tensors="pt",
        padding=True,
        truncation=True,
    )
    assert inputs["pixel_values"].shape == (2, 3, 32, 32)
    with torch.inference_mode():
        out = model(**inputs)
    assert out.logits_per_image.shape == (2, 2)
    # a long alt text is cut to the position table, not an index error
    long = processor.tokenizer(["word " * 200], truncation=True, return_tensors="pt")
    assert long.input_ids.shape[1] == 24


def test_tokenizer_covers_every_byte_and_round_trips(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = train_tokenizer(["a red circle", "une étoile verte", "un coche amarillo"] * 20, 400, 32)
    text = "Ünïcödé ✓ 😀 IMG_2031.jpg"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.unk_token_id not in ids[1:-1]  # byte-level: nothing is unknown
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text).input_ids == ids
    # CLIP's decoder puts a space at every word end ("</w>"), as openai's tokenizer does
    decoded = again.decode(ids, skip_special_tokens=True)
    assert decoded.replace(" ", "") == text.lower().replace(" ", "")


def test_tokenizer_training_is_the_same_every_time() -> None:
    """Many merges tie on count here. The BPE trainer breaks ties by symbol ids. Left to
    itself it numbers word-final symbols in hash-map order, which changes between calls:
    two evaluate trainings on the same rows got different vocabularies."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 6))) for _ in range(60)]
    texts = [" ".join(rng.choice(words) for _ in range(5)) for _ in range(50)]
    vocabs = {
        json.dumps(train_tokenizer(texts, 600, 32).get_vocab(), sort_keys=True) for _ in range(8)
    }
    assert len(vocabs) == 1


def test_training_loss_is_symmetric_infonce() -> None:
    """train_clip optimises CLIPModel's own loss: pin that it is the symmetric InfoNCE over
    cosine logits with a learned temperature, as CLIP and OpenCLIP train."""
    from laion_dask.products.train import _build_model
    from laion_dask.stages.clip import projected_features

    torch.manual_seed(0)
    tokenizer = train_tokenizer(["a red circle", "a blue square"], 400, TINY.max_text_tokens)
    model = _build_model(TINY, tokenizer)
    tokens = tokenizer(
        ["a red circle", "a blue square", "a red square", "a circle"],
        padding=True,
        return_tensors="pt",
    )
    pixels = torch.randn(4, 3, TINY.image_size, TINY.image_size)
    kw = dict(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    loss = model(**kw, pixel_values=pixels, return_loss=True).loss
    # by hand: mean of the two cross-entropies over the scaled cosine logits
    img = projected_features(model.get_image_features(pixel_values=pixels))
    txt = projected_features(model.get_text_features(**kw))
    img, txt = torch.nn.functional.normalize(img), torch.nn.functional.normalize(txt)
    logits = model.logit_scale.exp() * img @ txt.T
    labels = torch.arange(4)
    want = (
        torch.nn.functional.cross_entropy(logits, labels)
        + torch.nn.functional.cross_entropy(logits.T, labels)
    ) / 2
    assert torch.isclose(loss, want, atol=1e-5)
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad != 0  # learned


def test_roc_auc_against_pairwise_count() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    pos, neg = scores[labels], scores[~labels]
    want = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
        len(pos) * len(neg)
    )
    assert roc_auc(scores, labels) == pytest.approx(want)
    assert roc_auc([0.1, 0.9], [False, True]) == 1.0
    with pytest.raises(ValueError):
        roc_auc([0.1, 0.2], [True, True])


def test_train_config_validation() -> None:
    with pytest.raises(ValueError, match="multiple of patch_size"):
        TrainConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")
    with pytest.raises(ValueError, match="need at least 2"):
        train_clip([], "unused", TINY)


def test_cli_train_clip(shards: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(
        [
            "train-clip",
            *shards[:1],
            "--out",
            str(tmp_path / "m"),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 2
    assert (tmp_path / "m" / "model.safetensors").is_file()


@pytest.mark.skipif(
    not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="committed demo model missing"
)
def test_demo_model_separates_true_pairs(tmp_path: Path) -> None:
    # a corpus the model never saw (its training set is drawn with another seed)
    generate_corpus(
        tmp_path, CorpusSpec(n_pages=50, n_images=50, seed=77), base_urls=FAKE_BASE_URLS
    )
    result = corpus_auc(DEMO_MODEL_DIR, tmp_path)
    assert result["pairs"] > 150
    assert result["auc"] >= 0.8
    for lang in ("en", "de", "fr", "es"):
        assert result[f"auc_{lang}"] >= 0.75, lang
    assert result["mean_true"] > result["mean_false"] + 0.3


@pytest.mark.skipif(
    not (DEMO_MODEL_DIR / "model.safetensors").is_file(), reason="committed demo model missing"
)
def test_demo_model_zero_shot_well_above_chance() -> None:
    acc = zero_shot_accuracy(DEMO_MODEL_DIR, n=60, seed=5)
    assert acc["shape_top1"] > 0.8 and acc["colour_top1"] > 0.8
    assert acc["caption_top1_en"] > 100 * acc["chance_caption"]
    assert acc["caption_top1_de"] > 100 * acc["chance_caption"]


# --- safety tag heads ----------------------------------------------------------------------------


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_train_tag_head_from_labelled_parquet(tmp_path) -> None:
    rng = np.random.default_rng(0)
    d, n = 16, 300
    direction = _unit(rng, 1, d)[0]
    x = _unit(rng, n, d)
    y = (x @ direction > 0).astype(int)
    df = pd.DataFrame(
        {"key": [f"{i:09d}" for i in range(n)], "nsfw": y, "image_embedding": list(x)}
    )
    df.loc[3, "nsfw"] = None  # unlabelled rows are skipped, not guessed
    df["nsfw"] = df["nsfw"].astype("Int64")
    src = tmp_path / "labels.parquet"
    df.to_parquet(src)
    out = tmp_path / "head.safetensors"
    metrics = train_tag_head(str(src), "nsfw", str(out), epochs=300, lr=5e-2)
    assert metrics["n"] == n - 1
    assert metrics["train_accuracy"] > 0.95
    head = tags.load_tag_head(str(out))
    assert head.outputs == [schema.PUNSAFE] and head.config["input_dim"] == d
    test_x = _unit(rng, 200, d)
    acc = ((head.predict(test_x)[schema.PUNSAFE] >= 0.5) == (test_x @ direction > 0)).mean()
    assert acc > 0.9
    mlp = train_tag_head(
        str(src), "nsfw", str(tmp_path / "mlp.safetensors"), hidden=(8,), epochs=300, lr=2e-2
    )
    assert mlp["train_accuracy"] > 0.9
    assert tags.load_tag_head(str(tmp_path / "mlp.safetensors")).config["hidden"] == [8]


def test_train_tag_head_rejects_bad_labels(tmp_path) -> None:
    df = pd.DataFrame({"image_embedding": [np.ones(4, np.float32)] * 3, "y": [0, 2, 1]})
    df.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="0/1"):
        train_tag_head(str(tmp_path / "bad.parquet"), "y", str(tmp_path / "h.safetensors"))


def test_train_tag_head_from_an_embeddings_folder(tmp_path, caplog) -> None:
    """Labels joined by key to a run's clip-retrieval embeddings equal the same vectors given
    inline; a labelled key without an embedding is skipped and counted in a warning."""
    from laion_dask.stages.embeddings import write_embedding_arrays

    rng = np.random.default_rng(1)
    d, n = 8, 60
    x = _unit(rng, n, d).astype(np.float16)  # what the folder stores
    keys = [f"{i:09d}" for i in range(n)]
    for part, rows in enumerate((slice(0, 25), slice(25, n))):
        meta = pd.DataFrame({"key": keys[rows]})
        write_embedding_arrays(str(tmp_path / "emb"), part, keys[rows], x[rows], x[rows], meta)
    order = rng.permutation(n)  # labels in another order than the embeddings
    y = (x[order, 0] > 0).astype(int)
    labels = pd.DataFrame({"key": [keys[i] for i in order], "nsfw": y})
    labels = pd.concat([labels, pd.DataFrame({"key": ["999999999"], "nsfw": [1]})])
    labels.to_parquet(tmp_path / "by_key.parquet")
    inline = pd.DataFrame({"nsfw": y, "image_embedding": list(x[order].astype(np.float32))})
    inline.to_parquet(tmp_path / "inline.parquet")

    with caplog.at_level("WARNING", logger="laion_dask.products.train"):
        joined = train_tag_head(
            str(tmp_path / "by_key.parquet"),
            "nsfw",
            str(tmp_path / "joined.safetensors"),
            embeddings_dir=str(tmp_path / "emb"),
        )
    assert "1 labelled rows have no embedding" in caplog.text
    given = train_tag_head(
        str(tmp_path / "inline.parquet"), "nsfw", str(tmp_path / "given.safetensors")
    )
    assert joined == given and joined["n"] == n
    a = tags.load_tag_head(str(tmp_path / "joined.safetensors"))
    b = tags.load_tag_head(str(tmp_path / "given.safetensors"))
    np.testing.assert_array_equal(a.layers[0][0], b.layers[0][0])
