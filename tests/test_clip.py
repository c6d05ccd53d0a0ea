"""CLIP scoring on a tiny real transformers CLIPModel saved to disk and loaded back."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import PIL.Image
import pytest
import torch

from laion_dask.ground import schema
from laion_dask.ground.config import ClipConfig
from laion_dask.stages import clip
from laion_dask.stages.clip import (
    ModelUnavailableError,
    add_clip_scores,
    check_model_available,
    load_encoder,
    score_partition,
)
from tests.helpers.clip import (
    CAPTIONS,
    downloads_frame,
    jpeg,
    png_rgba,
    save_tiny_altclip,
    save_tiny_clip,
    save_tiny_multilingual,
    save_tiny_siglip,
    write_shards,
)
from tests.helpers.cluster import LOOPBACK_CLUSTER


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {
        "clip": str(save_tiny_clip(root / "clip")),
        "multi": str(save_tiny_multilingual(root / "mclip")),
    }


@pytest.fixture(scope="module")
def other_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny SigLIP (needs sentencepiece + protobuf for its tokenizer) and AltCLIP."""
    root = tmp_path_factory.mktemp("other-models")
    return {
        "siglip": str(save_tiny_siglip(root / "siglip")),
        "altclip": str(save_tiny_altclip(root / "altclip")),
    }


@pytest.fixture(scope="module")
def cfg(models: dict[str, str]) -> ClipConfig:
    return ClipConfig(model=models["clip"], multilingual_text_model=models["multi"], batch_size=4)


@pytest.fixture(scope="module")
def data() -> tuple[pd.DataFrame, dict[str, bytes]]:
    df = downloads_frame(14)
    images = {k: jpeg(i, size=(48 + i, 40)) for i, k in enumerate(df[schema.KEY])}
    images[df[schema.KEY].iloc[6]] = png_rgba(6)  # a transparent PNG among the JPEGs
    return df, images


def _direct(models: dict[str, str], images: list[bytes], texts: list[str]) -> np.ndarray:
    """Cosine similarity computed straight with transformers' processor, tokenizer and model."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(models["clip"]).eval()
    proc = AutoImageProcessor.from_pretrained(models["clip"])
    tok = AutoTokenizer.from_pretrained(models["clip"])
    pil = [PIL.Image.open(io.BytesIO(b)) for b in images]
    with torch.no_grad():
        pix = proc(images=pil, return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=pix)
        img = getattr(img, "pooler_output", img)
        t = tok(texts, padding=True, return_tensors="pt")
        txt = model.get_text_features(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
        txt = getattr(txt, "pooler_output", txt)
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1).numpy()


def _direct_multilingual(
    models: dict[str, str], texts: list[str], *, key: str = "multi", pooling: str = "mean"
) -> np.ndarray:
    """The sentence-transformers recipe by hand: DistilBERT, mean / CLS / max pooling, Dense
    with its bias and activation as its config names them, L2."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    root = Path(models[key])
    model = AutoModel.from_pretrained(root).eval()
    tok = AutoTokenizer.from_pretrained(root)
    dense = load_file(str(root / "2_Dense" / "model.safetensors"))
    act = json.loads((root / "2_Dense" / "config.json").read_text())["activation_function"]
    with torch.no_grad():
        t = tok(texts, padding=True, return_tensors="pt")
        h = model(**t).last_hidden_state
        m = t["attention_mask"].unsqueeze(-1).float()
        x = {
            "mean": lambda: (h * m).sum(1) / m.sum(1),
            "cls": lambda: h[:, 0],
            "max": lambda: h.masked_fill(m == 0, -1e9).max(1).values,
        }[pooling]()
        x = x @ dense["linear.weight"].T + dense.get("linear.bias", 0.0)
        x = {"Tanh": torch.tanh, "ReLU": torch.relu}.get(act.rsplit(".", 1)[-1], lambda v: v)(x)
    return (x / x.norm(dim=-1, keepdim=True)).numpy()


