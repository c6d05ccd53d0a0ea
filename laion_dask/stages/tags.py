"""Safety tags from image embeddings: ``punsafe`` and ``pwatermark``.

Zero-shot (default): each tag has a set of positive prompts (unsafe / watermark) and negative
prompts (safe / clean). The image embedding is compared with every prompt's text embedding,
the similarities are multiplied by the model's logit scale (100 for CLIP) and soft-maxed over
all prompts of the tag; the tag is the probability mass of the positive prompts. LAION's first
NSFW tags were made this way. Prompt embeddings are computed once per encoder.

Learned head (``clip.tags = "head"``): a linear or MLP probe over image embeddings, as LAION's
punsafe detector is. **File format**: one ``.safetensors`` file holding the tensors
``layers.{i}.weight`` / ``layers.{i}.bias`` of the linear layers in order, and in its header
metadata the key ``laion_dask_tag_head`` with a JSON object::

    {"version": 1, "input_dim": 512, "hidden": [256], "activation": "relu",
     "outputs": ["punsafe"], "embedding": "image", "normalize_input": true}

The head maps an L2-normalised image embedding to one logit per name in ``outputs``
(``punsafe`` and/or ``pwatermark``); probabilities are the sigmoid. A tag the head does not
output falls back to zero-shot. :func:`train_tag_head` writes such a file from a labelled
parquet.
"""

from __future__ import annotations

import functools
import json
import logging
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from laion_dask.ground import schema
from laion_dask.ground.config import ClipConfig

__all__ = [
    "PROMPTS",
    "TagHead",
    "zero_shot_tags",
    "compute_tags",
    "load_tag_head",
    "save_tag_head",
    "train_tag_head",
]

log = logging.getLogger(__name__)

HEAD_METADATA_KEY = "laion_dask_tag_head"

#: tag -> (positive prompts, negative prompts)
PROMPTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    schema.PUNSAFE: (
        (
            "an explicit nude photo",
            "a pornographic image",
            "a sexually explicit photo of naked people",
            "a photo of graphic violence and gore",
            "an image of a bloody corpse",
        ),
        (
            "a safe for work photo",
            "a photo of people wearing clothes",
            "a product photo",
            "a landscape photo",
            "a photo of an animal",
            "a drawing or illustration",
            "a screenshot of text",
        ),
    ),
    schema.PWATERMARK: (
        (
            "a photo with a watermark",
            "a stock photo with a watermark across it",
            "an image with a copyright logo overlay",
            "a picture with text watermark",
        ),
        (
            "a photo without a watermark",
            "a clean photo",
            "an image with no text on it",
        ),
    ),
}

_prompt_cache: weakref.WeakKeyDictionary[Any, dict[str, np.ndarray]] = weakref.WeakKeyDictionary()


def _prompt_embeddings(encoder: Any, tag: str) -> np.ndarray:
    """Unit-norm embeddings of the tag's prompts (positives first), cached per encoder."""
    try:
        cache = _prompt_cache.setdefault(encoder, {})
    except TypeError:  # encoder not weak-referenceable or unhashable: no cache
        cache = {}
    if tag not in cache:
        pos, neg = PROMPTS[tag]
        prompts = [*pos, *neg]
        emb = np.asarray(encoder.encode_texts(prompts, ["en"] * len(prompts)), np.float32)
        cache[tag] = emb
    return cache[tag]


def zero_shot_tags(image_embeddings: np.ndarray, encoder: Any) -> dict[str, np.ndarray]:
    """Zero-shot ``punsafe`` and ``pwatermark`` in [0, 1] for unit-norm image embeddings.

    Parameters
    ----------
    image_embeddings
        (n, dim) L2-normalised image embeddings.
    encoder
        The encoder that made them (its text tower embeds the prompts; ``logit_scale`` is used
        when it has one, else 100 as in CLIP).
    """
    img = np.asarray(image_embeddings, np.float32)
    scale = float(getattr(encoder, "logit_scale", 100.0))
    out: dict[str, np.ndarray] = {}
    for tag, (pos, _neg) in PROMPTS.items():
        logits = scale * (img @ _prompt_embeddings(encoder, tag).T)
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        out[tag] = p[:, : len(pos)].sum(axis=1).astype(np.float32)
    return out


