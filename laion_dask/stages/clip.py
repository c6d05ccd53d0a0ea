"""CLIP scoring: image/text embeddings, cosine similarity and safety tags over one partition.

The encoder is any transformers dual encoder with ``get_image_features`` /
``get_text_features`` (CLIP, SigLIP, AltCLIP; LAION's multilingual recipe adds a
sentence-transformers text tower), loaded once per worker process by :func:`load_encoder` from
a hub name (with ``clip.revision``) or a local directory. Which models are supported, and how
to run without hub access, is in docs/configuration.md ("Models"); tests/test_clip.py builds
tiny random models of each architecture and checks the similarity against the checkpoint's own
processor + ``get_*_features`` + cosine. Not supported (a :class:`ModelUnavailableError` at load
time): processors with variable resolution (SigLIP2 NaFlex), text towers that need inputs other
than ``input_ids`` / ``attention_mask``.

Images are decoded, resized and cropped by a loader pool while the model runs on the
previous batch (two batches ahead): ``clip.loader_threads`` threads by default (Pillow releases
the GIL while decoding and resizing, but every image still costs the scoring process ~4 ms of
CPU for an 800x600 JPEG), or, with ``clip.loader_processes = N``, N spawned decoder processes
per worker process, started on first use and reused by its later tasks, which leave the scoring
process ~0.2 ms per image (receiving the pixels). Decoder processes need a non-daemonic worker
(see :func:`_process_pool`) and, when scoring outside Dask, a script whose work runs under
``if __name__ == "__main__":`` (the spawn start method imports the main module again). If a
decoder process dies, that task's remaining images are decoded in threads and the next task
starts a fresh pool. The model sees uint8 batches that are normalised on its own device, so a
GPU receives a quarter of the bytes a float batch would need.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import importlib.util
import io
import logging
import multiprocessing
import os
import threading
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import (
    BrokenExecutor,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import PIL.Image

from laion_dask.ground import schema
from laion_dask.ground.config import ClipConfig
from laion_dask.ground.shards import read_images
from laion_dask.stages import tags
from laion_dask.stages.embeddings import ScoreResult

__all__ = [
    "Encoder",
    "ModelUnavailableError",
    "TransformersEncoder",
    "SCORE_STATUSES",
    "load_encoder",
    "resolve_device",
    "encoder_from_config",
    "encoder_info",
    "projected_features",
    "resolved_config",
    "check_model_available",
    "score_partition",
    "add_clip_scores",
    "shutdown_decoder_processes",
    "to_rgb",
]

log = logging.getLogger(__name__)

#: ``score_status`` values: <NA> marks rows not attempted (download failed)
SCORE_SUCCESS = "success"
SCORE_FAILED_TO_DECODE = "failed_to_decode"
#: the row says ``success`` but its key is absent from its shard (or the shard is unreadable)
SCORE_IMAGE_MISSING = "image_missing"
SCORE_STATUSES = (SCORE_SUCCESS, SCORE_FAILED_TO_DECODE, SCORE_IMAGE_MISSING)

_DECODE_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)


class ModelUnavailableError(RuntimeError):
    """A model named in the config cannot be loaded (not cached, hub unreachable, bad path)."""


@runtime_checkable
class Encoder(Protocol):
    """What :func:`score_partition` needs from a model: unit-norm float32 embeddings."""

    dim: int

    def encode_images(self, images: Sequence[PIL.Image.Image]) -> np.ndarray: ...

    def encode_texts(self, texts: Sequence[str], groups: Sequence[str]) -> np.ndarray: ...


# --- preprocessing -------------------------------------------------------------------------------


def to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """RGB as transformers' ``convert_to_rgb`` does: transparency composited onto white."""
    if img.mode == "RGB":
        return img
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class Preprocessor:
    """The image processor's resize / crop / normalise, done with Pillow on uint8 pixels.

    Built from the checkpoint's image processor, so its values (size, crop, mean, std,
    resample) are the model's own. ``resize_to`` is ``("shortest_edge", s)`` (CLIP) or
    ``("fixed", h, w)`` (SigLIP).

    Kept rather than calling the processor itself with ``do_rescale=False, do_normalize=False``
    (the same uint8 pixels, checked equal): that call moves the full-size image between PIL and
    numpy twice. Measured on one 800x600 RGB image to ViT-B/32's 224 crop, 30 calls each, on
    this project's shared 2-core CPU (load ~15): 23-27 ms per image here, 32-35 ms through the
    processor; a loader thread or process does this for every image scored.
    """

    resize_to: tuple[Any, ...] | None
    crop: tuple[int, int] | None
    resample: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    rescale: float
    normalize: bool

    @classmethod
    def from_image_processor(cls, proc: Any) -> Preprocessor:
        """Read the settings of a transformers image processor (CLIP-style or SigLIP-style)."""
        # heavy optional dependency (seconds to import): only where a model loads
        from transformers.image_processing_utils import get_size_dict

        def get(name: str, default: Any = None) -> Any:
            return getattr(proc, name, default)

        resize_to: tuple[Any, ...] | None = None
        if get("do_resize", True):
            # an int, a dict or (transformers 5) a SizeDict, as the processor reads it
            size = get_size_dict(get("size"), default_to_square=False, param_name="size")
            if "shortest_edge" in size and "longest_edge" not in size:
                resize_to = ("shortest_edge", int(size["shortest_edge"]))
            elif "height" in size and "width" in size:
                resize_to = ("fixed", int(size["height"]), int(size["width"]))
            else:
                raise ValueError(f"unsupported image processor size {size!r}")
        crop = None
        if get("do_center_crop", False):
            cs = get_size_dict(get("crop_size"), param_name="crop_size")
            crop = (int(cs["height"]), int(cs["width"]))
        resample = get("resample", PIL.Image.Resampling.BICUBIC)
        resample = int(getattr(resample, "value", resample))
        mean = tuple(float(x) for x in np.broadcast_to(get("image_mean", 0.0), 3))
        std = tuple(float(x) for x in np.broadcast_to(get("image_std", 1.0), 3))
        rescale = float(get("rescale_factor", 1 / 255)) if get("do_rescale", True) else 1.0
        return cls(resize_to, crop, resample, mean, std, rescale, bool(get("do_normalize", True)))

    def _target(self, width: int, height: int) -> tuple[int, int]:
        assert self.resize_to is not None
        if self.resize_to[0] == "fixed":
            return self.resize_to[2], self.resize_to[1]
        s = self.resize_to[1]
        if width <= height:
            return s, int(s * height / width)
        return int(s * width / height), s

    def pixels(self, img: PIL.Image.Image) -> np.ndarray:
        """Resize and crop one image; returns (H, W, 3) uint8."""
        # heavy optional dependency (seconds to import): only where images are scored
        from transformers.image_transforms import center_crop

        img = to_rgb(img)
        if self.resize_to is not None:
            img = img.resize(self._target(*img.size), resample=self.resample)
        arr = np.asarray(img)
        if self.crop is not None:  # transformers' own crop: zero-pads an image smaller than it
            arr = center_crop(arr, self.crop, input_data_format="channels_last")
        return arr

    def decode(self, data: bytes, *, draft: bool = True) -> np.ndarray:
        """Decode encoded image bytes and preprocess them; raises on undecodable data.

        With ``draft``, a JPEG at least twice the target size is decoded at a reduced DCT scale
        (1/2, 1/4, 1/8) that stays at or above the target, which is several times faster and
        changes similarities by about 1e-3.
        """
        with PIL.Image.open(io.BytesIO(data)) as img:
            if draft and img.format == "JPEG" and self.resize_to is not None:
                w, h = img.size
                tw, th = self._target(w, h)
                if w >= 2 * tw and h >= 2 * th:
                    # draft keeps both sides >= the request; pixels() recomputes the target
                    img.draft("RGB", (tw, th))
            img.load()
            return self.pixels(img)

    def to_tensor(self, batch: np.ndarray, device: Any, dtype: Any) -> Any:
        """(N, H, W, 3) uint8 -> normalised (N, 3, H, W) tensor on ``device`` in ``dtype``."""
        # heavy optional dependencies (seconds to import): only where a model runs
        import torch

        if not batch.flags.writeable:  # a view of a PIL image: torch wants writable memory
            batch = batch.copy()
        x = torch.from_numpy(batch).to(device, non_blocking=True).permute(0, 3, 1, 2)
        x = x.to(torch.float32) * self.rescale
        if self.normalize:
            mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
            x = (x - mean) / std
        return x.to(dtype).contiguous()