def test_similarity_equals_direct_computation(models, cfg, data) -> None:
    df, images = data
    en_cfg = ClipConfig(model=models["clip"], batch_size=4)  # CLIP text tower for every row
    out = add_clip_scores(df, en_cfg, images=images)
    ok = df[schema.STATUS].eq("success").to_numpy()
    keys = df.loc[ok, schema.KEY].tolist()
    expected = _direct(models, [images[k] for k in keys], df.loc[ok, schema.TEXT].tolist())
    np.testing.assert_allclose(out.loc[ok, schema.SIMILARITY].to_numpy(), expected, atol=2e-5)
    assert out[schema.SIMILARITY].dtype == np.float32
    assert out.loc[~ok, schema.SIMILARITY].isna().all()
    assert out.loc[~ok, schema.SCORE_STATUS].isna().all()
    assert (out.loc[ok, schema.SCORE_STATUS] == "success").all()


LONG_CAPTION = " ".join(["a red cat photo de chat"] * 12)  # past every tiny text length


def _direct_processor(path: str, images: list[bytes], texts: list[str], padding) -> np.ndarray:
    """Cosine similarity straight from the checkpoint's own ``AutoProcessor`` and model."""
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(path).eval()
    proc = AutoProcessor.from_pretrained(path)
    pil = [PIL.Image.open(io.BytesIO(b)) for b in images]
    with torch.no_grad():
        pix = proc(images=pil, return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=pix)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        t = proc(text=texts, padding=padding, truncation=True, return_tensors="pt")
        inputs = {k: t[k] for k in ("input_ids", "attention_mask") if k in t}
        txt = model.get_text_features(**inputs)
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    return (img * txt).sum(-1).numpy()


@pytest.mark.parametrize(
    ("arch", "model_cls", "padding", "dim"),
    [
        # SigLIP: square resize without crop, mean = std = 0.5, text padded to its trained
        # length and pooled at the last position, no projection_dim in the config
        ("siglip", "SiglipModel", "max_length", 32),
        # AltCLIP: XLM-R text tower (position ids offset by the pad id), CLIP vision tower
        ("altclip", "AltCLIPModel", True, 16),
    ],
)
def test_other_dual_encoders_equal_direct_computation(
    other_models, data, arch, model_cls, padding, dim
) -> None:
    df, images = data
    df = df.copy()
    df.loc[2, schema.TEXT] = LONG_CAPTION  # truncated to the model's length, not an error
    acfg = ClipConfig(model=other_models[arch], batch_size=4, jpeg_draft=False)
    res = score_partition(df, acfg, images=images)
    enc = clip.encoder_from_config(acfg)
    assert type(enc.model).__name__ == model_cls and enc.dim == dim
    ok = df[schema.STATUS].eq("success").to_numpy()
    assert res.keys == df.loc[ok, schema.KEY].tolist()
    expected = _direct_processor(
        other_models[arch], [images[k] for k in res.keys], df.loc[ok, schema.TEXT].tolist(), padding
    )
    np.testing.assert_allclose(res.frame.loc[ok, schema.SIMILARITY].to_numpy(), expected, atol=2e-5)
    assert (res.frame.loc[ok, schema.SCORE_STATUS] == "success").all()
    assert res.image_embeddings.shape == (ok.sum(), dim)
    assert res.frame.loc[ok, schema.PUNSAFE].between(0, 1).all()


def test_features_accept_tensors_and_model_outputs(models) -> None:
    """get_*_features returns a tensor in transformers 4 and an output object in 5."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    x = torch.randn(3, 16)
    assert clip.projected_features(x) is x
    assert clip.projected_features(BaseModelOutputWithPooling(pooler_output=x)) is x
    with pytest.raises(TypeError, match="BaseModelOutputWithPooling"):
        clip.projected_features(BaseModelOutputWithPooling(last_hidden_state=x))
    # what the installed transformers returns, through the encoder
    enc = load_encoder(models["clip"], device="cpu")
    pix = torch.zeros(1, 3, 32, 32)
    with torch.no_grad():
        raw = enc.model.get_image_features(pixel_values=pix)
    np.testing.assert_allclose(
        clip.projected_features(raw).numpy(), getattr(raw, "pooler_output", raw)
    )
    assert clip.projected_features(raw).shape == (1, enc.dim)


def test_siglip_text_is_padded_to_its_trained_length(other_models) -> None:
    """Pad-to-longest would change SigLIP's last-position pooling: the padding must be fixed."""
    enc = load_encoder(other_models["siglip"], device="cpu")
    assert enc.text_padding == "max_length" and enc.text_max_length == 16
    alone = enc.encode_texts(["the dog"], ["en"])
    with_long = enc.encode_texts(["the dog", LONG_CAPTION], ["en", "en"])
    np.testing.assert_allclose(alone[0], with_long[0], atol=1e-5)


