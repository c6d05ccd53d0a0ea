"""Decode/resize on real photos and hostile inputs, without any network."""

from __future__ import annotations

import base64
import io
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from laion_dask.ground.config import DownloadConfig
from laion_dask.ground.shards import ShardSample, write_shard
from laion_dask.stages.imaging import (
    data_uri,
    process_image,
    read_thumbnails,
    reuse_image_memory,
    target_size,
    thumbnail,
    thumbnail_html,
)
from tests.helpers.imagehost import noise_image


def _open(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _psnr(a: Image.Image, b: Image.Image) -> float:
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width x height`` with a tiny (invalid) data stream."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    ("mode", "size", "expected"),
    [
        ("keep_ratio", (800, 600), (341, 256)),
        ("keep_ratio", (600, 800), (256, 341)),
        ("keep_ratio", (100, 50), (512, 256)),  # upscales unless resize_only_if_bigger
        ("center_crop", (800, 600), (256, 256)),
        ("border", (800, 600), (256, 256)),
        ("border", (600, 800), (256, 256)),
        ("no", (800, 600), (800, 600)),
    ],
)
def test_resize_modes_follow_img2dataset(
    mode: str, size: tuple[int, int], expected: tuple[int, int]
) -> None:
    cfg = DownloadConfig(resize_mode=mode, image_size=256)
    res = process_image(noise_image(*size, "PNG"), cfg)
    assert res.status == "success", res.error_message
    assert (res.width, res.height) == expected
    assert (res.original_width, res.original_height) == size
    assert _open(res.image).size == expected
    assert _open(res.image).format == "JPEG"


def test_border_pads_with_white_and_centres() -> None:
    red = Image.new("RGB", (800, 400), (255, 0, 0))
    buf = io.BytesIO()
    red.save(buf, "PNG")
    res = process_image(buf.getvalue(), DownloadConfig(resize_mode="border", encode_format="png"))
    out = _open(res.image)
    assert out.size == (256, 256)
    assert out.getpixel((128, 10)) == (255, 255, 255)  # padding above
    assert out.getpixel((128, 128)) == (255, 0, 0)  # picture in the middle (256x128, rows 64..191)
    assert out.getpixel((128, 250)) == (255, 255, 255)


def test_resize_only_if_bigger_never_upscales() -> None:
    cfg = DownloadConfig(resize_only_if_bigger=True)
    assert target_size(100, 50, cfg) == (100, 50)
    assert target_size(800, 600, cfg) == (341, 256)


def test_real_photos_decode(corpus: Path) -> None:
    photos = sorted((corpus / "scikit-image-scikit-image").glob("*.png"))
    photos += sorted((corpus / "jmhessel-clipscore").glob("*.jpg"))
    assert len(photos) >= 6
    for path in photos:
        res = process_image(path.read_bytes(), DownloadConfig())
        assert res.status == "success", (path.name, res.error_message)
        with Image.open(path) as src:
            assert (res.original_width, res.original_height) == src.size
        assert min(res.width, res.height) == 256


def test_jpeg_draft_gives_the_same_picture(corpus: Path) -> None:
    data = (corpus / "jmhessel-clipscore" / "image1.jpg").read_bytes()
    cfg = DownloadConfig(encode_format="png")
    fast = _open(process_image(data, cfg).image)
    full = Image.open(io.BytesIO(data)).convert("RGB").resize(fast.size, Image.Resampling.BOX)
    assert fast.size == full.size == (256, 257)  # 750x751 source
    # DCT-domain reduction + box filter vs full decode + box filter: visually identical
    assert _psnr(fast, full) > 35


def test_exif_orientation_is_applied(corpus: Path) -> None:
    data = (corpus / "python-pillow-Pillow" / "exif_imagemagick_orientation.png").read_bytes()
    src = Image.open(io.BytesIO(data))
    assert src.getexif().get(0x0112) == 3  # rotate 180
    res = process_image(data, DownloadConfig(resize_mode="no", encode_format="png"))
    assert res.status == "success"
    expected = ImageOps.exif_transpose(src).convert("RGB")
    raw = src.convert("RGB")
    out = _open(res.image).convert("RGB")
    assert _psnr(out, expected) == 99.0
    assert _psnr(out, raw) < 30  # really rotated, not passed through


