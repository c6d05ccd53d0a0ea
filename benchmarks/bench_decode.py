"""Benchmark: image decode + preprocess alone (no model), loader threads vs decoder processes.

Reads the JPEGs of ``--images`` (webdataset shards, e.g. ``benchmarks/_work/images_n1000_800x600``
written by ``bench_score.py``) into memory, then times ``laion_dask.stages.clip._batches`` (the
loader
that ``score_partition`` uses) with the ViT-B/32 image processor (shortest edge 224, center crop
224, bicubic): the images/s a GPU could be fed at most, and the CPU time per image spent in the
process that would also run the model (threads: all of it, under one GIL; processes: only
receiving the pixels). Each variant runs ``--repeat`` times and the best is printed. Run::

    nice -n 10 .venv/bin/python benchmarks/bench_decode.py --threads 1 2 --processes 2
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from laion_dask.ground.config import ClipConfig  # noqa: E402
from laion_dask.stages import clip  # noqa: E402


def read_images(root: Path, limit: int | None) -> list[bytes | None]:
    out: list[bytes | None] = []
    for shard in sorted(root.glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf:
                if m.isfile() and m.name.rsplit(".", 1)[-1] in ("jpg", "jpeg", "png", "webp"):
                    out.append(tf.extractfile(m).read())  # type: ignore[union-attr]
    return out[:limit] if limit else out


def with_loader_processes(cfg: ClipConfig, n: int) -> ClipConfig:
    """``cfg`` with ``loader_processes = n`` (set on the instance until ClipConfig has it)."""
    if "loader_processes" in {f.name for f in dataclasses.fields(ClipConfig)}:
        return dataclasses.replace(cfg, loader_processes=n)
    out = dataclasses.replace(cfg)
    object.__setattr__(out, "loader_processes", n)
    return out


def _children_cpu() -> float:
    """CPU seconds of the live child processes (the decoder pool)."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def time_variant(
    data: list[bytes | None], cfg: ClipConfig, pre: clip.Preprocessor
) -> tuple[float, float, float]:
    """(images/s, CPU ms per image in this process, CPU ms per image in all processes): the
    second is what decoding costs the process that also runs the model, the third the total
    (both hold whatever other load the machine has; images/s does not)."""
    c0, k0, t0 = time.process_time(), _children_cpu(), time.perf_counter()
    n = 0
    for _, items in clip._batches(data, cfg, pre):
        n += sum(it is not None for it in items)
    secs = time.perf_counter() - t0
    cpu, kids = time.process_time() - c0, _children_cpu() - k0
    if n != len(data):
        raise SystemExit(f"decoded {n} of {len(data)} images")
    return len(data) / secs, 1e3 * cpu / len(data), 1e3 * (cpu + kids) / len(data)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", default=str(REPO / "benchmarks/_work/images_n1000_800x600"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2], help="loader_threads runs")
    ap.add_argument("--processes", type=int, nargs="*", default=[2], help="loader_processes runs")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-draft", action="store_true", help="decode JPEGs at full scale")
    args = ap.parse_args(argv)

    from transformers import CLIPImageProcessor

    pre = clip.Preprocessor.from_image_processor(CLIPImageProcessor())  # ViT-B/32's settings
    data = read_images(Path(args.images), args.limit)
    if not data:
        raise SystemExit(f"no images under {args.images} (run bench_score.py once to write them)")
    base = ClipConfig(batch_size=args.batch_size, jpeg_draft=not args.no_draft)
    print(f"{len(data)} images from {args.images}; draft={base.jpeg_draft}; {pre.resize_to}")
    variants = [(f"threads={t}", dataclasses.replace(base, loader_threads=t)) for t in args.threads]
    variants += [(f"processes={p}", with_loader_processes(base, p)) for p in args.processes]
    try:
        for name, cfg in variants:
            if getattr(cfg, "loader_processes", 0):
                time_variant(data[: 4 * args.batch_size], cfg, pre)  # start the pool untimed
            rate, cpu_ms, total_ms = max(time_variant(data, cfg, pre) for _ in range(args.repeat))
            print(
                f"{name:>12}: {rate:7.1f} images/s; CPU ms/image: {cpu_ms:.2f} in the scoring "
                f"process, {total_ms:.2f} in all (decode + resize + crop, best of {args.repeat})",
                flush=True,
            )
    finally:
        clip.shutdown_decoder_processes()


if __name__ == "__main__":
    main()