def test_multilingual_rows_use_the_multilingual_tower(models, cfg, data) -> None:
    df, images = data
    res = score_partition(df, cfg, images=images)
    groups = res.frame.set_index(schema.KEY).loc[res.keys, schema.LANGUAGE_GROUP].to_numpy()
    texts = res.frame.set_index(schema.KEY).loc[res.keys, schema.TEXT].tolist()
    multi = groups != "en"
    assert multi.any() and (~multi).any()
    expected = _direct_multilingual(models, [t for t, m in zip(texts, multi, strict=True) if m])
    np.testing.assert_allclose(res.text_embeddings[multi].astype(np.float32), expected, atol=2e-3)
    # the English rows match the CLIP-tower-only run
    en = score_partition(df, ClipConfig(model=models["clip"]), images=images)
    np.testing.assert_allclose(
        res.text_embeddings[~multi].astype(np.float32),
        en.text_embeddings[~multi].astype(np.float32),
        atol=1e-3,
    )
    assert res.frame.loc[res.frame.language_group.eq("en"), schema.SIMILARITY].notna().any()


@pytest.mark.parametrize(("pooling", "activation"), [("cls", "tanh"), ("max", "relu")])
def test_any_sentence_transformers_tower_loads(models, tmp_path, pooling, activation) -> None:
    """Towers with other modules than LAION's (a biased Dense, Normalize; max pooling and ReLU,
    which the hand-written reader this replaced refused) score as the recipe by hand says."""
    tower = save_tiny_multilingual(
        tmp_path / pooling, pooling=pooling, activation=activation, bias=True, normalize=True
    )
    enc = load_encoder(models["clip"], multilingual_text_model=str(tower), device="cpu")
    texts = [t for t, _ in CAPTIONS]
    got = enc.encode_texts(texts, ["multi"] * len(texts))
    expected = _direct_multilingual({"t": str(tower)}, texts, key="t", pooling=pooling)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def _errors_without(package: str, *configs: dict[str, str]) -> list[str]:
    """In a fresh interpreter where ``package`` cannot be imported, the
    :class:`ModelUnavailableError` lines of the pre-flight check and of the loader, for each
    ``ClipConfig(**config)`` (device cpu)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        f"""
        import sys
        sys.modules[{package!r}] = None  # as if not installed
        from laion_dask.stages import clip
        from laion_dask.ground.config import ClipConfig
        for kwargs in {list(configs)!r}:
            cfg = ClipConfig(**kwargs, device="cpu")
            for call in (clip.check_model_available, clip.encoder_from_config):
                try:
                    call(cfg)
                except clip.ModelUnavailableError as exc:
                    print("ERROR:", exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=240, check=True
    ).stdout
    return [line for line in out.splitlines() if line.startswith("ERROR:")]


def test_a_missing_sentence_transformers_package_is_one_clear_error(models) -> None:
    """Without the package the multilingual recipe fails before any work (pre-flight check)
    and at load, naming the model and the package; the CLIP-only config still works."""
    multi = {"model": models["clip"], "multilingual_text_model": models["multi"]}
    errors = _errors_without("sentence_transformers", multi, {"model": models["clip"]})
    assert len(errors) == 2, errors
    for line in errors:
        assert models["multi"] in line and "pip install sentence-transformers" in line


def test_torch_threads_come_from_the_config_then_the_caller(models, data) -> None:
    """The stage never asks Dask: ``cfg.torch_threads`` wins, then the caller's ``threads``
    (the orchestration passes its worker's), then the CPUs this process may use."""
    import os

    df, images = data
    cfg = ClipConfig(model=models["clip"], device="cpu")
    before = torch.get_num_threads()
    try:
        score_partition(df, cfg, images=images, threads=3)
        assert torch.get_num_threads() == 3
        score_partition(df, dataclasses.replace(cfg, torch_threads=2), images=images, threads=3)
        assert torch.get_num_threads() == 2
        score_partition(df, cfg, images=images)
        assert torch.get_num_threads() == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)


