"""Decode, orient, resize and re-encode one downloaded image, safely, with Pillow.

The header is read first: a format outside the allow-list or a pixel count over the cap is refused
before any pixel is decoded (Pillow's own decompression-bomb check is a second line). JPEGs are
decoded at reduced scale (libjpeg DCT scaling, ``Image.draft``) when the target is at most half
the source, which gives the same picture several times faster. Resize modes follow img2dataset:

- ``no``: keep the size, re-encode only.
- ``keep_ratio``: the smaller side becomes ``image_size``.
- ``center_crop``: as keep_ratio, then a centred ``image_size`` square.
- ``border``: the larger side becomes ``image_size``, then white padding to a square.

Down-scaling uses area averaging (Pillow ``BOX``, img2dataset's ``INTER_AREA``) and up-scaling
Lanczos. Transparent images are composited on white, as img2dataset does.

Thumbnails for the dashboard, the search results and the report are made here too, once:
:func:`read_thumbnails` reads the wanted keys of a run's image shards and shrinks them.
"""

from __future__ import annotations

import base64
import io
import logging
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

from laion_dask.ground.config import DownloadConfig
from laion_dask.ground.shards import read_images

__all__ = [
    "ImageResult",
    "process_image",
    "reuse_image_memory",
    "target_size",
    "thumbnail",
    "png_bytes",
    "data_uri",
    "thumbnail_html",
    "read_thumbnails",
]

log = logging.getLogger(__name__)

_ENCODER = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# EXIF orientations 5-8 swap width and height
_SWAPS_AXES = {5, 6, 7, 8}
_ORIENTATION_TAG = 0x0112
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    struct.error,
)


@dataclass(frozen=True)
class ImageResult:
    """Outcome of :func:`process_image` for one body; ``image`` is set only on success."""

    status: str
    error_message: str | None = None
    original_width: int | None = None
    original_height: int | None = None
    width: int | None = None
    height: int | None = None
    image: bytes | None = None


#: freed Pillow image blocks kept for reuse per process by :func:`reuse_image_memory`: about
#: four pictures alive per decode thread (decoded, oriented, flattened, resized) at the default
#: four threads; each block is at most Pillow's block size (16 MiB), most far smaller
IMAGE_BLOCKS = 16


def reuse_image_memory(blocks: int = IMAGE_BLOCKS) -> None:
    """Let Pillow keep up to ``blocks`` freed image blocks for the next pictures (raised, never
    lowered; the same as ``PILLOW_BLOCKS_MAX``).

    Pillow's default keeps none: each picture's pixels are a fresh ``malloc``, and a Dask worker
    runs with ``MALLOC_TRIM_THRESHOLD_`` set, which pins glibc's mmap threshold at 128 KiB, so
    every picture over that (a 400x300 draft is 480 KB) is a fresh ``mmap`` whose pages fault in
    again. Measured on 2,000 800x600 JPEGs from nginx, ``download_images`` under that setting:
    4.28 ms CPU per image without reuse, 3.46 ms with 16 blocks (3.31 ms without the setting).
    """
    core = Image.core
    if hasattr(core, "get_blocks_max") and core.get_blocks_max() < blocks:
        core.set_blocks_max(blocks)


def _scaled(w: int, h: int, side: int, use_min: bool) -> tuple[int, int]:
    # albumentations' smallest/longest_max_size: scale the chosen side to ``side``, round the other
    scale = side / (min(w, h) if use_min else max(w, h))
    if scale == 1.0:
        return w, h
    return max(1, round(w * scale)), max(1, round(h * scale))


def target_size(width: int, height: int, cfg: DownloadConfig) -> tuple[int, int]:
    """Size of the resized picture (before ``center_crop``/``border`` squaring) for ``cfg``.

    Examples
    --------
    >>> target_size(800, 600, DownloadConfig())
    (341, 256)
    """
    mode, side = cfg.resize_mode, cfg.image_size
    if mode == "no":
        return width, height
    use_min = mode in ("keep_ratio", "center_crop")
    reference = min(width, height) if use_min else max(width, height)
    if cfg.resize_only_if_bigger and reference <= side:
        return width, height
    return _scaled(width, height, side, use_min)