def test_exif_rotation_swapping_axes_on_a_jpeg() -> None:
    img = Image.fromarray(np.asarray(Image.open(io.BytesIO(noise_image(800, 400, "PNG")))))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW: displayed 400x800
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    res = process_image(buf.getvalue(), DownloadConfig())
    assert res.status == "success"
    assert (res.original_width, res.original_height) == (400, 800)
    assert (res.width, res.height) == (256, 512)


def test_animated_gif_gives_first_frame(corpus: Path) -> None:
    data = (corpus / "python-pillow-Pillow" / "dispose_bgnd.gif").read_bytes()
    assert Image.open(io.BytesIO(data)).n_frames > 1
    cfg = DownloadConfig(formats=("GIF",), resize_mode="no", encode_format="png")
    res = process_image(data, cfg)
    assert res.status == "success"
    first = Image.open(io.BytesIO(data)).convert("RGB")
    assert _psnr(_open(res.image), first) == 99.0


def test_format_allow_list(corpus: Path) -> None:
    gif = (corpus / "python-pillow-Pillow" / "hopper.gif").read_bytes()
    assert process_image(gif, DownloadConfig()).status == "unsupported_format"
    webp = (corpus / "python-pillow-Pillow" / "hopper.webp").read_bytes()
    assert process_image(webp, DownloadConfig()).status == "success"
    assert process_image(webp, DownloadConfig(formats=("JPEG",))).status == "unsupported_format"


def test_decompression_bomb_gif_is_refused(corpus: Path) -> None:
    data = (corpus / "python-pillow-Pillow" / "decompression_bomb.gif").read_bytes()
    res = process_image(data, DownloadConfig(formats=("GIF",)))
    assert res.status == "too_large"
    assert res.image is None


def test_png_claiming_huge_dimensions_is_refused_before_decode() -> None:
    # 10000 x 10000 = 1e8 pixels: over max_pixels, under Pillow's own hard limit
    with warnings.catch_warnings():
        # refused by our own max_pixels check, without Pillow's warning reaching the log
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        res = process_image(_png_header_only(10_000, 10_000), DownloadConfig())
    assert res.status == "too_large"
    assert "100000000 pixels" in res.error_message
    # the cap is the config's, not Pillow's
    res = process_image(_png_header_only(2_000, 2_000), DownloadConfig(max_pixels=1_000_000))
    assert res.status == "too_large"


def test_broken_images_fail_to_decode(corpus: Path) -> None:
    pillow = corpus / "python-pillow-Pillow"
    for name in ("broken.png", "broken_data_stream.png"):
        res = process_image((pillow / name).read_bytes(), DownloadConfig())
        assert res.status == "failed_to_decode", name
    assert (
        process_image(b"<html>not an image</html>" * 300, DownloadConfig()).status
        == "failed_to_decode"
    )
    truncated = noise_image(400, 300, "JPEG")[:3000]
    assert process_image(truncated, DownloadConfig()).status == "failed_to_decode"


def test_transparency_is_composited_on_white() -> None:
    img = Image.new("RGBA", (300, 300), (0, 0, 0, 0))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    res = process_image(buf.getvalue(), DownloadConfig(encode_format="png"))
    assert _open(res.image).convert("RGB").getpixel((5, 5)) == (255, 255, 255)


def test_encode_quality_and_format() -> None:
    data = noise_image(640, 480, "PNG")
    low = process_image(data, DownloadConfig(encode_quality=20)).image
    high = process_image(data, DownloadConfig(encode_quality=95)).image
    assert len(low) < len(high)
    webp = process_image(data, DownloadConfig(encode_format="webp")).image
    assert _open(webp).format == "WEBP"