def test_embeddings_unit_norm_and_aligned_with_keys(cfg, data) -> None:
    df, images = data
    res = score_partition(df, cfg, images=images)
    ok_keys = df.loc[df[schema.STATUS].eq("success"), schema.KEY].tolist()
    assert res.keys == ok_keys
    assert res.image_embeddings.dtype == np.float16 and res.text_embeddings.dtype == np.float16
    assert res.image_embeddings.shape == (len(ok_keys), 16)
    for emb in (res.image_embeddings, res.text_embeddings):
        np.testing.assert_allclose(np.linalg.norm(emb.astype(np.float32), axis=1), 1.0, atol=2e-3)
    # row i belongs to key i: re-embed two single images and compare
    enc = clip.encoder_from_config(cfg)
    for i in (0, len(ok_keys) - 1):
        one = enc.encode_images([PIL.Image.open(io.BytesIO(images[ok_keys[i]]))])
        np.testing.assert_allclose(res.image_embeddings[i].astype(np.float32), one[0], atol=2e-3)
    # similarity is the row-wise dot product of the (float32) embeddings
    sims = res.frame.set_index(schema.KEY).loc[res.keys, schema.SIMILARITY].to_numpy()
    dots = (res.image_embeddings.astype(np.float32) * res.text_embeddings).sum(1)
    np.testing.assert_allclose(sims, dots, atol=3e-3)


def test_chunked_equals_eager(cfg, data) -> None:
    df, images = data
    a = score_partition(df, cfg.__class__(**{**_kw(cfg), "batch_size": 3}), images=images)
    b = score_partition(df, cfg.__class__(**{**_kw(cfg), "batch_size": 64}), images=images)
    pd.testing.assert_frame_equal(a.frame, b.frame, atol=1e-5, check_exact=False)
    np.testing.assert_allclose(a.image_embeddings, b.image_embeddings, atol=1e-3)
    assert a.keys == b.keys


def test_an_injected_encoder_without_pixels_gets_pil_images(cfg, data) -> None:
    """The Encoder protocol: an injected encoder with only encode_images / encode_texts scores
    the same rows as the built-in one (the PIL path; no JPEG draft, so the same pixels)."""
    df, images = data

    class Plain:  # what a user's encoder offers: no preprocessor, no encode_pixels
        def __init__(self, inner: clip.TransformersEncoder) -> None:
            self.inner, self.dim, self.logit_scale = inner, inner.dim, inner.logit_scale
            self.batches: list[int] = []

        def encode_images(self, pil: list[PIL.Image.Image]) -> np.ndarray:
            assert all(isinstance(im, PIL.Image.Image) for im in pil)
            self.batches.append(len(pil))
            return self.inner.encode_images(pil)

        def encode_texts(self, texts: list[str], groups: list[str]) -> np.ndarray:
            return self.inner.encode_texts(texts, groups)

    exact = dataclasses.replace(cfg, jpeg_draft=False)
    plain = Plain(clip.encoder_from_config(exact))
    got = score_partition(df, exact, encoder=plain, images=images)
    want = score_partition(df, exact, images=images)
    assert isinstance(plain, clip.Encoder) and sum(plain.batches) == len(want.keys)
    pd.testing.assert_frame_equal(got.frame, want.frame, atol=1e-6, check_exact=False)
    np.testing.assert_array_equal(got.image_embeddings, want.image_embeddings)


def _kw(cfg: ClipConfig) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def test_input_not_mutated_and_rows_kept(cfg, data) -> None:
    df, images = data
    before = df.copy()
    out = add_clip_scores(df, cfg, images=images)
    pd.testing.assert_frame_equal(df, before)
    assert len(out) == len(df)
    assert list(out.columns) == [*df.columns, *schema.SCORE_DTYPES]
    assert dict(out.dtypes[list(schema.SCORE_DTYPES)].astype(str)) == schema.SCORE_DTYPES