# --- encoders ------------------------------------------------------------------------------------


def projected_features(out: Any) -> Any:
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5)."""
    pooled = getattr(out, "pooler_output", out)
    if not hasattr(pooled, "norm"):  # neither a tensor nor an output holding one
        raise TypeError(f"cannot find projected features in {type(out).__name__}")
    return pooled


def _normalize(x: Any) -> np.ndarray:
    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x.cpu().numpy().astype(np.float32, copy=False)


def resolve_device(device: str) -> str:
    """``auto`` as cuda where torch sees a CUDA device, else cpu; ``cuda`` without one raises
    :class:`ModelUnavailableError` (scoring and training resolve it alike)."""
    # heavy optional dependencies (seconds to import): only where a model runs
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelUnavailableError("device = 'cuda' but torch sees no CUDA device")
    return device


def _resolve_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    return dtype


def _is_local(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.path.isdir(name)


def _load_text_tower(name: str, revision: str | None, device: str, dtype: Any) -> Any:
    """A sentence-transformers text tower (``clip-ViT-B-32-multilingual-v1``), read by the
    sentence-transformers package itself, so every module such a folder may hold (any pooling,
    Dense activations, Normalize) works as its authors wrote it.

    It replaced a ~100-line reader of our own (mean/CLS pooling, identity/tanh Dense only).
    Measured against that reader (f85ca5e) on the tiny tower of tests/helpers/clip.py, 64
    captions, shared 2-core CPU: identical embeddings (max difference 0.0), encoding as fast
    (median 76 ms vs 120 ms, best 59 vs 64 ms). The price: scikit-learn (~50 MB, which
    sentence_transformers imports) in the install, and a first load of 2.7 s instead of 0.1 s
    (mostly that import), once per worker process.
    """
    local = _is_local(name)
    path = str(Path(name).expanduser()) if local else name
    with _loading(name):
        # heavy optional stack (torch, transformers, scikit-learn): imported where a tower loads
        from sentence_transformers import SentenceTransformer

        tower = SentenceTransformer(path, device=device, revision=None if local else revision)
    return tower.to(dtype).eval()


@dataclass(eq=False)
class TransformersEncoder:
    """A transformers dual encoder (+ optional multilingual text tower); see :func:`load_encoder`.

    ``info`` holds the resolved model, revision (commit hash when loaded from the hub cache),
    device and dtype, for the run's ``config.toml``.
    """

    model: Any
    tokenizer: Any
    preprocessor: Preprocessor
    device: str
    dtype: str
    dim: int
    logit_scale: float
    info: dict[str, Any]
    multilingual: Any = None  # a sentence_transformers.SentenceTransformer, or None
    text_padding: str | bool = True
    text_max_length: int = 77
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _forward_lock(self) -> Any:
        """On an accelerator, one forward at a time per process (tasks share the device, and
        the loader threads of the waiting task keep decoding). On CPU, concurrent tasks run
        their forwards side by side: each uses its own OpenMP team, which beats serialising
        one team that the loader threads keep preempting."""
        return self._lock if self.device != "cpu" else contextlib.nullcontext()

    def encode_pixels(self, batch: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 preprocessed pixels -> (N, dim) unit-norm float32."""
        # heavy optional dependencies (seconds to import): only where a model runs
        import torch

        if len(batch) == 0:
            return np.zeros((0, self.dim), np.float32)
        with self._forward_lock(), torch.inference_mode():
            x = self.preprocessor.to_tensor(batch, self.device, getattr(torch, self.dtype))
            return _normalize(projected_features(self.model.get_image_features(pixel_values=x)))

    def encode_images(self, images: Sequence[PIL.Image.Image]) -> np.ndarray:
        """Unit-norm float32 image embeddings, shape (n, dim)."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.encode_pixels(np.stack([self.preprocessor.pixels(im) for im in images]))

    def _clip_texts(self, texts: Sequence[str]) -> Any:
        tok = self.tokenizer(
            list(texts),
            padding=self.text_padding,
            truncation=True,
            max_length=self.text_max_length,
            return_tensors="pt",
        ).to(self.device)
        kwargs = {k: v for k, v in tok.items() if k in ("input_ids", "attention_mask")}
        return projected_features(self.model.get_text_features(**kwargs))

    def encode_texts(self, texts: Sequence[str], groups: Sequence[str]) -> np.ndarray:
        """Unit-norm float32 text embeddings; ``multi``/``nolang`` use the multilingual tower."""
        # heavy optional dependencies (seconds to import): only where a model runs
        import torch

        out = np.zeros((len(texts), self.dim), np.float32)
        if len(texts) == 0:
            return out
        texts = ["" if t is None or t is pd.NA else str(t) for t in texts]
        multi = np.array([g != "en" and self.multilingual is not None for g in groups], bool)
        with self._forward_lock(), torch.inference_mode():
            for sel, fn in ((~multi, self._clip_texts), (multi, self._multi_texts)):
                idx = np.flatnonzero(sel)
                if len(idx):
                    out[idx] = _normalize(fn([texts[i] for i in idx]))
        return out

    def _multi_texts(self, texts: Sequence[str]) -> Any:
        assert self.multilingual is not None
        return self.multilingual.encode(
            list(texts), batch_size=len(texts), convert_to_tensor=True, show_progress_bar=False
        )


#: text towers whose position ids start after the pad id (fairseq/RoBERTa style): XLM-R's
#: ``max_position_embeddings = 514`` holds 512 tokens
_OFFSET_POSITION_TYPES = ("roberta", "altclip_text", "xlm-roberta", "camembert")


def _text_max_length(tokenizer: Any, text_cfg: Any) -> int:
    """Longest token sequence the text tower accepts: the tokenizer's ``model_max_length``
    capped by the position table (less the pad offset of RoBERTa-style towers)."""
    limits = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 100_000:  # unset reads as ~1e30
        limits.append(tok_max)
    positions = int(getattr(text_cfg, "max_position_embeddings", 0) or 0)
    if positions:
        model_type = str(getattr(text_cfg, "model_type", ""))
        if model_type.startswith(_OFFSET_POSITION_TYPES):
            positions -= int(getattr(text_cfg, "pad_token_id", 1) or 0) + 1
        limits.append(positions)
    return min(limits) if limits else 77


_load_lock = threading.Lock()


def load_encoder(
    model: str,
    *,
    revision: str | None = None,
    multilingual_text_model: str | None = None,
    multilingual_revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> TransformersEncoder:
    """Load a dual encoder once per process (``functools.lru_cache(maxsize=2)``).

    The cache is guarded by a lock, so the threads of one worker that start scoring together
    wait for a single load instead of each loading the model (``load_encoder.cache_info()``
    counts loads as misses).

    Parameters
    ----------
    model
        Hub name or local directory of any transformers model with ``get_image_features`` /
        ``get_text_features``, plus its tokenizer and image processor.
    revision
        Hub revision (branch, tag or commit); ignored for local paths.
    multilingual_text_model
        Sentence-transformers text tower for ``multi``/``nolang`` rows, aligned to ``model``'s
        embedding space; None uses ``model``'s own text tower for every row.
    device, dtype
        ``auto`` picks cuda + float16 when CUDA is visible, cpu + float32 otherwise.

    Returns
    -------
    TransformersEncoder
    """
    with _load_lock:
        return _load_encoder(
            model, revision, multilingual_text_model, multilingual_revision, device, dtype
        )


@functools.lru_cache(maxsize=2)
def _load_encoder(
    model: str,
    revision: str | None,
    multilingual_text_model: str | None,
    multilingual_revision: str | None,
    device: str,
    dtype: str,
) -> TransformersEncoder:
    # heavy optional dependencies (seconds to import): only where a model runs
    import torch
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    dev = resolve_device(device)
    dt = _resolve_dtype(dtype, dev)
    torch_dtype = getattr(torch, dt)
    kw: dict[str, Any] = {} if _is_local(model) else {"revision": revision}
    with _loading(model):
        net = AutoModel.from_pretrained(model, dtype=torch_dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(model, **kw)
        image_processor = AutoImageProcessor.from_pretrained(model, **kw)
    for method in ("get_image_features", "get_text_features"):
        if not hasattr(net, method):
            raise ModelUnavailableError(f"{model}: {type(net).__name__} has no {method}()")
    try:
        preprocessor = Preprocessor.from_image_processor(image_processor)
    except ValueError as exc:
        raise ModelUnavailableError(
            f"{model}: {type(image_processor).__name__} is not supported ({exc}); supported are "
            "processors that resize to a shortest edge (+ center crop) or to a fixed size"
        ) from exc
    net = net.to(dev).eval()
    cfg = net.config
    max_len = _text_max_length(tokenizer, getattr(cfg, "text_config", None))
    is_siglip = str(getattr(cfg, "model_type", "")).startswith("siglip")
    scale = getattr(net, "logit_scale", None)
    logit_scale = float(scale.detach().float().exp().item()) if scale is not None else 100.0
    tower = None
    if multilingual_text_model:
        tower = _load_text_tower(multilingual_text_model, multilingual_revision, dev, torch_dtype)
    enc = TransformersEncoder(
        model=net,
        tokenizer=tokenizer,
        preprocessor=preprocessor,
        device=dev,
        dtype=dt,
        dim=0,
        logit_scale=logit_scale,
        info={
            "model": model,
            "revision": getattr(cfg, "_commit_hash", None) or revision,
            "multilingual_text_model": multilingual_text_model,
            "multilingual_revision": multilingual_revision,
            "device": dev,
            "dtype": dt,
        },
        multilingual=tower,
        # SigLIP was trained on max_length-padded text; CLIP pads to the longest in the batch
        text_padding="max_length" if is_siglip else True,
        text_max_length=max_len,
    )
    # the width the model actually returns (SigLIP has no projection_dim: its hidden size)
    with torch.inference_mode():
        enc.dim = int(enc._clip_texts(["a"]).shape[-1])
        tower_dim = int(enc._multi_texts(["a"]).shape[-1]) if tower is not None else enc.dim
    if tower_dim != enc.dim:
        raise ModelUnavailableError(
            f"{multilingual_text_model} gives {tower_dim}-d text embeddings, {model} {enc.dim}-d"
        )
    log.info("loaded encoder %s", enc.info)
    return enc


load_encoder.cache_info = _load_encoder.cache_info  # type: ignore[attr-defined]
load_encoder.cache_clear = _load_encoder.cache_clear  # type: ignore[attr-defined]


def encoder_from_config(cfg: ClipConfig) -> TransformersEncoder:
    """The cached encoder for ``cfg`` (see :func:`load_encoder`)."""
    return load_encoder(
        cfg.model,
        revision=cfg.revision,
        multilingual_text_model=cfg.multilingual_text_model,
        multilingual_revision=cfg.multilingual_revision,
        device=cfg.device,
        dtype=cfg.dtype,
    )


def encoder_info(encoder: Encoder) -> dict[str, Any]:
    """Resolved model, revision, device and dtype of ``encoder`` ({} for foreign encoders)."""
    return dict(getattr(encoder, "info", {}))


def resolved_config(cfg: ClipConfig, encoder: Encoder | None = None) -> ClipConfig:
    """``cfg`` with the encoder's resolved revision, device and dtype, for the run's config.toml.

    Call it where the model loads (e.g. ``client.submit(resolved_config, cfg, resources=...)``
    on a GPU worker) so ``auto`` becomes what was actually used.
    """
    info = encoder_info(encoder if encoder is not None else encoder_from_config(cfg))
    if not info:
        return cfg
    return dataclasses.replace(
        cfg,
        revision=info.get("revision") or cfg.revision,
        device=info.get("device", cfg.device),
        dtype=info.get("dtype", cfg.dtype),
    )


#: what a missing or unreachable model raises: the hub client's errors (HfHubHTTPError,
#: LocalEntryNotFoundError when offline, wrapping the connection error) are OSErrors, a bad
#: name or revision a ValueError
_HUB_ERRORS = (OSError, ValueError)


def _unavailable_message(name: str, why: object) -> str:
    return (
        f"model {name!r} is not available ({why}). Either download it once where the Hugging Face "
        f"hub is reachable (`hf download {name}`) and run with HF_HUB_OFFLINE=1 to use that "
        "cache, or point the config at a local directory written by save_pretrained "
        "(clip.model / clip.multilingual_text_model = '/path/to/model')."
    )


@contextlib.contextmanager
def _loading(name: str) -> Iterator[None]:
    """What loading ``name`` raises, as one :class:`ModelUnavailableError` saying what to do."""
    try:
        yield
    except ImportError as exc:  # e.g. SiglipTokenizer without sentencepiece / protobuf
        raise ModelUnavailableError(_missing_package_message(name, exc)) from exc
    except _HUB_ERRORS as exc:
        raise ModelUnavailableError(_unavailable_message(name, exc)) from exc


def _missing_package_message(name: str, exc: ImportError) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"model {name!r} needs a Python package that is not installed: {first} "
        "(SigLIP's SiglipTokenizer needs `pip install sentencepiece protobuf`, a multilingual "
        "text tower `pip install sentence-transformers`)."
    )


def check_model_available(cfg: ClipConfig) -> None:
    """Raise :class:`ModelUnavailableError` before any work if a configured model is missing.

    Local paths must be directories with ``config.json`` (or ``modules.json`` for a
    sentence-transformers tower); hub names must resolve through the cache or the hub. The
    main model's tokenizer is loaded too, so a missing tokenizer package (``sentencepiece``
    for SigLIP) is reported here rather than on the first worker.
    """
    models = [(cfg.model, cfg.revision, "config.json")]
    if cfg.multilingual_text_model:
        models.append((cfg.multilingual_text_model, cfg.multilingual_revision, "modules.json"))
        if importlib.util.find_spec("sentence_transformers") is None:
            with _loading(cfg.multilingual_text_model):
                raise ImportError("No module named 'sentence_transformers'")
    for name, revision, marker in models:
        if _is_local(name):
            path = Path(name).expanduser()
            if not (path / marker).is_file():
                raise ModelUnavailableError(
                    _unavailable_message(name, f"{path / marker} not found")
                )
            continue
        # heavy optional dependencies (seconds to import): only where a model runs
        from huggingface_hub import hf_hub_download

        with _loading(name):
            hf_hub_download(name, marker, revision=revision)
    # heavy optional dependencies (seconds to import): only where a model runs
    from transformers import AutoTokenizer

    with _loading(cfg.model):
        kw: dict[str, Any] = {} if _is_local(cfg.model) else {"revision": cfg.revision}
        AutoTokenizer.from_pretrained(cfg.model, **kw)


# --- scoring -------------------------------------------------------------------------------------


def _set_torch_threads(cfg: ClipConfig, encoder: Encoder, threads: int | None) -> None:
    if getattr(encoder, "device", "cpu") != "cpu":
        return
    # heavy optional dependencies (seconds to import): only where a model runs
    import torch

    # else the CPUs this process may run on (its affinity mask where the OS has one)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # every task, not once: torch also sets MKL's count, which is per calling thread, and a Dask
    # worker process starts with OMP_NUM_THREADS = MKL_NUM_THREADS = 1
    torch.set_num_threads(cfg.torch_threads or threads or usable or 1)


def _decode_pil(data: bytes) -> PIL.Image.Image:
    with PIL.Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.copy()


def _decode_one(item: bytes | None, pre: Preprocessor | None, draft: bool) -> Any:
    """One decoded item (uint8 pixels with ``pre``, else a PIL image); None if undecodable."""
    if item is None:
        return None
    try:
        return pre.decode(item, draft=draft) if pre is not None else _decode_pil(item)
    except _DECODE_ERRORS as exc:
        log.debug("failed to decode image: %s", exc)
        return None


def _decode_chunk(items: list[bytes | None], pre: Preprocessor | None, draft: bool) -> list[Any]:
    """Decode a chunk of images (runs in a loader thread or a loader process)."""
    return [_decode_one(item, pre, draft) for item in items]


#: one decoder process pool per worker process and size, shared by its tasks
_process_pools: dict[int, ProcessPoolExecutor] = {}
_process_pools_lock = threading.Lock()
_daemon_warned = False


def _process_pool(n: int) -> ProcessPoolExecutor | None:
    """The cached pool of ``n`` decoder processes, or None where this process may not fork.

    Dask's worker processes are daemonic by default (``distributed.worker.daemon``), and a
    daemonic process cannot have children: there the loader threads decode instead, with one
    log warning per process.
    """
    global _daemon_warned
    if multiprocessing.current_process().daemon:
        if not _daemon_warned:
            _daemon_warned = True
            log.warning(
                "clip.loader_processes = %d ignored: this worker process is daemonic and cannot "
                "start decoder processes; start the cluster with distributed.worker.daemon = "
                "False (DASK_DISTRIBUTED__WORKER__DAEMON=False). Decoding in threads instead.",
                n,
            )
        return None
    with _process_pools_lock:
        pool = _process_pools.get(n)
        if pool is None:
            # spawn: never fork a process that holds a CUDA context or OpenMP threads
            pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
            _process_pools[n] = pool
        return pool


def _drop_process_pool(n: int, pool: ProcessPoolExecutor) -> None:
    with _process_pools_lock:
        if _process_pools.get(n) is pool:
            del _process_pools[n]
    pool.shutdown(wait=False)  # its pending futures fail with BrokenProcessPool


def shutdown_decoder_processes() -> None:
    """Stop this process's decoder pools (they are otherwise reused until the process exits)."""
    with _process_pools_lock:
        pools = list(_process_pools.values())
        _process_pools.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