def test_sixteen_bit_grey_keeps_its_brightness() -> None:
    arr = np.full((300, 300), 40_000, dtype=np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    res = process_image(buf.getvalue(), DownloadConfig(encode_format="png"))
    assert res.status == "success"
    assert _open(res.image).getpixel((10, 10)) == 40_000 // 256


def test_cmyk_jpeg_and_palette_png() -> None:
    cmyk = Image.new("CMYK", (640, 480), (0, 255, 255, 0))  # red in CMYK
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", quality=95)
    res = process_image(buf.getvalue(), DownloadConfig(encode_format="png"))
    assert res.status == "success"
    r, g, b = _open(res.image).convert("RGB").getpixel((100, 100))
    assert r > 200 and g < 60 and b < 60
    pal = Image.open(io.BytesIO(noise_image(300, 300, "PNG"))).convert("P")
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=0)
    assert process_image(buf.getvalue(), DownloadConfig()).status == "success"


# --- thumbnails (one implementation for search results, the dashboard and the report) ----------


def test_read_thumbnails_keeps_order_and_counts_what_is_missing(tmp_path, caplog) -> None:
    root = tmp_path / "images"
    root.mkdir()
    big = noise_image(400, 300, "JPEG", seed=1)
    png = noise_image(50, 80, "PNG", seed=2)
    samples = [
        ShardSample("a1", big, "t", {}),
        ShardSample("a2", b"not an image", "t", {}),
        ShardSample("a3", png, "t", {}, ext="png"),
    ]
    write_shard(str(root / "00000.tar"), samples)
    (root / "00002.tar").write_bytes(b"this is no tar file")
    keys = ["a3", "a1", "a2", "zz", None, "b1", "c1"]
    shards = [
        "00000.tar",
        "00000.tar",
        "00000.tar",
        "00000.tar",
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]
    with caplog.at_level("INFO", logger="laion_dask.stages.imaging"):
        got = read_thumbnails(str(root), keys, shards, size=64)
    assert [img is not None for img in got] == [True, True, False, False, False, False, False]
    assert got[0].size == (40, 64) and got[1].size == (64, 48)  # aspect kept, within 64 px
    assert got[1].mode == "RGB"
    assert "00001.tar unreadable" in caplog.text and "00002.tar unreadable" in caplog.text
    assert "5 of 7 have no decodable image" in caplog.text


def test_thumbnail_html_and_data_uris_decode_back() -> None:
    img = thumbnail(noise_image(300, 200, "JPEG", seed=3), size=32)
    assert img is not None and img.size == (32, 21)
    for fmt, prefix in (("png", "data:image/png;base64,"), ("jpeg", "data:image/jpeg;base64,")):
        uri = data_uri(img, fmt)
        assert uri.startswith(prefix)
        back = _open(base64.b64decode(uri.removeprefix(prefix)))
        assert back.size == img.size and back.format == fmt.upper()
    assert f'src="{data_uri(img)}"' in thumbnail_html(img)
    assert "no image" in thumbnail_html(None)
    with pytest.raises(ValueError, match="png' or 'jpeg'"):
        data_uri(img, "webp")
    assert thumbnail(b"\xff\xd8 truncated jpeg") is None


def test_reused_image_memory_gives_the_same_bytes():
    """Pillow's block cache (reuse_image_memory) changes where pixels live, never what they are:
    the same bodies give byte-identical results before and after, in any order."""
    cfg = DownloadConfig()
    bodies = [noise_image(400 + 37 * i, 300 - 11 * i, "JPEG", seed=i) for i in range(6)]
    blocks = Image.core.get_blocks_max()
    try:
        Image.core.set_blocks_max(0)
        before = [process_image(b, cfg).image for b in bodies]
        reuse_image_memory(8)
        assert Image.core.get_blocks_max() == 8
        reuse_image_memory(4)  # raised, never lowered
        assert Image.core.get_blocks_max() == 8
        after = [process_image(b, cfg).image for b in reversed(bodies)][::-1]
    finally:
        Image.core.set_blocks_max(blocks)
    assert after == before and all(before)