def test_no_successful_rows(cfg, data) -> None:
    df, images = data
    failed = df.assign(status=pd.array(["failed_to_download"] * len(df), dtype="string"))
    res = score_partition(failed, cfg, images=images)
    assert res.keys == [] and res.image_embeddings.shape[0] == 0
    assert res.frame[schema.SCORE_STATUS].isna().all()
    empty = score_partition(df.iloc[:0], cfg, images=images)
    assert len(empty.frame) == 0
    assert dict(empty.frame.dtypes[list(schema.SCORE_DTYPES)].astype(str)) == schema.SCORE_DTYPES


def test_broken_images_in_a_shard_are_counted_failures(tmp_path, cfg, data) -> None:
    df, images = data
    bad = dict(images)
    keys = df.loc[df[schema.STATUS].eq("success"), schema.KEY].tolist()
    bad[keys[0]] = b"\xff\xd8\xff\xe0 this is not a jpeg"
    bad[keys[1]] = images[keys[1]][: len(images[keys[1]]) // 3]  # truncated
    del bad[keys[2]]  # never written into its shard
    write_shards(df, tmp_path / "images", bad)
    res = score_partition(df, cfg, image_root=str(tmp_path / "images"))
    st = res.frame.set_index(schema.KEY)[schema.SCORE_STATUS]
    assert st[keys[0]] == "failed_to_decode"
    assert st[keys[1]] == "failed_to_decode"
    assert st[keys[2]] == "image_missing"
    assert st.value_counts().to_dict() == {
        "success": len(keys) - 3,
        "failed_to_decode": 2,
        "image_missing": 1,
    }
    assert res.keys == keys[3:]
    assert res.frame.set_index(schema.KEY).loc[keys[:3], schema.SIMILARITY].isna().all()
    # the shard path and the in-memory path agree on the rows both scored
    mem = score_partition(df, cfg, images=images).frame.set_index(schema.KEY)
    np.testing.assert_allclose(
        res.frame.set_index(schema.KEY).loc[keys[3:], schema.SIMILARITY],
        mem.loc[keys[3:], schema.SIMILARITY],
        atol=1e-6,
    )


def test_dask_equals_pandas_and_model_loads_once(client, cfg, data) -> None:
    df, images = data
    load_encoder.cache_clear()
    expected = add_clip_scores(df, cfg, images=images)
    meta = schema.empty(dict(df.dtypes.astype(str)), schema.SCORE_DTYPES)
    ddf = dd.from_pandas(df, npartitions=3)
    got = ddf.map_partitions(add_clip_scores, cfg, images=images, meta=meta).compute()
    pd.testing.assert_frame_equal(got, expected, atol=1e-6, check_exact=False)
    # the client fixture's workers share this process: one load for all partitions
    infos = client.run(load_encoder.cache_info)
    assert {i.misses for i in infos.values()} == {1}
    assert load_encoder.cache_info().hits >= 3


def test_worker_process_loads_model_once(tmp_path, cfg, data) -> None:
    """One load per worker process; and loader_processes on a default (daemonic) worker
    process falls back to the loader threads, with one warning, instead of failing."""
    from distributed import Client, LocalCluster

    df, images = data
    pcfg = _with_loader_processes(cfg, 2)
    write_shards(df, tmp_path / "images", images)
    meta = schema.empty(dict(df.dtypes.astype(str)), schema.SCORE_DTYPES)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, **{**LOOPBACK_CLUSTER, "processes": True}
        ) as cluster,
        Client(cluster) as c,
    ):
        ddf = dd.from_pandas(df, npartitions=4)
        got = ddf.map_partitions(
            add_clip_scores, pcfg, image_root=str(tmp_path / "images"), meta=meta
        ).compute()
        (info,) = c.run(load_encoder.cache_info).values()
        (pools,) = c.run(lambda: (sorted(clip._process_pools), clip._daemon_warned)).values()
    assert info.misses == 1 and info.hits == 3
    assert pools == ([], True)
    expected = add_clip_scores(df, cfg, images=images)
    pd.testing.assert_frame_equal(got, expected, atol=1e-5, check_exact=False)


