"""Safety tags: zero-shot from prompt sets, and learned heads (file round trip, scoring).

Training a head is a product: tests/test_train.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from laion_dask.ground import schema
from laion_dask.ground.config import ClipConfig
from laion_dask.stages import tags
from laion_dask.stages.clip import load_encoder, score_partition
from tests.helpers.clip import downloads_frame, jpeg, save_tiny_clip


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(save_tiny_clip(tmp_path_factory.mktemp("tags") / "clip"))


class CountingEncoder:
    """Wraps a real encoder and counts text-encoding calls."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0
        self.dim, self.logit_scale = inner.dim, inner.logit_scale

    def encode_images(self, images):
        return self.inner.encode_images(images)

    def encode_texts(self, texts, groups):
        self.calls += 1
        return self.inner.encode_texts(texts, groups)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_zero_shot_tags_in_unit_interval_and_prompts_cached(model_dir) -> None:
    enc = CountingEncoder(load_encoder(model_dir))
    emb = _unit(np.random.default_rng(0), 20, enc.dim)
    out = tags.zero_shot_tags(emb, enc)
    assert set(out) == {schema.PUNSAFE, schema.PWATERMARK}
    for v in out.values():
        assert v.dtype == np.float32 and v.shape == (20,)
        assert ((v >= 0) & (v <= 1)).all()
    assert enc.calls == 2
    again = tags.zero_shot_tags(emb, enc)
    assert enc.calls == 2  # prompt embeddings come from the per-encoder cache
    np.testing.assert_array_equal(again[schema.PUNSAFE], out[schema.PUNSAFE])


def test_zero_shot_is_softmax_over_prompts(model_dir) -> None:
    enc = load_encoder(model_dir)
    pos, neg = tags.PROMPTS[schema.PUNSAFE]
    prompts = enc.encode_texts([*pos, *neg], ["en"] * (len(pos) + len(neg)))
    # an image embedding equal to the first unsafe prompt scores high; the first safe one low
    out = tags.zero_shot_tags(prompts[[0, len(pos)]], enc)[schema.PUNSAFE]
    logits = enc.logit_scale * prompts[[0, len(pos)]] @ prompts.T
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(out, p[:, : len(pos)].sum(1), rtol=1e-5)
    assert out[0] > out[1]


def _head(d: int, hidden: list[int], outputs: list[str], seed: int = 0) -> tags.TagHead:
    rng = np.random.default_rng(seed)
    sizes = [d, *hidden, len(outputs)]
    layers = [
        (rng.normal(size=(b, a)).astype(np.float32), rng.normal(size=b).astype(np.float32))
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    ]
    cfg = {
        "version": 1,
        "input_dim": d,
        "hidden": hidden,
        "activation": "relu",
        "outputs": outputs,
        "embedding": "image",
        "normalize_input": True,
    }
    return tags.TagHead(layers, cfg)


def test_head_file_round_trip(tmp_path) -> None:
    head = _head(16, [8], [schema.PUNSAFE, schema.PWATERMARK])
    path = tmp_path / "head.safetensors"
    tags.save_tag_head(path, head)
    loaded = tags.load_tag_head(str(path))
    assert loaded.config == head.config
    x = _unit(np.random.default_rng(1), 5, 16)
    got = loaded.predict(x)
    (w1, b1), (w2, b2) = head.layers
    logits = np.maximum(x @ w1.T + b1, 0) @ w2.T + b2
    np.testing.assert_allclose(got[schema.PUNSAFE], 1 / (1 + np.exp(-logits[:, 0])), rtol=1e-5)
    np.testing.assert_allclose(got[schema.PWATERMARK], 1 / (1 + np.exp(-logits[:, 1])), rtol=1e-5)
    assert not list(tmp_path.glob("*.tmp"))


def test_not_a_head_file_is_a_clear_error(tmp_path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": np.zeros((2, 2), np.float32)}, str(path))
    with pytest.raises(ValueError, match="not a laion-dask tag head"):
        tags.load_tag_head(str(path))


def test_scoring_with_a_head_uses_it_and_falls_back_to_zero_shot(tmp_path, model_dir) -> None:
    path = tmp_path / "punsafe.safetensors"
    tags.save_tag_head(path, _head(16, [], [schema.PUNSAFE]))
    df = downloads_frame(6, failed_every=0)
    images = {k: jpeg(i) for i, k in enumerate(df[schema.KEY])}
    cfg = ClipConfig(model=model_dir, tags="head", tag_head=str(path))
    res = score_partition(df, cfg, images=images)
    emb = res.image_embeddings.astype(np.float32)
    expected = tags.load_tag_head(str(path)).predict(emb)[schema.PUNSAFE]
    np.testing.assert_allclose(res.frame[schema.PUNSAFE], expected, atol=2e-3)
    zs = score_partition(df, ClipConfig(model=model_dir), images=images).frame
    np.testing.assert_allclose(res.frame[schema.PWATERMARK], zs[schema.PWATERMARK], atol=1e-6)
    assert not np.allclose(res.frame[schema.PUNSAFE], zs[schema.PUNSAFE], atol=1e-3)
