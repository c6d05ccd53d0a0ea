"""The offline demo: a synthetic Common-Crawl-like corpus and the loopback host serving its images.

- :mod:`.draw`: Pillow pictures of a small vocabulary, each with true captions in en/de/fr/es.
- :mod:`.corpus`: ``generate_corpus(out_dir, CorpusSpec(), base_urls=...)`` writes WAT + WARC
  files, the image files and ``ground_truth.parquet`` (deterministic for a given seed).
- :mod:`.host`: ``ImageHost`` serves the images on 127.0.0.1..3 over real HTTP (the last host
  sends ``X-Robots-Tag: noai``); ``serve_demo_corpus`` starts it and generates or reuses a corpus.
"""

from __future__ import annotations

from laion_dask.faces.demo.host import ImageHost, serve_demo_corpus
from laion_dask.products.synthetic.corpus import (
    CorpusInfo,
    CorpusSpec,
    generate_corpus,
    load_corpus_info,
)

__all__ = [
    "CorpusInfo",
    "CorpusSpec",
    "ImageHost",
    "generate_corpus",
    "load_corpus_info",
    "serve_demo_corpus",
]
