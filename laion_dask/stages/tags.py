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
output falls back to zero-shot. :func:`laion_dask.products.train.train_tag_head` writes such a
file from a labelled parquet.
"""

from __future__ import annotations

import functools
import json
import logging
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file
from scipy.special import erf, softmax

from laion_dask.ground import schema
from laion_dask.ground.config import ClipConfig

__all__ = [
    "PROMPTS",
    "TagHead",
    "zero_shot_tags",
    "compute_tags",
    "load_tag_head",
    "save_tag_head",
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
        p = softmax(scale * (img @ _prompt_embeddings(encoder, tag).T), axis=1)
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
        if config.get("activation", "relu") not in _ACTIVATIONS:
            raise ValueError(f"tag head: unsupported activation {config.get('activation')!r}")

    def predict(self, embeddings: np.ndarray) -> dict[str, np.ndarray]:
        """Sigmoid probability per output name for (n, input_dim) embeddings."""
        x = np.asarray(embeddings, np.float32)
        if x.ndim != 2 or x.shape[1] != int(self.config["input_dim"]):
            raise ValueError(f"tag head expects (n, {self.config['input_dim']}), got {x.shape}")
        if self.config.get("normalize_input", True):
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        act = _ACTIVATIONS[self.config.get("activation", "relu")]
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if i < len(self.layers) - 1:
                x = act(x)
        p = 1.0 / (1.0 + np.exp(-np.clip(x, -60, 60)))
        return {name: p[:, j].astype(np.float32) for j, name in enumerate(self.outputs)}


_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relu": lambda x: np.maximum(x, 0),
    "tanh": np.tanh,
    "gelu": lambda x: x * 0.5 * (1.0 + erf(x / np.sqrt(2.0))),  # exact GELU, as torch.nn.GELU()
}


def save_tag_head(path: str | Path, head: TagHead) -> None:
    """Write ``head`` in the documented safetensors format (module docstring)."""
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