def _with_loader_processes(cfg: ClipConfig, n: int) -> ClipConfig:
    return dataclasses.replace(cfg, loader_processes=n)


def test_decoder_processes_equal_threads(cfg, data) -> None:
    df, images = data
    bad = dict(images)
    keys = df.loc[df[schema.STATUS].eq("success"), schema.KEY].tolist()
    bad[keys[0]] = b"\xff\xd8\xff\xe0 this is not a jpeg"
    bad[keys[5]] = jpeg(99, size=(400, 300))  # drafted at a reduced DCT scale in both paths
    threads = score_partition(df, cfg, images=bad)
    procs_cfg = _with_loader_processes(dataclasses.replace(cfg, batch_size=5), 2)
    try:
        procs = score_partition(df, procs_cfg, images=bad)
        assert sorted(clip._process_pools) == [2]  # the decoding ran in the process pool
        pool = clip._process_pools[2]
        again = score_partition(df, procs_cfg, images=bad)
        assert clip._process_pools[2] is pool  # reused by the next partition
    finally:
        clip.shutdown_decoder_processes()
    assert clip._process_pools == {}
    assert procs.keys == threads.keys == keys[1:]
    assert procs.frame.set_index(schema.KEY).loc[keys[0], schema.SCORE_STATUS] == (
        "failed_to_decode"
    )
    pd.testing.assert_frame_equal(procs.frame, threads.frame, atol=1e-6, check_exact=False)
    pd.testing.assert_frame_equal(again.frame, procs.frame)
    np.testing.assert_array_equal(procs.image_embeddings, again.image_embeddings)


def test_a_dead_decoder_process_falls_back_to_threads(cfg, data, caplog) -> None:
    import os
    import signal
    import time

    df, images = data
    threads = score_partition(df, cfg, images=images)
    pcfg = _with_loader_processes(cfg, 2)
    pool = clip._process_pool(2)
    try:
        assert pool is not None
        pool.submit(time.sleep, 0).result()  # start a decoder process
        (pid, *_) = list(pool._processes)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not pool._broken and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pool._broken
        with caplog.at_level("WARNING", logger="laion_dask.stages.clip"):
            got = score_partition(df, pcfg, images=images)
        assert 2 not in clip._process_pools  # dropped: the next task starts a fresh pool
        assert "decoding in threads" in caplog.text
    finally:
        clip.shutdown_decoder_processes()
    pd.testing.assert_frame_equal(got.frame, threads.frame, atol=1e-6, check_exact=False)


def test_decoder_processes_on_a_dask_worker_process(tmp_path, cfg, data) -> None:
    """A worker process started with distributed.worker.daemon = False keeps its pool."""
    import dask
    from distributed import Client, LocalCluster

    df, images = data
    write_shards(df, tmp_path / "images", images)
    meta = schema.empty(dict(df.dtypes.astype(str)), schema.SCORE_DTYPES)
    pcfg = _with_loader_processes(cfg, 2)
    with (
        dask.config.set({"distributed.worker.daemon": False}),
        LocalCluster(
            n_workers=1, threads_per_worker=2, **{**LOOPBACK_CLUSTER, "processes": True}
        ) as cluster,
        Client(cluster) as c,
    ):
        got = (
            dd.from_pandas(df, npartitions=3)
            .map_partitions(add_clip_scores, pcfg, image_root=str(tmp_path / "images"), meta=meta)
            .compute()
        )
        (pools,) = c.run(lambda: sorted(clip._process_pools)).values()
        c.run(clip.shutdown_decoder_processes)
    assert pools == [2]
    expected = add_clip_scores(df, cfg, images=images)
    pd.testing.assert_frame_equal(got, expected, atol=1e-5, check_exact=False)