def _flatten(img: Image.Image) -> Image.Image:
    """RGB (or L) pixels; transparency composited on white as img2dataset does."""
    if img.mode in ("RGB", "L"):
        return img
    if img.mode in ("RGBA", "LA", "PA", "P", "RGBa", "La"):
        rgba = img.convert("RGBA")
        lowest_alpha = rgba.getchannel("A").getextrema()[0]
        if lowest_alpha == 255:  # fully opaque: skip the composite
            return rgba.convert("RGB")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: keep the high byte (Pillow's convert("L") would clip at 255)
        return img.convert("I").point(lambda v: v * (1 / 256)).convert("L")
    return img.convert("RGB")


def _resize(img: Image.Image, cfg: DownloadConfig) -> Image.Image:
    w, h = img.size
    tw, th = target_size(w, h, cfg)
    if (tw, th) != (w, h):
        down = tw * th < w * h
        img = img.resize((tw, th), Image.Resampling.BOX if down else Image.Resampling.LANCZOS)
    side = cfg.image_size
    if cfg.resize_mode == "center_crop" and (tw > side or th > side):
        left, top = max(0, (tw - side) // 2), max(0, (th - side) // 2)
        img = img.crop((left, top, left + min(side, tw), top + min(side, th)))
    elif cfg.resize_mode == "border" and (tw < side or th < side):
        canvas = Image.new(img.mode, (max(side, tw), max(side, th)), "white")
        canvas.paste(img, ((canvas.width - tw) // 2, (canvas.height - th) // 2))
        img = canvas
    return img


def _encode(img: Image.Image, cfg: DownloadConfig) -> bytes:
    out = io.BytesIO()
    fmt = _ENCODER[cfg.encode_format]
    if fmt == "PNG":
        img.save(out, fmt, compress_level=6)
    else:
        img.save(out, fmt, quality=cfg.encode_quality)
    return out.getvalue()


def process_image(data: bytes, cfg: DownloadConfig) -> ImageResult:
    """Decode ``data``, apply EXIF orientation, resize as ``cfg`` says and re-encode.

    Never raises for bad bytes: the outcome is a status among ``success``, ``failed_to_decode``,
    ``too_large`` (pixel count over ``cfg.max_pixels`` or a decompression bomb) and
    ``unsupported_format`` (not in ``cfg.formats``). Animated images give their first frame.
    ``original_width/height`` are the oriented (displayed) size.

    Parameters
    ----------
    data : bytes
        The downloaded body.
    cfg : DownloadConfig
        ``formats``, ``max_pixels``, ``resize_mode``, ``image_size``, ``encode_*``.

    Returns
    -------
    ImageResult
    """
    try:
        with warnings.catch_warnings():
            # we refuse over-sized images ourselves just below (cfg.max_pixels), before decoding;
            # Pillow's warning for the same check would only be noise in the worker's log
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        return ImageResult("too_large", f"decompression bomb: {err}")
    except UnidentifiedImageError:
        # Pillow's message names the BytesIO's address, which would make equal runs differ
        return ImageResult("failed_to_decode", "cannot identify image: unknown or corrupt format")
    except _DECODE_ERRORS as err:
        return ImageResult("failed_to_decode", f"cannot identify image: {err}")
    with img:
        fmt = (img.format or "").upper()
        if fmt not in cfg.formats:
            return ImageResult("unsupported_format", f"format {fmt or 'unknown'} not allowed")
        w, h = img.size
        if w < 1 or h < 1:
            return ImageResult("failed_to_decode", f"invalid size {w}x{h}")
        if w * h > cfg.max_pixels:
            return ImageResult("too_large", f"{w}x{h} = {w * h} pixels > {cfg.max_pixels}")
        ow, oh = w, h
        try:
            orientation = img.getexif().get(_ORIENTATION_TAG, 1)
            ow, oh = (h, w) if orientation in _SWAPS_AXES else (w, h)
            if fmt == "JPEG" and cfg.resize_mode != "no":
                tw, th = target_size(ow, oh, cfg)
                if tw * 2 <= ow and th * 2 <= oh:
                    # DCT-domain reduction to no less than the target: same picture, faster
                    req = (th, tw) if orientation in _SWAPS_AXES else (tw, th)
                    img.draft("RGB" if img.mode not in ("L", "CMYK") else img.mode, req)
            img.load()
            # exif_transpose on the (possibly reduced) frame; animated images keep frame 0
            oriented = ImageOps.exif_transpose(img) if orientation != 1 else img
            pixels = _flatten(oriented)
            resized = _resize(pixels, cfg)
            encoded = _encode(resized, cfg)
        except Image.DecompressionBombError as err:
            return ImageResult("too_large", f"decompression bomb: {err}")
        except _DECODE_ERRORS as err:
            # Pillow reports truncated or corrupt data as OSError/SyntaxError; odd modes as
            # ValueError/TypeError; broken palettes or EXIF blocks as IndexError/KeyError/struct
            return ImageResult("failed_to_decode", f"{type(err).__name__}: {err}", ow, oh)
    return ImageResult("success", None, ow, oh, resized.width, resized.height, encoded)


# --- thumbnails ---------------------------------------------------------------------------------


def thumbnail(data: bytes, size: int = 128) -> Image.Image | None:
    """Decode image bytes to an RGB PIL image no larger than ``size`` px; None when undecodable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (size, size))  # JPEG: decode at reduced scale, same thumbnail
            img = im.convert("RGB")
    except (*_DECODE_ERRORS, Image.DecompressionBombError) as err:
        log.debug("thumbnail: undecodable image: %s", err)
        return None
    img.thumbnail((size, size))
    return img


def png_bytes(img: Image.Image) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(img: Image.Image, fmt: str = "png", quality: int = 80) -> str:
    """A PIL image as a ``data:`` URI: ``png``, or ``jpeg`` at ``quality`` (smaller pages)."""
    if fmt == "png":
        data = png_bytes(img)
    elif fmt == "jpeg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        data = buf.getvalue()
    else:
        raise ValueError(f"data_uri: fmt must be 'png' or 'jpeg', got {fmt!r}")
    return f"data:image/{fmt};base64," + base64.b64encode(data).decode("ascii")


def thumbnail_html(img: Image.Image | None) -> str:
    """A PIL thumbnail as an inline ``<img>`` (base64 PNG), or a grey "no image" box."""
    if img is None:
        return '<div style="width:128px;height:96px;background:#ddd">no image</div>'
    return f'<img src="{data_uri(img)}" style="max-width:128px">'


def read_thumbnails(
    image_root: str, keys: Sequence[object], shards: Sequence[object], size: int = 128
) -> list[Image.Image | None]:
    """Thumbnails of the images ``keys`` (in shard ``shards[i]`` under ``image_root``), in order.

    A missing or unreadable shard, a missing key or an undecodable image gives ``None`` in its
    place, counted in the log (:func:`laion_dask.ground.shards.read_images`): a page of samples
    shows a grey box, never fails.
    """
    out = [None if b is None else thumbnail(b, size) for b in read_images(image_root, keys, shards)]
    missing = sum(img is None for img in out)
    if missing:
        log.info("thumbnails: %d of %d have no decodable image", missing, len(out))
    return out