def _batches(
    data: list[bytes | None], cfg: ClipConfig, pre: Preprocessor | None
) -> Iterator[tuple[list[int], list[Any]]]:
    """Yield (row indices, decoded items) per batch; decoding runs two batches ahead.

    Items are uint8 pixel arrays when ``pre`` is given, PIL images otherwise; ``None`` marks an
    image that failed to decode. Decoding runs in ``cfg.loader_threads`` threads, or in
    ``cfg.loader_processes`` spawned processes when set (one item per thread task; about four
    chunks per process and batch, so the pixels cross the process boundary in few messages).
    """
    bs = cfg.batch_size
    draft = cfg.jpeg_draft
    n_proc = cfg.loader_processes
    procs = _process_pool(n_proc) if n_proc > 0 else None
    # about four chunks per process and batch keep the processes busy without tiny messages
    chunk = max(1, min(64, -(-bs // (4 * n_proc)))) if procs is not None else 1

    with ThreadPoolExecutor(cfg.loader_threads, thread_name_prefix="clip-loader") as threads:
        pool: Executor = procs if procs is not None else threads

        def to_threads(exc: BaseException) -> None:
            nonlocal pool
            if pool is procs and procs is not None:
                log.warning("decoder processes unusable (%r): decoding in threads from here", exc)
                _drop_process_pool(n_proc, procs)
                pool = threads

        def submit_part(part: list[bytes | None]) -> Future:
            try:
                return pool.submit(_decode_chunk, part, pre, draft)
            except (BrokenExecutor, RuntimeError) as exc:  # broken, or shut down by another task
                if pool is threads:
                    raise
                to_threads(exc)
                return threads.submit(_decode_chunk, part, pre, draft)

        def submit(s: int) -> list[tuple[list[bytes | None], Future]]:
            parts = [data[i : i + chunk] for i in range(s, min(s + bs, len(data)), chunk)]
            return [(part, submit_part(part)) for part in parts]

        def result(part: list[bytes | None], fut: Future) -> list[Any]:
            try:
                return fut.result()
            except BrokenExecutor as exc:  # a decoder process died (e.g. killed for memory)
                to_threads(exc)
                return _decode_chunk(part, pre, draft)

        starts = range(0, len(data), bs)
        pending = deque(submit(s) for s in starts[:2])  # two batches ahead of the model
        for i, s in enumerate(starts):
            futs = pending.popleft()
            if i + 2 < len(starts):
                pending.append(submit(starts[i + 2]))
            items = [x for part, fut in futs for x in result(part, fut)]
            yield list(range(s, s + len(items))), items


def score_partition(
    df: pd.DataFrame,
    cfg: ClipConfig,
    *,
    encoder: Encoder | None = None,
    images: Mapping[str, bytes] | None = None,
    image_root: str | None = None,
    threads: int | None = None,
) -> ScoreResult:
    """Embed the downloaded rows of one partition and score image-text similarity and tags.

    Parameters
    ----------
    df
        Download rows (``schema.DOWNLOADS``); only ``status == "success"`` rows are scored.
    cfg
        The ``[clip]`` section.
    encoder
        Injected encoder; None loads the cached one for ``cfg``.
    images
        ``key -> encoded image bytes``; otherwise images are read from
        ``f"{image_root}/{shard}"`` webdataset shards.
    threads
        torch intra-op threads for a CPU encoder when ``cfg.torch_threads`` is 0: the caller
        knows them (a Dask worker's thread count); None uses the CPUs this process may run on.

    Returns
    -------
    ScoreResult
        ``frame`` is ``df`` plus ``schema.SCORE_DTYPES`` columns (every row kept; ``score_status``
        <NA> for rows not attempted); embeddings are float16, unit-norm, aligned with ``keys``.
    """
    n = len(df)
    status = np.full(n, None, dtype=object)
    scores = {c: np.full(n, np.nan, np.float32) for c in (schema.SIMILARITY, *tags.PROMPTS)}
    todo = np.flatnonzero(df[schema.STATUS].eq("success").fillna(False).to_numpy(dtype=bool))
    img_parts: list[np.ndarray] = []
    txt_parts: list[np.ndarray] = []
    done_rows: list[np.ndarray] = []
    if len(todo):
        encoder = encoder_from_config(cfg) if encoder is None else encoder
        _set_torch_threads(cfg, encoder, threads)
        keys = list(df[schema.KEY].astype("string").to_numpy(dtype=object)[todo])
        texts = df[schema.TEXT].astype("string").fillna("").to_numpy(dtype=object)
        groups = (
            df[schema.LANGUAGE_GROUP].astype("string").fillna("nolang").to_numpy(dtype=object)
            if schema.LANGUAGE_GROUP in df.columns
            else np.full(n, "en", dtype=object)
        )
        if images is not None:
            data = [images.get(k) for k in keys]
        elif image_root is not None:  # an unreadable shard's rows become image_missing
            shards = df[schema.SHARD].iloc[todo] if schema.SHARD in df else [None] * len(todo)
            data = read_images(image_root, keys, list(shards))
        else:
            raise ValueError("score_partition needs `images` or `image_root`")
        for i, d in zip(todo, data, strict=True):
            status[i] = SCORE_IMAGE_MISSING if d is None else SCORE_FAILED_TO_DECODE
        fast = hasattr(encoder, "encode_pixels") and isinstance(
            getattr(encoder, "preprocessor", None), Preprocessor
        )
        pre = encoder.preprocessor if fast else None  # type: ignore[attr-defined]
        for idx, items in _batches(data, cfg, pre):
            ok = [j for j, it in zip(idx, items, strict=True) if it is not None]
            if not ok:
                continue
            good = [it for it in items if it is not None]
            if fast:
                emb = encoder.encode_pixels(_stack(good))  # type: ignore[attr-defined]
            else:
                emb = np.asarray(encoder.encode_images(good), dtype=np.float32)
            rows = todo[ok]
            temb = np.asarray(
                encoder.encode_texts(list(texts[rows]), list(groups[rows])), dtype=np.float32
            )
            img_parts.append(emb)
            txt_parts.append(temb)
            done_rows.append(rows)
    dim = int(getattr(encoder, "dim", 0)) if encoder is not None else 0
    rows = np.concatenate(done_rows) if done_rows else np.zeros(0, np.int64)
    img = np.concatenate(img_parts) if img_parts else np.zeros((0, dim), np.float32)
    txt = np.concatenate(txt_parts) if txt_parts else np.zeros((0, dim), np.float32)
    if len(rows):
        scores[schema.SIMILARITY][rows] = np.einsum("ij,ij->i", img, txt)
        status[rows] = SCORE_SUCCESS
        for tag, values in tags.compute_tags(img, cfg, encoder=encoder).items():
            scores[tag][rows] = values
    failed = collections.Counter(s for s in status if s not in (None, SCORE_SUCCESS))
    if failed:
        log.info("scored %d rows, %d failed (%s)", len(rows), failed.total(), dict(failed))
    frame = df.assign(**scores, **{schema.SCORE_STATUS: pd.array(status, dtype="string")})
    frame = schema.conform(frame, schema.SCORE_DTYPES)
    keys = [str(k) for k in df[schema.KEY].iloc[rows]] if len(rows) else []
    return ScoreResult(frame, img.astype(np.float16), txt.astype(np.float16), keys)


def _stack(items: list[np.ndarray]) -> np.ndarray:
    """Stack preprocessed images (same size whenever the processor crops or resizes to fixed)."""
    shapes = {a.shape for a in items}
    if len(shapes) == 1:
        return np.stack(items)
    raise ValueError(f"preprocessed images differ in size {sorted(shapes)}; configure a crop size")


def add_clip_scores(df: pd.DataFrame, cfg: ClipConfig, **kwargs: Any) -> pd.DataFrame:
    """Return ``df`` with ``similarity``, ``punsafe``, ``pwatermark`` and ``score_status``.

    The frame of :func:`score_partition` (same keyword arguments); use that function to keep
    the embeddings too.
    """
    return score_partition(df, cfg, **kwargs).frame