def test_device_selection_follows_cuda_visibility(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert clip.resolve_device("auto") == "cpu"
    assert clip._resolve_dtype("auto", "cpu") == "float32"
    with pytest.raises(ModelUnavailableError, match="no CUDA"):
        clip.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert clip.resolve_device("auto") == "cuda"
    assert clip._resolve_dtype("auto", "cuda") == "float16"
    assert clip._resolve_dtype("bfloat16", "cuda") == "bfloat16"


def test_encoder_records_resolved_settings(models) -> None:
    enc = load_encoder(models["clip"], device="cpu", dtype="auto")
    assert enc.info["device"] == "cpu" and enc.info["dtype"] == "float32"
    assert enc.info["model"] == models["clip"]
    assert clip.encoder_info(enc)["dtype"] == "float32"
    assert enc.dim == 16 and enc.logit_scale == pytest.approx(np.exp(2.6592), rel=1e-3)
    assert isinstance(enc, clip.Encoder)
    resolved = clip.resolved_config(ClipConfig(model=models["clip"], device="cpu"), enc)
    assert (resolved.device, resolved.dtype, resolved.model) == ("cpu", "float32", models["clip"])


def test_check_model_available(models, tmp_path, monkeypatch) -> None:
    check_model_available(ClipConfig(model=models["clip"], multilingual_text_model=models["multi"]))
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelUnavailableError, match="no-such-model") as err:
        check_model_available(ClipConfig(model=missing))
    assert "HF_HUB_OFFLINE" in str(err.value) and "local directory" in str(err.value)
    with pytest.raises(ModelUnavailableError, match="mclip-missing"):
        check_model_available(
            ClipConfig(
                model=models["clip"], multilingual_text_model=str(tmp_path / "mclip-missing")
            )
        )
    # a hub name that is not in the cache, with the hub switched off: one clear error, no network
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    with pytest.raises(ModelUnavailableError, match="laion-dask-test/not-a-model"):
        check_model_available(ClipConfig(model="laion-dask-test/not-a-model"))


def test_missing_tokenizer_package_is_one_clear_error(other_models) -> None:
    """A SigLIP checkpoint where sentencepiece cannot be imported: ModelUnavailableError from
    the pre-flight check and from the loader, naming the model and the package to install."""
    errors = _errors_without("sentencepiece", {"model": other_models["siglip"]})
    assert len(errors) == 2, errors
    for line in errors:
        assert other_models["siglip"] in line and "pip install sentencepiece protobuf" in line


def test_load_encoder_rejects_a_missing_path(tmp_path) -> None:
    with pytest.raises(ModelUnavailableError, match="local directory"):
        load_encoder(str(tmp_path / "nothing-here"))


def test_jpeg_draft_is_close_to_full_decode(cfg) -> None:
    enc = clip.encoder_from_config(cfg)
    big = jpeg(3, size=(400, 300))
    full = enc.preprocessor.decode(big, draft=False)
    fast = enc.preprocessor.decode(big, draft=True)
    assert full.shape == fast.shape == (32, 32, 3)
    a, b = enc.encode_pixels(full[None]), enc.encode_pixels(fast[None])
    assert float((a * b).sum()) > 0.99


@pytest.mark.gpu
def test_gpu_fp16_matches_cpu(models, cfg, data) -> None:
    df, images = data
    cpu = score_partition(df, cfg.__class__(**{**_kw(cfg), "device": "cpu"}), images=images)
    gpu_cfg = cfg.__class__(**{**_kw(cfg), "device": "auto"})
    enc = clip.encoder_from_config(gpu_cfg)
    assert enc.device == "cuda" and enc.dtype == "float16"
    gpu = score_partition(df, gpu_cfg, images=images)
    assert gpu.keys == cpu.keys
    np.testing.assert_allclose(
        gpu.frame[schema.SIMILARITY], cpu.frame[schema.SIMILARITY], atol=2e-2
    )


@pytest.mark.gpu
def test_gpu_vit_b32_scores(tmp_path) -> None:
    from tests.helpers.clip import save_vit_b32

    path = save_vit_b32(tmp_path / "vitb32")
    df = downloads_frame(40, failed_every=0)
    images = {k: jpeg(i, size=(320, 256)) for i, k in enumerate(df[schema.KEY])}
    res = score_partition(df, ClipConfig(model=str(path), batch_size=16), images=images)
    assert (res.frame[schema.SCORE_STATUS] == "success").all()
    assert res.image_embeddings.shape == (40, 512)
    assert res.frame[schema.SIMILARITY].between(-1, 1).all()