class TagHead:
    """A linear or MLP probe: ``layers`` of (weight, bias) numpy arrays + its config."""

    def __init__(self, layers: Sequence[tuple[np.ndarray, np.ndarray]], config: dict[str, Any]):
        self.layers = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in layers]
        self.config = dict(config)
        self.outputs: list[str] = list(config["outputs"])
        if self.layers[0][0].shape[1] != int(config["input_dim"]):
            raise ValueError("tag head: first layer does not take input_dim features")
        if self.layers[-1][0].shape[0] != len(self.outputs):
            raise ValueError("tag head: last layer size differs from the number of outputs")
        if config.get("activation", "relu") not in ("relu", "gelu", "tanh"):
            raise ValueError(f"tag head: unsupported activation {config.get('activation')!r}")

    def predict(self, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """Sigmoid probability per output name for (n, input_dim) embeddings."""
        x = np.asarray(embeddings, np.float32)
        if x.ndim != 2 or x.shape[1] != int(self.config["input_dim"]):
            raise ValueError(f"tag head expects (n, {self.config['input_dim']}), got {x.shape}")
        if self.config.get("normalize_input", True):
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        act = self.config.get("activation", "relu")
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if i < len(self.layers) - 1:
                x = _activate(x, act)
        p = 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))
        return {name: p[:, j].astype(np.float32) for j, name in enumerate(self.outputs)}


def _activate(x: np.ndarray, act: str) -> np.ndarray:
    if act == "relu":
        return np.maximum(x, 0)
    if act == "tanh":
        return np.tanh(x)
    # exact (erf) GELU, as torch.nn.GELU()
    from math import erf, sqrt

    return x * 0.5 * (1.0 + np.vectorize(erf)(x / sqrt(2.0)))


def save_tag_head(path: str | Path, head: TagHead) -> None:
    """Write ``head`` in the documented safetensors format (module docstring)."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for i, (w, b) in enumerate(head.layers):
        tensors[f"layers.{i}.weight"] = np.ascontiguousarray(w)
        tensors[f"layers.{i}.bias"] = np.ascontiguousarray(b)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={HEAD_METADATA_KEY: json.dumps(head.config)})
    tmp.replace(path)


@functools.lru_cache(maxsize=4)
def load_tag_head(path: str) -> TagHead:
    """Read a tag head file (cached per process); raises ``ValueError`` if it is not one."""
    from safetensors import safe_open

    with safe_open(path, framework="numpy") as f:
        meta = f.metadata() or {}
        if HEAD_METADATA_KEY not in meta:
            raise ValueError(f"{path}: not a laion-dask tag head (no {HEAD_METADATA_KEY} metadata)")
        config = json.loads(meta[HEAD_METADATA_KEY])
        n = 1 + len(config.get("hidden", []))
        layers = [
            (f.get_tensor(f"layers.{i}.weight"), f.get_tensor(f"layers.{i}.bias")) for i in range(n)
        ]
    unknown = set(config["outputs"]) - set(PROMPTS)
    if unknown:
        raise ValueError(f"{path}: unknown outputs {sorted(unknown)} (known: {sorted(PROMPTS)})")
    return TagHead(layers, config)


def compute_tags(
    image_embeddings: np.ndarray, cfg: ClipConfig, *, encoder: Any
) -> dict[str, np.ndarray]:
    """``punsafe`` and ``pwatermark`` per row, by ``cfg.tags`` (zero-shot or a learned head)."""
    n = len(image_embeddings)
    if n == 0:
        return {tag: np.zeros(0, np.float32) for tag in PROMPTS}
    out: dict[str, np.ndarray] = {}
    if cfg.tags == "head":
        assert cfg.tag_head is not None
        out.update(load_tag_head(cfg.tag_head).predict(image_embeddings))
    missing = [t for t in PROMPTS if t not in out]
    if missing:
        zs = zero_shot_tags(image_embeddings, encoder)
        out.update({t: zs[t] for t in missing})
    return out


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
        from laion_dask.stages.embeddings import read_embeddings

        img, _txt, meta = read_embeddings(embeddings_dir)
        pos = pd.Series(np.arange(len(meta)), index=meta[key_col].astype("string"))
        keys = df[key_col].astype("string")
        have = keys.isin(pos.index)
        if not have.all():
            log.warning("%d labelled rows have no embedding and are skipped", int((~have).sum()))
        df = df[have.to_numpy()]
        x = img[pos.loc[df[key_col].astype("string")].to_numpy()].astype(np.float32)
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
    for i, layer in enumerate(layers):
        modules.append(layer)
        if i < len(layers) - 1:
            modules.append(act())
    net = torch.nn.Sequential(*modules)
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
