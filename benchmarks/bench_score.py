"""Benchmark: CLIP scoring stage on Dask vs a straightforward single-process loop.

Model: ViT-B/32-shaped ``CLIPModel(CLIPConfig())`` with random weights (saved once under the
work dir and loaded back with ``from_pretrained``, as users load a hub model). Images: ``--n``
JPEGs of ``--size`` (default 800x600) cut from the corpus photos plus noise, in webdataset
shards of 250, with captions. Both sides read the same shards.

* loop: read the shards, Pillow decode, the model's own image processor and tokenizer,
  batches of 64, ``get_image_features`` / ``get_text_features``, cosine.
* ours: ``add_clip_scores`` mapped over the partitions on a cluster from
  ``laion_dask.orchestration.cluster.make_client`` (LocalCluster on CPU, LocalCUDACluster on a GPU
  machine).

Run (CPU, 2 cores)::

    nice -n 10 .venv/bin/python benchmarks/bench_score.py --n 1000

``--loader-processes 0 N`` times the stage with the loader threads and with N decoder processes
per worker (``clip.loader_processes``; the cluster is then started with
``distributed.worker.daemon = False``). Worker CPU-seconds include the decoder processes.

GPU (see gpu_check.sh)::

    python benchmarks/bench_score.py --n 20000 --size 256x192 --loop-n 2000 --batch-size 256 ...
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import PIL.Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.bench_decode import with_loader_processes  # noqa: E402
from laion_dask.ground import schema  # noqa: E402
from laion_dask.ground.config import ClipConfig, ClusterConfig  # noqa: E402
from laion_dask.ground.shards import ShardSample, read_shard_images, write_shard  # noqa: E402

CORPUS = Path(os.environ.get("LAION_DASK_CORPUS", REPO.parent / "shared" / "corpus"))
PHOTOS = [
    "scikit-image-scikit-image/astronaut.png",
    "scikit-image-scikit-image/coffee.png",
    "scikit-image-scikit-image/chelsea.png",
    "scikit-image-scikit-image/rocket.jpg",
    "scikit-image-scikit-image/motorcycle_right.png",
    "scikit-image-scikit-image/horse.png",
    "scikit-image-scikit-image/camera.png",
    "python-pillow-Pillow/hopper.jpg",
    "jmhessel-clipscore/image1.jpg",
    "jmhessel-clipscore/image2.jpg",
]
CAPTIONS = [
    "a photo of an astronaut in a white suit",
    "a cup of coffee on a table",
    "a cat sitting on a chair",
    "a rocket on the launch pad",
    "a red motorcycle parked outside",
    "a black and white drawing of a horse",
    "a man with a camera on a tripod",
    "portrait of a woman with a hat",
    "people walking on a street",
    "a plate of food at a restaurant",
]
SHARD_SIZE = 250


@functools.lru_cache(maxsize=1)
def _sources(photo_dir: Path | None) -> list[PIL.Image.Image]:
    out = []
    if photo_dir is not None and photo_dir.is_dir():
        for rel in PHOTOS:
            p = photo_dir / rel
            if not p.is_file():
                p = photo_dir / Path(rel).name  # a flat copy (gpu_check carries one)
            if p.is_file():
                with PIL.Image.open(p) as im:
                    out.append(im.convert("RGB"))
    if not out:  # no corpus: smooth synthetic scenes
        rng = np.random.default_rng(0)
        for _ in range(4):
            yy, xx = np.mgrid[0:480, 0:640]
            arr = np.stack(
                [
                    np.sin(xx / rng.uniform(20, 90)),
                    np.cos(yy / rng.uniform(20, 90)),
                    np.sin((xx + yy) / rng.uniform(20, 90)),
                ],
                -1,
            )
            out.append(PIL.Image.fromarray(((arr + 1) * 127.5).astype(np.uint8)))
    return out


def make_dataset(work: Path, n: int, size: tuple[int, int], photo_dir: Path | None) -> pd.DataFrame:
    """Write ``n`` JPEGs into shards under ``work/images`` (reused when present)."""
    from laion_dask.ground.shards import make_key

    tag = f"n{n}_{size[0]}x{size[1]}"
    root = work / f"images_{tag}"
    done = root / "DONE"
    rows = []
    for i in range(n):
        shard_id, idx = divmod(i, SHARD_SIZE)
        rows.append(
            {
                schema.KEY: make_key(shard_id, idx),
                schema.SHARD: f"{shard_id:05d}.tar",
                schema.TEXT: CAPTIONS[i % len(CAPTIONS)],
                schema.LANGUAGE_GROUP: "en",
                schema.STATUS: "success",
            }
        )
    df = pd.DataFrame(rows).astype("string")
    df.attrs["image_root"] = str(root)
    if done.exists():
        return df
    root.mkdir(parents=True, exist_ok=True)
    jobs = []
    for shard_id in range((n + SHARD_SIZE - 1) // SHARD_SIZE):
        part = rows[shard_id * SHARD_SIZE : (shard_id + 1) * SHARD_SIZE]
        jobs.append((str(root / f"{shard_id:05d}.tar"), shard_id, part, size, photo_dir))
    # one process per core: 20,000 real-sized JPEGs take minutes in one process
    with ProcessPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        list(pool.map(_write_shard_job, jobs))
    done.write_text("ok")
    return df


def _write_shard_job(job: tuple) -> int:
    """Crop + noise the corpus photos into one shard of JPEGs (seeded by shard id)."""
    path, shard_id, rows, (w, h), photo_dir = job
    srcs = _sources(photo_dir)
    rng = np.random.default_rng(shard_id)
    samples = []
    for j, row in enumerate(rows):
        src = srcs[(shard_id * SHARD_SIZE + j) % len(srcs)]
        scale = rng.uniform(1.0, 1.6) * max(w / src.width, h / src.height)
        big = src.resize((int(src.width * scale) + 1, int(src.height * scale) + 1))
        x0 = int(rng.integers(0, big.width - w + 1))
        y0 = int(rng.integers(0, big.height - h + 1))
        arr = np.asarray(big.crop((x0, y0, x0 + w, y0 + h)), dtype=np.int16)
        arr = np.clip(arr + rng.integers(-12, 13, arr.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        PIL.Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        key = row[schema.KEY]
        samples.append(ShardSample(key, buf.getvalue(), row[schema.TEXT], {"key": key}))
    return write_shard(path, samples)


def ensure_model(work: Path) -> Path:
    from tests.helpers.clip import save_vit_b32

    path = work / "vit-b-32-random"
    if not (path / "config.json").is_file():
        save_vit_b32(path)
    return path


def run_loop(
    model_path: Path, df: pd.DataFrame, device: str, batch: int = 64
) -> tuple[float, np.ndarray, float]:
    """The straightforward loop: decode, processor, model, cosine.

    Returns (wall seconds, similarities, CPU seconds of this process).
    """
    import torch
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    dtype = torch.float16 if device == "cuda" else torch.float32
    model = CLIPModel.from_pretrained(model_path, dtype=dtype).to(device).eval()
    proc = AutoImageProcessor.from_pretrained(model_path)
    tok = AutoTokenizer.from_pretrained(model_path)
    root = df.attrs["image_root"]
    sims = []
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    images: dict[str, bytes] = {}
    for shard in df[schema.SHARD].unique():
        images.update(read_shard_images(f"{root}/{shard}"))
    keys, texts = df[schema.KEY].tolist(), df[schema.TEXT].tolist()
    with torch.inference_mode():
        for s in range(0, len(keys), batch):
            pil = [
                PIL.Image.open(io.BytesIO(images[k])).convert("RGB") for k in keys[s : s + batch]
            ]
            pix = proc(images=pil, return_tensors="pt")["pixel_values"].to(device, dtype)
            t = tok(
                texts[s : s + batch],
                padding=True,
                truncation=True,
                max_length=77,
                return_tensors="pt",
            ).to(device)
            img = model.get_image_features(pixel_values=pix)
            txt = model.get_text_features(
                input_ids=t["input_ids"], attention_mask=t["attention_mask"]
            )
            img = getattr(img, "pooler_output", img).float()
            txt = getattr(txt, "pooler_output", txt).float()
            sims.append(torch.nn.functional.cosine_similarity(img, txt).cpu().numpy())
    return time.perf_counter() - t0, np.concatenate(sims), _cpu_seconds() - cpu0


def _warm(cfg: ClipConfig) -> int:
    """Load the encoder on a worker (outside the timed region, as the loop's load is)."""
    from laion_dask.stages.clip import _process_pool, encoder_from_config

    n = int(getattr(cfg, "loader_processes", 0) or 0)
    pool = _process_pool(n) if n else None
    if pool is not None:  # start the decoder processes too (spawn: ~1 s each)
        for f in [pool.submit(time.sleep, 0.5) for _ in range(n)]:
            f.result()
    return encoder_from_config(cfg).dim


def _cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process, all threads, and its live
    children (the decoder processes of ``loader_processes``)."""
    import psutil

    t = os.times()
    total = t.user + t.system
    for child in psutil.Process().children(recursive=True):
        try:
            ct = child.cpu_times()
        except psutil.Error:  # exited meanwhile
            continue
        total += ct.user + ct.system
    return total


def run_ours(
    client, cfg: ClipConfig, df: pd.DataFrame, partitions: int, *, restrict: bool = True
) -> tuple[float, pd.DataFrame, float]:
    import dask.dataframe as dd

    from laion_dask.orchestration.cluster import scoring_resources
    from laion_dask.stages.clip import add_clip_scores

    client.run(_warm, cfg)
    meta = schema.empty(dict(df.dtypes.astype(str)), schema.SCORE_DTYPES)
    ddf = dd.from_pandas(df, npartitions=partitions, sort=False)
    cpu0 = sum(client.run(_cpu_seconds).values())
    t0 = time.perf_counter()
    scored = ddf.map_partitions(add_clip_scores, cfg, image_root=df.attrs["image_root"], meta=meta)
    # dask.annotate is ignored by dask-expr collections: restrict at compute time instead
    resources = scoring_resources(client) if restrict else None
    out = client.compute(scored, resources=resources).result()
    secs = time.perf_counter() - t0
    return secs, out, sum(client.run(_cpu_seconds).values()) - cpu0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="images scored by our stage")
    ap.add_argument("--loop-n", type=int, default=None, help="images for the loop (default --n)")
    ap.add_argument("--size", default="800x600", help="JPEG size WxH")
    ap.add_argument("--work", default=str(REPO / "benchmarks" / "_work"))
    ap.add_argument("--photos", default=str(CORPUS))
    # LocalCluster's own choice on 2 cores: 2 worker processes x 1 thread (torch 1 thread each)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="threads per worker")
    ap.add_argument("--partitions", type=int, default=None, help="default: 2 per worker thread")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--loader-threads", type=int, default=2)
    ap.add_argument(
        "--loader-processes",
        type=int,
        nargs="*",
        default=[0],
        help="clip.loader_processes values to time (0 = decode in the loader threads)",
    )
    ap.add_argument("--torch-threads", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--gpu", default="auto", help="cluster.gpu: auto / never / require")
    ap.add_argument("--no-draft", action="store_true", help="also time with jpeg_draft off")
    ap.add_argument("--skip-loop", action="store_true")
    ap.add_argument(
        "--unrestricted",
        action="store_true",
        help="also time without the GPU resource (worker threads bound concurrent tasks)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    from laion_dask.orchestration.cluster import make_client, scoring_resources

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    model_path = ensure_model(work)
    t = time.perf_counter()
    df = make_dataset(work, args.n, size, Path(args.photos))
    print(
        f"data: {args.n} JPEGs {size[0]}x{size[1]} in {len(df[schema.SHARD].unique())} shards "
        f"({time.perf_counter() - t:.1f}s to prepare); device={device}; "
        f"torch {torch.__version__}; cores={os.cpu_count()}",
        flush=True,
    )

    loop_rate = None
    if not args.skip_loop:
        loop_n = args.loop_n or args.n
        sub = df.iloc[:loop_n]
        sub.attrs = df.attrs
        secs, loop_sims, cpu = run_loop(model_path, sub, device)
        loop_rate = loop_n / secs
        loop_eff = loop_n / cpu
        print(
            f"loop : {loop_n} images in {secs:.1f}s = {loop_rate:.1f} images/s, "
            f"{loop_eff:.2f} images per CPU-second "
            "(Pillow decode + model processor, batches of 64, one process)",
            flush=True,
        )

    if any(args.loader_processes):
        import dask

        # decoder processes are children of the worker process: it must not be daemonic
        dask.config.set({"distributed.worker.daemon": False})
    ccfg = ClusterConfig(
        n_workers=args.workers,
        threads_per_worker=args.threads,
        dashboard_address=None,
        gpu=args.gpu,
    )
    parts = args.partitions or max(1, 2 * args.workers * args.threads)
    with make_client(ccfg) as client:
        print(
            f"cluster: {type(client.cluster).__name__}, "
            f"workers={len(client.scheduler_info()['workers'])}, partitions={parts}",
            flush=True,
        )
        variants = [(True, True, p) for p in args.loader_processes]
        if args.no_draft:
            variants.append((False, True, args.loader_processes[0]))
        if args.unrestricted:
            variants += [(True, False, p) for p in args.loader_processes]
        for draft, restrict, procs in variants:
            cfg = ClipConfig(
                model=str(model_path),
                device=args.device,
                batch_size=args.batch_size,
                loader_threads=args.loader_threads,
                # the worker's threads, as the pipeline's score task passes them
                torch_threads=args.torch_threads or args.threads,
                jpeg_draft=draft,
            )
            cfg = with_loader_processes(cfg, procs)
            secs, out, cpu = run_ours(client, cfg, df, parts, restrict=restrict)
            rate = args.n / secs
            ok = int((out[schema.SCORE_STATUS] == "success").sum())
            line = (
                f"ours : {args.n} images in {secs:.1f}s = {rate:.1f} images/s, "
                f"{args.n / cpu:.2f} images per worker CPU-second (jpeg_draft={draft}, "
                f"GPU resource={'yes' if restrict and scoring_resources(client) else 'no'}, "
                f"batch {args.batch_size}, loader_threads {args.loader_threads}, "
                f"loader_processes {procs}; {ok} scored)"
            )
            if loop_rate is not None:
                line += f"\n       ratio vs loop = {rate / loop_rate:.2f}x wall-clock, "
                line += f"{args.n / cpu / loop_eff:.2f}x per CPU-second"
                ours = out[schema.SIMILARITY].to_numpy()[: len(loop_sims)]
                line += f"  max |sim diff| vs loop = {np.abs(ours - loop_sims).max():.4f}"
            print(line, flush=True)
        if any(args.loader_processes):
            from laion_dask.stages.clip import shutdown_decoder_processes

            client.run(shutdown_decoder_processes)  # before the workers close


if __name__ == "__main__":
    main()
